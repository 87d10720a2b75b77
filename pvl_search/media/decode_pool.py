"""Decode many files in worker processes that the caller can lose without noticing.

decord segfaults on some corrupt files and spins forever, holding the GIL, on containers
that claim more frames than they have (dmlc/decord #25, #83, #99, #229, #318, #373). Neither
can be caught inside the process, so every file is decoded in a worker process; a worker that
dies or makes no progress for `timeout_s` is killed and replaced, its file reported as a
`VideoDecodeError`, and the pool goes on with the next file. With backend="auto" such a file
is first retried once with PyAV in a fresh worker.

Workers are single-threaded: on the project's 2-core machines two single-thread decoder
processes beat one decoder with two threads (see BENCHMARKS.md). They start from a
forkserver that has already imported torch, PyAV and decord (forking a process that runs
torch is unsafe; spawning re-imports torch for every replacement). A dispatcher thread keeps
up to `prefetch` files decoded ahead of the consumer, so the model works on batch i while
the workers decode batch i+1; results come back in submission order.

Workers are started the spawn/forkserver way, so, as with any such multiprocessing, a script
that uses the pool must guard its entry point with `if __name__ == "__main__":`.

Frames come back as uint8 (4x smaller to pickle than float). Memory held by the pool is
about prefetch x spans per job x F x S x S x 3 bytes: submit an hour-long film as several
jobs of a few dozen spans each rather than as one job of 720 spans.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import signal
import socket
import threading
import time
from collections import deque
from collections.abc import Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pvl_search.media.video import (
    BACKENDS,
    Backend,
    Clip,
    Fit,
    Span,
    VideoDecodeError,
    VideoInfo,
    Windows,
    is_image,
    iter_clips,
    probe,
    segment_spans,
)

Job = tuple[Hashable, "str | os.PathLike[str]", "Sequence[Span] | Windows | None", int, int]
# (key, path, spans, or Windows to let the worker cut the video, or None for all of it,
#  num_frames, size)


class DecodedVideo(list):
    """The clips of one job (a list of Clip, one per span), with the spans they cover and,
    when the worker probed the file (Windows jobs), its VideoInfo."""

    def __init__(self, clips: list[Clip], spans: list[Span] | None, info: VideoInfo | None) -> None:
        super().__init__(clips)
        self.spans = spans
        self.info = info


Result = DecodedVideo | VideoDecodeError  # one Clip per span, or why the file failed

_STARTUP_TIMEOUT_S = 120.0  # a fresh worker must say "ready" within this (imports included)
_MAX_START_FAILURES = 3  # consecutive workers dying before "ready": give up, it is not the files
_PRELOAD = ["pvl_search.media.decode_pool"]  # imports torch, PyAV and decord once in the forkserver


class DecodePool:
    """Worker processes decoding (key, path, spans, num_frames, size) jobs; see the module doc.

    Use as a context manager; `imap` yields (key, list[Clip] | VideoDecodeError) per job.
    """

    def __init__(
        self,
        workers: int = 2,
        timeout_s: float = 60.0,
        backend: Backend = "auto",
        *,
        fit: Fit = "crop",
        prefetch: int | None = None,
    ) -> None:
        """`timeout_s`: longest a worker may go without finishing a span (open + one span's
        frames) before it counts as hung. `prefetch`: jobs decoded or in flight ahead of the
        consumer (default 4 per worker)."""
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.workers, self.timeout_s, self.backend, self.fit = workers, timeout_s, backend, fit
        self.prefetch = max(prefetch or 4 * workers, workers)
        self._context = multiprocessing.get_context("forkserver")
        self._context.set_forkserver_preload(_PRELOAD)
        self._slots: list[_Worker | None] = [None] * workers
        self._lock = threading.Lock()
        self._run: _Run | None = None
        self._closed = False

    def __enter__(self) -> DecodePool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def worker_pids(self) -> list[int]:
        """Pids of the live workers (tests kill them; operators may want to watch them)."""
        with self._lock:
            return [w.process.pid for w in self._slots if w is not None and w.process.pid]

    def buffered(self) -> int:
        """Results decoded and waiting for the consumer: near 0 all the time means decoding is
        the bottleneck, near `prefetch` means the consumer is."""
        run = self._run
        if run is None:
            return 0
        with run.cond:
            return len(run.done)

    def in_flight(self) -> dict[Hashable, int]:
        """Key of each job a worker is decoding now -> that worker's pid."""
        with self._lock:
            return {w.job.key: w.process.pid for w in self._slots if w is not None and w.job}

    def imap(self, jobs: Iterable[Job]) -> Iterator[tuple[Hashable, Result]]:
        """Start decoding `jobs` now; yield (key, result) in submission order as results arrive.

        `jobs` is consumed lazily from a background thread. One imap at a time per pool.
        Stopping early (break, close(), leaving the with-block) kills the work in flight.
        """
        if self._closed:
            raise RuntimeError("DecodePool is closed")
        if self._run is not None and not self._run.finished:
            raise RuntimeError("another imap of this pool is still running")
        self._run = _Run(self, iter(jobs))
        return self._run.results()

    def close(self) -> None:
        """Stop any imap, ask workers to exit, kill those that do not. Idempotent."""
        if self._run is not None:
            self._run.stop()
        self._closed = True
        with self._lock:
            workers = [w for w in self._slots if w is not None]
            self._slots = [None] * self.workers
        for worker in workers:
            with contextlib.suppress(OSError):
                worker.conn.send(None)
        deadline = time.monotonic() + 2.0
        for worker in workers:
            worker.process.join(max(0.0, deadline - time.monotonic()))
            _kill(worker)

    # --- used by _Run ---

    def _start_worker(self, slot: int) -> _Worker:
        parent_end, child_end = self._context.Pipe(duplex=True)
        process = self._context.Process(
            target=_worker_main, args=(child_end, self.fit), name=f"pvl-decode-{slot}", daemon=True
        )
        process.start()
        child_end.close()
        worker = _Worker(process, parent_end, time.monotonic() + _STARTUP_TIMEOUT_S)
        with self._lock:
            self._slots[slot] = worker
        return worker

    def _replace(self, slot: int) -> None:
        with self._lock:
            worker, self._slots[slot] = self._slots[slot], None
        if worker is not None:
            _kill(worker)


@dataclass
class _Task:
    seq: int
    key: Hashable
    path: str
    spans: list[Span] | Windows | None
    num_frames: int
    size: int
    backend: Backend
    first_failure: str | None = None  # why the decord attempt failed, when this is the retry


@dataclass
class _Worker:
    process: Any  # multiprocessing.context.ForkServerProcess
    conn: Connection
    deadline: float  # monotonic time by which it must next report
    ready: bool = False
    job: _Task | None = None
    clips: list[Clip] = field(default_factory=list)
    plan: tuple[list[Span] | None, VideoInfo | None] = (None, None)  # spans the worker decided


class _Run:
    """One imap: a dispatcher thread feeding workers, and the consumer's ordered generator."""

    def __init__(self, pool: DecodePool, jobs: Iterator[Job]) -> None:
        self.pool, self.jobs = pool, jobs
        self.retries: deque[_Task] = deque()
        self.done: dict[int, tuple[Hashable, Result]] = {}
        self.submitted = 0  # tasks taken from `jobs`
        self.yielded = 0  # results handed to the consumer
        self.exhausted = False
        self.failure: BaseException | None = None
        self.start_failures = 0
        self.stopping = False
        self.finished = False
        self.cond = threading.Condition()
        self.wake_r, self.wake_w = socket.socketpair()
        self.thread = threading.Thread(target=self._dispatch, name="pvl-decode-dispatch", daemon=True)
        self.thread.start()

    # --- consumer side ---

    def results(self) -> Iterator[tuple[Hashable, Result]]:
        try:
            while True:
                with self.cond:
                    while not self._next_ready():
                        self.cond.wait()
                    if self.failure is not None:
                        raise self.failure
                    if self.yielded not in self.done:
                        return  # all jobs done and yielded
                    item = self.done.pop(self.yielded)
                    self.yielded += 1
                self._wake()
                yield item
        finally:
            self.stop()

    def _next_ready(self) -> bool:
        return (
            self.yielded in self.done
            or self.failure is not None
            or (self.finished and self.yielded not in self.done)
        )

    def stop(self) -> None:
        """Stop dispatching, kill workers busy on jobs nobody will collect, wait for the thread."""
        with self.cond:
            self.stopping = True
        self._wake()
        if threading.current_thread() is not self.thread:
            self.thread.join()
        for r in (self.wake_r, self.wake_w):
            r.close()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self.wake_w.send(b"x")

    # --- dispatcher thread ---

    def _dispatch(self) -> None:
        try:
            while not self.stopping:
                self._fill_workers()
                if self._all_done():
                    break
                self._wait_and_collect()
        except BaseException as error:  # handed to the consumer, raised from results()
            with self.cond:
                self.failure = error
        finally:
            self._abandon_busy()
            with self.cond:
                self.finished = True
                self.cond.notify_all()

    def _all_done(self) -> bool:
        busy = any(w is not None and w.job is not None for w in self.pool._slots)
        return self.exhausted and not self.retries and not busy

    def _fill_workers(self) -> None:
        """Start missing workers; hand a task to every ready, idle one while there is room."""
        for slot, worker in enumerate(self.pool._slots):
            if worker is not None and not worker.process.is_alive() and worker.job is None:
                self.pool._replace(slot)
                worker = None
            if worker is None:
                if self.exhausted and not self.retries:
                    continue
                worker = self.pool._start_worker(slot)
            if worker.ready and worker.job is None:
                task = self._next_task()
                if task is None:
                    return
                self._send(slot, worker, task)

    def _next_task(self) -> _Task | None:
        if self.retries:
            return self.retries.popleft()
        with self.cond:
            room = self.submitted - self.yielded < self.pool.prefetch
        if self.exhausted or not room:
            return None
        try:
            key, path, spans, num_frames, size = next(self.jobs)
        except StopIteration:
            self.exhausted = True
            return None
        spans = spans if spans is None or isinstance(spans, Windows) else list(spans)
        task = _Task(self.submitted, key, os.fspath(path), spans,
                     int(num_frames), int(size), self.pool.backend)  # fmt: skip
        self.submitted += 1
        return task

    def _send(self, slot: int, worker: _Worker, task: _Task) -> None:
        with self.pool._lock:
            worker.job, worker.clips = task, []
            worker.plan = (None if isinstance(task.spans, Windows) else task.spans, None)
        worker.deadline = time.monotonic() + self.pool.timeout_s
        try:
            worker.conn.send((task.path, task.spans, task.num_frames, task.size, task.backend))
        except OSError:
            pass  # the worker died; its sentinel reports the crash in _wait_and_collect

    def _wait_and_collect(self) -> None:
        workers = [w for w in self.pool._slots if w is not None]
        deadline = min((w.deadline for w in workers if w.job or not w.ready), default=None)
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        handles: list[Any] = [self.wake_r]
        for w in workers:
            handles += [w.conn, w.process.sentinel]
        ready = wait(handles, timeout)
        if self.wake_r in ready:
            with contextlib.suppress(BlockingIOError):
                self.wake_r.recv(4096, socket.MSG_DONTWAIT)
        for slot, worker in enumerate(self.pool._slots):
            if worker is None:
                continue
            if worker.conn in ready or worker.process.sentinel in ready:
                self._collect(slot, worker)
            elif time.monotonic() >= worker.deadline and (worker.job or not worker.ready):
                self._fail(slot, worker, f"timed out after {self.pool.timeout_s:g} s")

    def _collect(self, slot: int, worker: _Worker) -> None:
        """Read every message the worker sent; if it then turns out dead, it crashed."""
        closed = False
        try:
            while worker.conn.poll():
                self._handle(worker, worker.conn.recv())
        except (EOFError, OSError):
            closed = True  # the worker's end of the pipe is gone: it is dying or dead
        if closed or not worker.process.is_alive():
            worker.process.join(5.0)
            self._fail(slot, worker, _death_reason(worker.process.exitcode))

    def _handle(self, worker: _Worker, message: tuple[str, Any]) -> None:
        kind, payload = message
        worker.deadline = time.monotonic() + self.pool.timeout_s
        if kind == "ready":
            worker.ready = True
            self.start_failures = 0
        elif kind == "plan":  # (spans, info) the worker chose for a Windows job
            worker.plan = payload
        elif kind == "clip":  # the mask now, the frames as raw bytes right after
            assert worker.job is not None, "a worker sent frames with no job"
            worker.clips.append(_receive_frames(worker.conn, payload, worker.job.size))
        elif kind in ("done", "error"):
            task = worker.job
            assert task is not None, "a worker reported a result with no job"
            result = DecodedVideo(worker.clips, *worker.plan) if kind == "done" else payload
            if kind == "error" and task.first_failure:
                result = VideoDecodeError(task.path, f"{task.first_failure}; then {payload.reason}")
            with self.pool._lock:
                worker.job, worker.clips = None, []
            self._finish(task, result)

    def _fail(self, slot: int, worker: _Worker, reason: str) -> None:
        """Kill and forget the worker; fail (or, for decord under "auto", retry) its task."""
        task = worker.job
        self.pool._replace(slot)
        if task is None:
            if not worker.ready:
                self.start_failures += 1
                if self.start_failures >= _MAX_START_FAILURES:
                    raise RuntimeError(
                        f"decoder workers keep failing to start ({reason}); a script that uses "
                        "DecodePool must guard its entry point with `if __name__ == '__main__':`"
                    )
            return
        if task.backend == "auto" and task.first_failure is None:
            self.retries.append(_Task(task.seq, task.key, task.path, task.spans, task.num_frames,
                                      task.size, "pyav", first_failure=reason))  # fmt: skip
            return
        if task.first_failure:
            reason = f"{task.first_failure}; then pyav {reason}"
        self._finish(task, VideoDecodeError(task.path, reason))

    def _finish(self, task: _Task, result: Result) -> None:
        with self.cond:
            self.done[task.seq] = (task.key, result)
            self.cond.notify_all()

    def _abandon_busy(self) -> None:
        """Workers still busy when the run ends hold jobs nobody will read: replace them."""
        for slot, worker in enumerate(self.pool._slots):
            if worker is not None and worker.job is not None:
                self.pool._replace(slot)


def _receive_frames(conn: Connection, mask: np.ndarray, size: int) -> Clip:
    """Read a clip's frames, sent as raw bytes, straight into their array: pickling 3.5 MB of
    frames (8 x 384 x 384 x 3) costs two more copies on each side of the pipe."""
    frames = np.empty((len(mask), size, size, 3), dtype=np.uint8)
    conn.recv_bytes_into(frames.reshape(-1))
    return Clip(frames, mask)


def _death_reason(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = "unknown"
        return f"decoder crashed (signal {-exitcode}, {name})"
    return f"decoder exited unexpectedly (code {exitcode})"


def _kill(worker: _Worker) -> None:
    """SIGKILL (a hung decord holds the GIL and ignores SIGTERM handlers), then reap."""
    with contextlib.suppress(Exception):
        if worker.process.is_alive():
            worker.process.kill()
        worker.process.join(5.0)
    with contextlib.suppress(Exception):
        worker.conn.close()
    with contextlib.suppress(Exception):
        worker.process.close()


# --- worker process ---


def _die_with_parent() -> None:
    """Linux: get SIGKILLed if the forkserver (our parent) exits, so that a worker stuck in
    decord cannot outlive the program that started it."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)


def _worker_main(conn: Connection, fit: Fit) -> None:
    """Decode jobs one at a time; report each span as it is done, so progress resets the timer."""
    _die_with_parent()
    torch.set_num_threads(1)
    conn.send(("ready", os.getpid()))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        path, spans, num_frames, size, backend = message
        try:
            if isinstance(spans, Windows):
                spans, info = _plan(Path(path), spans)
                conn.send(("plan", (spans, info)))
            for clip in iter_clips(Path(path), spans, num_frames, size, backend=backend, fit=fit, threads=1):
                conn.send(("clip", clip.mask))
                conn.send_bytes(np.ascontiguousarray(clip.frames).reshape(-1))
            conn.send(("done", None))
        except VideoDecodeError as error:
            conn.send(("error", error))
        except Exception as error:  # noqa: BLE001 -- any failure is this file's failure
            conn.send(("error", VideoDecodeError(path, f"{type(error).__name__}: {error}")))


def _plan(path: Path, windows: Windows) -> tuple[list[Span] | None, VideoInfo]:
    """Probe the file and cut it into windows; an image, or a video whose header gives no
    duration, is one clip over all of it (spans None)."""
    info = probe(path)
    if is_image(path) or not info.duration or info.duration <= 0:
        return None, info
    return segment_spans(info.duration, windows.window_s, windows.stride_s), info
