"""How server.py turns what the library raises into HTTP answers: domain errors into 400, 404
and 503 with a one-line reason, anything unexpected into a logged 500 (never a traceback), and
the gate that lets only a few single-stream rerank requests run at once (429 for the rest)."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from fastapi import HTTPException

from indexer.errors import IndexStoreError, NotFoundError
from indexer.search.request import SearchError
from indexer.store.media_files import MediaNotFound

log = logging.getLogger("pvl_search.server")

T = TypeVar("T")


def internal_error(exc: BaseException) -> HTTPException:
    log.error("internal error: %s: %s", type(exc).__name__, exc, exc_info=exc)
    return HTTPException(status_code=500, detail="internal error")


def guarded(fn: Callable[[], T]) -> T:
    """Run `fn`; domain errors -> 400/503, anything else -> 500."""
    try:
        return fn()
    except HTTPException:
        raise
    except SearchError as exc:
        raise HTTPException(status_code=400, detail=str(exc)) from None
    except (IndexStoreError, OSError) as exc:  # index missing, unreadable, database down
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        log.warning("index unavailable: %s", reason)
        raise HTTPException(status_code=503, detail=reason, headers={"Retry-After": "5"}) from None
    except Exception as exc:
        raise internal_error(exc) from None


def found(lookup: Callable[[], T]) -> T:
    """`guarded`, with nothing there (an unknown video or segment, a media file that cannot be
    served) -> 404."""
    def run() -> T:
        try:
            return lookup()
        except (NotFoundError, MediaNotFound) as exc:
            raise HTTPException(status_code=404, detail=str(exc)) from None

    return guarded(run)


class SingleStreamGate:
    """Single-stream rerank decodes and re-encodes every candidate: at most `slots` run at
    once, and a request finding every slot taken is turned away at once (429) rather than
    queued in front of the plain searches, which then wait for at most `slots` of them."""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self._free = threading.BoundedSemaphore(slots)
        self._last_seconds = 1.0  # how long the last one took: the Retry-After hint

    def run(self, fn: Callable[[], T]) -> T:
        if not self._free.acquire(blocking=False):
            raise HTTPException(status_code=429, headers={"Retry-After": str(max(1, math.ceil(self._last_seconds)))},
                                detail=f"busy: {self.slots} single-stream rerank request(s) running; "
                                "retry later or use rerank=mixed")
        try:
            started = time.monotonic()
            result = fn()
            self._last_seconds = time.monotonic() - started
            return result
        finally:
            self._free.release()
