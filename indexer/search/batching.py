"""Dynamic batching of search requests that arrive together (the server's query path).

Callers on many threads `submit` a request and block until its answer. One worker thread
takes the first waiting request, waits at most `window_s` from that request's arrival for
others (fewer if `max_batch` are waiting), and answers them with one call of `answer`
(`Searcher.run_many`: one text-encoder call for the batch). A request that finds the batcher
idle is answered at once, and requests that queued while a batch ran go in the next batch at
once. Idle means: no batch ended within the window before the request arrived, or the request
before it arrived more than a window earlier (one client searching back to back: its next
request always comes just after its last answer, and waiting for company it will never get
cost it the whole window, BENCHMARKS.md "Served queries").

Single-stream rerank requests decode every candidate again (seconds): they are answered
after the rest of their batch, each on its own, so they never hold back the fast ones.
If a batch fails as a whole, each of its requests is answered alone, so one request's
error never becomes another's.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TypeVar

from indexer.search.request import SearchRequest, is_slow
from indexer.search.searcher import SearchResult

T = TypeVar("T")
BATCH_WINDOW_S = 0.005  # a few ms: next to a text-encoder call, and far below a person's notice
MAX_BATCH = 16


@dataclass
class _Job:
    request: SearchRequest
    arrived: float
    previous: float = float("-inf")  # when the request before it arrived (monotonic)
    done: threading.Event = field(default_factory=threading.Event)
    result: SearchResult | None = None
    error: BaseException | None = None


@dataclass
class BatchStats:
    batches: int = 0  # calls of `answer`
    requests: int = 0
    largest: int = 0  # requests in the largest batch
    waited: int = 0  # batches whose first request waited for company (the window)


class QueryBatcher:
    """Answers concurrent search requests in batches; see the module doc. Use as a context
    manager, or `close()` it: waiting requests are still answered, later ones refused."""

    def __init__(
        self,
        answer: Callable[[Sequence[SearchRequest]], list[SearchResult]],
        *,
        window_s: float = BATCH_WINDOW_S,
        max_batch: int = MAX_BATCH,
        slow: Callable[[SearchRequest], bool] | None = None,
        idle_at_once: bool = True,
    ) -> None:
        if window_s < 0 or max_batch < 1:
            raise ValueError(f"batch window must be >= 0 s and the batch limit >= 1 (got {window_s}, {max_batch})")
        self.answer = answer
        # Whether a request resolves to a slow reranker (Searcher.is_slow); by default the mode
        # it names.
        self.slow = slow or (lambda request: is_slow(request.rerank))
        self.window_s = window_s
        self.max_batch = max_batch
        # A request that finds the batcher idle (no batch ended within the window before it
        # arrived) is answered at once: waiting could only add the window to a lone request
        # (BENCHMARKS.md, "Served queries"). Under load requests queue while a batch runs and
        # still go in the next batch together.
        self.idle_at_once = idle_at_once
        self._last_done = float("-inf")  # when the last batch ended (monotonic)
        self._last_arrival = float("-inf")  # when the latest request arrived (monotonic)
        self._calls: deque[tuple[Callable[[], object], Future]] = deque()  # `call`s not run yet
        self.stats = BatchStats()
        self._queue: deque[_Job] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._worker = threading.Thread(target=self._loop, name="pvl-query-batcher", daemon=True)
        self._worker.start()

    def submit(self, request: SearchRequest) -> SearchResult:
        """The answer to `request` (blocks); raises what answering it raised."""
        job = _Job(request, time.monotonic())
        with self._cond:
            if self._closed:
                raise RuntimeError("the query batcher is closed")
            job.previous, self._last_arrival = self._last_arrival, job.arrived
            self._queue.append(job)
            self._cond.notify_all()
        job.done.wait()
        if job.error is not None:
            raise job.error
        assert job.result is not None
        return job.result

    def call(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the worker thread, between batches, and return what it returned (or raise
        what it raised). A process's torch work belongs on one thread: a second thread running
        torch's OpenMP beside the first's pool ran the same search 2x slower on 2 cores
        (BENCHMARKS.md, "Served queries"), so `serve` loads the model here."""
        future: Future = Future()
        with self._cond:
            if self._closed:
                raise RuntimeError("the query batcher is closed")
            self._calls.append((fn, future))
            self._cond.notify_all()
        return future.result()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._worker is not threading.current_thread():
            self._worker.join()

    def __enter__(self) -> QueryBatcher:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _run_calls(self) -> None:
        while True:
            with self._cond:
                if not self._calls:
                    return
                fn, future = self._calls.popleft()
            try:
                future.set_result(fn())
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                future.set_exception(exc)

    def _next_batch(self) -> list[_Job] | None:
        self._run_calls()
        with self._cond:
            self._cond.wait_for(lambda: self._queue or self._calls or self._closed)
            if self._calls:
                return []  # run them first (the loop comes back here)
            if not self._queue:
                return None  # closed and drained
            first = self._queue[0]
            quiet = first.arrived - self._last_done > self.window_s or first.arrived - first.previous > self.window_s
            idle = self.idle_at_once and len(self._queue) == 1 and quiet
            deadline = first.arrived if idle else first.arrived + self.window_s
            waited = False
            while len(self._queue) < self.max_batch and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                waited = True
                self._cond.wait(left)  # woken by each new request, to count them
            self.stats.waited += waited
            return [self._queue.popleft() for _ in range(min(self.max_batch, len(self._queue)))]

    def _loop(self) -> None:
        while (batch := self._next_batch()) is not None:
            if not batch:
                continue
            slow = [self.slow(job.request) for job in batch]
            fast = [job for job, is_slow_job in zip(batch, slow) if not is_slow_job]
            if fast:
                self._run(fast)
            for job, is_slow_job in zip(batch, slow):
                if is_slow_job:
                    self._run([job])
            self._last_done = time.monotonic()

    def _run(self, jobs: list[_Job]) -> None:
        self.stats.batches += 1
        self.stats.requests += len(jobs)
        self.stats.largest = max(self.stats.largest, len(jobs))
        try:
            results = self.answer([job.request for job in jobs])
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting caller(s)
            if len(jobs) > 1:
                for job in jobs:  # whose error it is: answer each alone
                    self._run([job])
                return
            jobs[0].error = exc
            jobs[0].done.set()
            return
        for job, result in zip(jobs, results):
            job.result = result
            job.done.set()
