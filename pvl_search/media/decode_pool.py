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

The pool (this module) owns the worker processes; the dispatcher thread and the ordered
results are decode_dispatch.py (it drives the pool through the `WorkerSlots` methods), and
the code the workers run is decode_worker.py.

Frames come back as uint8 (4x smaller to pickle than float). Memory held by the pool is
about prefetch x spans per job x F x S x S x 3 bytes: submit an hour-long film as several
jobs of a few dozen spans each rather than as one job of 720 spans.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import threading
import time
from collections.abc import Hashable, Iterable, Iterator

from pvl_search.media.backends import BACKENDS, Backend
from pvl_search.media.decode_dispatch import DecodeProgress, DecodeRun, Job, Result, Task, Worker
from pvl_search.media.decode_worker import DecoderLog, worker_main
from pvl_search.media.types import Fit
from pvl_search.media.windows import Windows

_STARTUP_TIMEOUT_S = 120.0  # a fresh worker must say "ready" within this (imports included)
_PRELOAD = ["pvl_search.media.decode_pool"]  # imports torch, PyAV and decord once in the forkserver


class DecodePool:
    """Worker processes decoding (key, path, spans, num_frames, size) jobs; see the module doc.

    Use as a context manager; `imap` yields (key, DecodedVideo | VideoDecodeError) per job.
    The dispatcher of each imap drives the worker slots through the `WorkerSlots` methods
    (decode_dispatch.py) at the end of the class.
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
        self._slots: list[Worker | None] = [None] * workers
        self._lock = threading.Lock()
        self._run: DecodeRun | None = None
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

    def imap(
        self, jobs: Iterable[Job], *, progress: bool = False
    ) -> Iterator[tuple[Hashable, Result | DecodeProgress]]:
        """Start decoding `jobs` now; yield (key, result) in submission order as results arrive.

        `jobs` is consumed lazily from a background thread. One imap at a time per pool.
        Stopping early (break, close(), leaving the with-block) kills the work in flight.
        `progress`: also yield (key, DecodeProgress) as the clips of jobs still being decoded
        arrive, so that a consumer waiting on a long file can show it moving.
        """
        if self._closed:
            raise RuntimeError("DecodePool is closed")
        if self._run is not None and not self._run.finished:
            raise RuntimeError("another imap of this pool is still running")
        self._run = DecodeRun(self, iter(jobs), progress)
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

    # --- the worker slots, as DecodeRun drives them (decode_dispatch.WorkerSlots) ---

    def slots(self) -> list[Worker | None]:
        """The worker in each slot (None: empty), as a list of its own."""
        with self._lock:
            return list(self._slots)

    def start_worker(self, slot: int) -> Worker:
        """A fresh worker process in `slot`; it sends "ready" once it can take a task."""
        parent_end, child_end = self._context.Pipe(duplex=True)
        process = self._context.Process(
            target=worker_main, args=(child_end, self.fit), name=f"pvl-decode-{slot}", daemon=True
        )
        process.start()
        child_end.close()
        worker = Worker(process, parent_end, time.monotonic() + _STARTUP_TIMEOUT_S)
        with self._lock:
            self._slots[slot] = worker
        return worker

    def replace_worker(self, slot: int) -> None:
        """Kill the worker in `slot`, if any, and leave the slot empty."""
        with self._lock:
            worker, self._slots[slot] = self._slots[slot], None
        if worker is not None:
            _kill(worker)

    def assign(self, worker: Worker, task: Task) -> None:
        """Record that `worker` decodes `task` from now on, with no clips yet."""
        with self._lock:  # in_flight() reads the jobs from the consumer's thread
            worker.job, worker.clips, worker.log = task, [], DecoderLog()
            worker.plan = (None if isinstance(task.spans, Windows) else task.spans, None)

    def release(self, worker: Worker) -> None:
        """Record that `worker` has finished its task and is idle."""
        with self._lock:
            worker.job, worker.clips = None, []


def _kill(worker: Worker) -> None:
    """SIGKILL (a hung decord holds the GIL and ignores SIGTERM handlers), then reap."""
    with contextlib.suppress(Exception):
        if worker.process.is_alive():
            worker.process.kill()
        worker.process.join(5.0)
    with contextlib.suppress(Exception):
        worker.conn.close()
    with contextlib.suppress(Exception):
        worker.process.close()
