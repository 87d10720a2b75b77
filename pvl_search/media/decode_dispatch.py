"""The dispatcher behind `DecodePool.imap`: a thread that hands jobs to worker processes,
collects their clips, notices crashes and hangs, retries with PyAV, and an ordered generator
that gives the results to the consumer.

The worker processes themselves are started, replaced and killed by the pool
(decode_pool.py), which the dispatcher drives through the public `WorkerSlots` interface
defined here; what the workers run is decode_worker.py.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
from collections import deque
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any, Protocol

import numpy as np

from pvl_search.media.backends import Backend
from pvl_search.media.decode_worker import DecoderLog
from pvl_search.media.types import Clip, Span, VideoDecodeError, VideoInfo
from pvl_search.media.windows import Windows

Job = tuple[Hashable, "str | os.PathLike[str]", "Sequence[Span] | Windows | None", int, int]
# (key, path, spans, or Windows to let the worker cut the video, or None for all of it,
#  num_frames, size)

_MAX_START_FAILURES = 3  # consecutive workers dying before "ready": give up, it is not the files


@dataclass
class DecodedVideo:
    """The clips of one job (one Clip per span), with the spans they cover and, when the
    worker probed the file (Windows jobs), its VideoInfo."""

    clips: list[Clip]
    spans: list[Span] | None  # None: the job asked for the whole file
    info: VideoInfo | None
    log: DecoderLog = field(default_factory=DecoderLog)  # what the decoder wrote to stderr meanwhile


Result = DecodedVideo | VideoDecodeError  # one Clip per span, or why the file failed


@dataclass
class DecodeProgress:
    """How far a job still being decoded is (`imap(..., progress=True)` yields these)."""

    clips: int  # clips decoded so far
    planned: int  # clips the job is cut into


@dataclass
class Task:
    """One job as the dispatcher tracks it; a PyAV retry is a second Task with the same seq."""

    seq: int
    key: Hashable
    path: str
    spans: list[Span] | Windows | None
    num_frames: int
    size: int
    backend: Backend
    first_failure: str | None = None  # why the decord attempt failed, when this is the retry


@dataclass
class Worker:
    """The pool's record of one worker process and the job it is decoding."""

    process: Any  # multiprocessing.context.ForkServerProcess
    conn: Connection
    deadline: float  # monotonic time by which it must next report
    ready: bool = False
    job: Task | None = None
    clips: list[Clip] = field(default_factory=list)
    plan: tuple[list[Span] | None, VideoInfo | None] = (None, None)  # spans the worker decided
    log: DecoderLog = field(default_factory=DecoderLog)

    def result(self) -> DecodedVideo:
        """The finished job: the clips received, with the spans and info of its plan."""
        return DecodedVideo(self.clips, *self.plan, self.log)


class WorkerSlots(Protocol):
    """The pool as the dispatcher drives it (DecodePool): its settings, and a fixed number of
    slots, each empty or holding one worker process. The pool owns the processes and the lock
    that guards the slots and each worker's job; the dispatcher decides when to start, replace
    and feed them."""

    backend: Backend
    timeout_s: float
    prefetch: int

    def slots(self) -> list[Worker | None]:
        """The worker in each slot (None: empty), as a list of its own."""
        ...

    def start_worker(self, slot: int) -> Worker:
        """A fresh worker process in `slot`; it sends "ready" once it can take a task."""
        ...

    def replace_worker(self, slot: int) -> None:
        """Kill the worker in `slot`, if any, and leave the slot empty."""
        ...

    def assign(self, worker: Worker, task: Task) -> None:
        """Record that `worker` decodes `task` from now on, with no clips yet."""
        ...

    def release(self, worker: Worker) -> None:
        """Record that `worker` has finished its task and is idle."""
        ...


class DecodeRun:
    """One imap: a dispatcher thread feeding workers, and the consumer's ordered generator."""

    def __init__(self, pool: WorkerSlots, jobs: Iterator[Job], progress: bool = False) -> None:
        self.pool, self.jobs = pool, jobs
        self.retries: deque[Task] = deque()
        self.done: dict[int, tuple[Hashable, Result]] = {}
        self.report_progress = progress
        self.progress: dict[int, tuple[Hashable, DecodeProgress]] = {}  # by seq: news not yet yielded
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

    def results(self) -> Iterator[tuple[Hashable, Result | DecodeProgress]]:
        """Each job's result in submission order; before it, while a later result is awaited,
        the progress of jobs being decoded (when asked for)."""
        try:
            while True:
                with self.cond:
                    while not self._next_ready() and not self.progress:
                        self.cond.wait()
                    if self.failure is not None:
                        raise self.failure
                    news = []
                    if self.yielded in self.done:
                        self.progress.pop(self.yielded, None)
                        news = [self.done.pop(self.yielded)]
                        self.yielded += 1
                    elif self.progress:
                        news = [self.progress[seq] for seq in sorted(self.progress)]
                        self.progress.clear()
                    elif self.finished:
                        return  # all jobs done and yielded
                self._wake()
                yield from news
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
        busy = any(w is not None and w.job is not None for w in self.pool.slots())
        return self.exhausted and not self.retries and not busy

    def _fill_workers(self) -> None:
        """Start missing workers; hand a task to every ready, idle one while there is room."""
        for slot, worker in enumerate(self.pool.slots()):
            if worker is not None and not worker.process.is_alive() and worker.job is None:
                self.pool.replace_worker(slot)
                worker = None
            if worker is None:
                if self.exhausted and not self.retries:
                    continue
                worker = self.pool.start_worker(slot)
            if worker.ready and worker.job is None:
                task = self._next_task()
                if task is None:
                    return
                self._send(slot, worker, task)

    def _next_task(self) -> Task | None:
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
        task = Task(self.submitted, key, os.fspath(path), spans,
                     int(num_frames), int(size), self.pool.backend)  # fmt: skip
        self.submitted += 1
        return task

    def _send(self, slot: int, worker: Worker, task: Task) -> None:
        self.pool.assign(worker, task)
        worker.deadline = time.monotonic() + self.pool.timeout_s
        try:
            worker.conn.send((task.path, task.spans, task.num_frames, task.size, task.backend))
        except OSError:
            pass  # the worker died; its sentinel reports the crash in _wait_and_collect

    def _wait_and_collect(self) -> None:
        workers = [w for w in self.pool.slots() if w is not None]
        deadline = min((w.deadline for w in workers if w.job or not w.ready), default=None)
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        handles: list[Any] = [self.wake_r]
        for w in workers:
            handles += [w.conn, w.process.sentinel]
        ready = wait(handles, timeout)
        if self.wake_r in ready:
            with contextlib.suppress(BlockingIOError):
                self.wake_r.recv(4096, socket.MSG_DONTWAIT)
        for slot, worker in enumerate(self.pool.slots()):
            if worker is None:
                continue
            if worker.conn in ready or worker.process.sentinel in ready:
                self._collect(slot, worker)
            elif time.monotonic() >= worker.deadline and (worker.job or not worker.ready):
                self._fail(slot, worker, f"timed out after {self.pool.timeout_s:g} s")

    def _collect(self, slot: int, worker: Worker) -> None:
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

    def _handle(self, worker: Worker, message: tuple[str, Any]) -> None:
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
            if self.report_progress:
                spans = worker.plan[0]
                with self.cond:
                    self.progress[worker.job.seq] = (worker.job.key, DecodeProgress(
                        len(worker.clips), 1 if spans is None else len(spans)))
                    self.cond.notify_all()
        elif kind == "log":  # what the decoder wrote to stderr, just before "done" or "error"
            worker.log = payload
        elif kind in ("done", "error"):
            task = worker.job
            assert task is not None, "a worker reported a result with no job"
            result = worker.result() if kind == "done" else payload
            if kind == "error" and task.first_failure:
                result = VideoDecodeError(task.path, f"{task.first_failure}; then {payload.reason}")
            self.pool.release(worker)
            self._finish(task, result)

    def _fail(self, slot: int, worker: Worker, reason: str) -> None:
        """Kill and forget the worker; fail (or, for decord under "auto", retry) its task."""
        task = worker.job
        self.pool.replace_worker(slot)
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
            self.retries.append(Task(task.seq, task.key, task.path, task.spans, task.num_frames,
                                      task.size, "pyav", first_failure=reason))  # fmt: skip
            return
        if task.first_failure:
            reason = f"{task.first_failure}; then pyav {reason}"
        self._finish(task, VideoDecodeError(task.path, reason))

    def _finish(self, task: Task, result: Result) -> None:
        with self.cond:
            self.done[task.seq] = (task.key, result)
            self.progress.pop(task.seq, None)
            self.cond.notify_all()

    def _abandon_busy(self) -> None:
        """Workers still busy when the run ends hold jobs nobody will read: replace them."""
        for slot, worker in enumerate(self.pool.slots()):
            if worker is not None and worker.job is not None:
                self.pool.replace_worker(slot)


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

