"""A server's collector after start-up (pvl_web/heap.py): start-up's objects are frozen out of
the collector's walks, and garbage made afterwards is still collected."""

from __future__ import annotations

import gc
import weakref

from pvl_web.heap import YOUNG_THRESHOLD, settle_heap


class Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the collector frees it


def test_settle_heap_freezes_what_start_up_made_and_still_collects_later_garbage() -> None:
    before = gc.get_threshold()
    start_up = [[i] for i in range(50_000)]  # objects a server's start-up leaves alive
    try:
        frozen = settle_heap()
        assert frozen >= 50_000 and gc.get_freeze_count() == frozen
        assert gc.get_threshold() == (YOUNG_THRESHOLD, *before[1:])
        walked = gc.get_objects()
        assert not any(obj is start_up for obj in walked)  # a full collection no longer walks them
        assert len(walked) < 50_000

        later = Node()
        gone = weakref.ref(later)
        del later
        gc.collect()
        assert gone() is None
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
    assert any(obj is start_up for obj in gc.get_objects())  # unfrozen: walked again
