"""`pvl-search serve --workers N`: N server processes answering on one listening socket.

One process answers about 100 tiny searches a second however many cores it has: its Python
lock serialises the HTTP handling, the batcher and each search's Python (BENCHMARKS.md,
"Served queries": one torch thread, passive OpenMP waits and a finer GIL switch interval all
left that rate unchanged). N processes each load the model and open the index themselves
(read-only, so they share nothing but the socket the parent bound), run torch on cores / N
threads, and the kernel hands each new connection to whichever process accepts it first.

The parent only supervises: it reports the first start-up error of any worker as that
exception (so `serve` fails in one line as with one process), calls `on_ready` once every
worker answers, starts a worker again when one dies (nothing is lost: workers only read),
and on SIGINT / SIGTERM stops them all. Workers are spawned, not forked: a fork of a process
that has run torch can hang in its OpenMP pool.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import signal
import socket
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection, wait
from typing import Any

START_TIMEOUT_S = 600.0  # loading a model and opening an index: long for base on a slow disk
RESTART_LIMIT = 5  # workers that die before answering once in a row: then stop, it will not start

# A worker's body: serve on the socket, calling its argument once requests are accepted.
WorkerBody = Callable[[socket.socket, Callable[[], None]], None]


class WorkerStartError(OSError):
    """A worker could not start, and its own exception could not be sent back as itself."""


def torch_threads_per_worker(workers: int) -> int:
    """Torch threads each of `workers` processes gets: the cores shared out, at least one."""
    return max(1, (os.cpu_count() or 1) // workers)


def run_workers(body: WorkerBody, sock: socket.socket, workers: int, on_ready: Callable[[], None] | None = None
                ) -> None:
    """Run `body(sock, ready)` in `workers` spawned processes until SIGINT / SIGTERM (see the
    module doc). `body` must be picklable (a module-level function or a partial of one).
    Raises the first start-up exception a worker reports."""
    if workers < 1:
        raise ValueError(f"workers must be at least 1 (got {workers})")
    pool = _Pool(body, sock, workers)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        pool.start_all()
        if on_ready is not None:
            on_ready()
        pool.supervise(stop)
    finally:
        pool.stop_all()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _worker_main(body: WorkerBody, sock: socket.socket, threads: int, conn: Connection) -> None:
    import torch

    # Its own process group: a terminal's Ctrl-C reaches the parent alone, which stops the
    # workers itself (a worker stopping on its own would be started again).
    os.setpgrp()
    _exit_with(os.getppid())
    torch.set_num_threads(threads)
    try:
        body(sock, lambda: conn.send(("ready", None)))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which raises it
        _send_error(conn, exc)
        raise SystemExit(1) from None


def _exit_with(parent: int) -> None:
    """Stop this worker (SIGTERM to itself) when its parent is gone, e.g. killed: an orphan
    would go on answering on the socket."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="pvl-parent-watch", daemon=True).start()


def _send_error(conn: Connection, exc: BaseException) -> None:
    """The exception as pickled bytes, and its words for when those do not load again."""
    try:
        data = pickle.dumps(exc)
    except Exception:  # noqa: BLE001 - one that does not pickle goes as its words alone
        data = b""
    conn.send(("error", (data, str(exc))))


def _received_error(data: bytes, words: str) -> BaseException:
    try:
        exc = pickle.loads(data)
        if isinstance(exc, BaseException):
            return exc
    except Exception:  # noqa: BLE001, S110 - falls back to the words
        pass
    return WorkerStartError(words)


class _Pool:
    def __init__(self, body: WorkerBody, sock: socket.socket, workers: int) -> None:
        self.body, self.sock, self.workers = body, sock, workers
        self.threads = torch_threads_per_worker(workers)
        self.context = multiprocessing.get_context("spawn")
        self.running: list[Any] = []  # multiprocessing.Process
        self.failed_starts = 0

    def _start(self) -> Any:
        """One worker, started and answering; raises what it reported if it could not start."""
        receive, send = self.context.Pipe(duplex=False)
        process = self.context.Process(target=_worker_main, args=(self.body, self.sock, self.threads, send),
                                       name="pvl-serve-worker", daemon=True)
        process.start()
        send.close()
        try:
            if not wait([receive, process.sentinel], START_TIMEOUT_S):
                process.kill()
                raise WorkerStartError(f"a server worker did not start within {START_TIMEOUT_S:.0f} s")
            if not receive.poll():
                raise WorkerStartError(f"a server worker exited while starting (exit code {process.exitcode})")
            kind, error = receive.recv()
        finally:
            receive.close()
        if kind == "error":
            process.join()
            raise _received_error(*error)
        self.running.append(process)
        return process

    def start_all(self) -> None:
        for _ in range(self.workers):
            self._start()

    def supervise(self, stop: threading.Event) -> None:
        """Until `stop` is set: start a worker again when one exits."""
        while not stop.is_set():
            ended = wait([p.sentinel for p in self.running], timeout=0.2)
            for process in [p for p in self.running if p.sentinel in ended]:
                self.running.remove(process)
                process.join()
            while len(self.running) < self.workers and not stop.is_set():
                try:
                    self._start()
                    self.failed_starts = 0
                except BaseException:
                    self.failed_starts += 1
                    if self.failed_starts >= RESTART_LIMIT or not self.running:
                        raise
                    break  # the others still answer: try again on the next round

    def stop_all(self) -> None:
        for process in self.running:
            if process.is_alive():
                process.terminate()  # SIGTERM: uvicorn finishes the requests it has, then exits
        for process in self.running:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
                process.join()
        self.running.clear()
