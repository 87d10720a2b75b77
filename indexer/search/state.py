"""What a searcher keeps between requests: the cache of query encodings, and the lock that
lets requests share the open index while a reopened one is swapped in."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

QUERY_CACHE = 1024  # query encodings kept (a few KB each)


@dataclass(frozen=True)
class EncodedQuery:
    """One query's encoding, as cached (shared by every request with this text: never
    written to)."""

    embedding: np.ndarray  # (d,)
    rerank_state: np.ndarray  # (D + H,)
    truncated: bool
    latents: np.ndarray | None  # (N, D), for the latent reranker


class QueryCache:
    """Least-recently-used query encodings by text: the same words under other filters or
    another k are not encoded again. Safe to share between threads."""

    def __init__(self, size: int = QUERY_CACHE) -> None:
        self.size = size
        self._items: OrderedDict[str, EncodedQuery] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, text: str) -> EncodedQuery | None:
        with self._lock:
            item = self._items.get(text)
            if item is not None:
                self._items.move_to_end(text)
            return item

    def put(self, text: str, item: EncodedQuery) -> None:
        if self.size <= 0:
            return
        with self._lock:
            self._items[text] = item
            self._items.move_to_end(text)
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


class SharedLock:
    """Held shared by every operation on the open index, exclusively to swap it for a
    reopened one; a waiting swap goes before new shared holders (or it could wait forever)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._shared = 0
        self._exclusive = False
        self._waiting = 0

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._exclusive and not self._waiting)
            self._shared += 1
        try:
            yield
        finally:
            with self._cond:
                self._shared -= 1
                self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._waiting += 1
            self._cond.wait_for(lambda: not self._exclusive and not self._shared)
            self._waiting -= 1
            self._exclusive = True
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()
