"""The garbage collector of a long-running server process, set once it has started.

A loaded server holds about 505,000-520,000 Python objects (torch, FastAPI, the index reader's
row caches) that live as long as it does. Python's full (generation 2) collection walks all of
them: under 16 clients one took 300 ms, holding the interpreter lock, so every request in
flight waited it out; and requests' short-lived objects set off a young collection about every
six requests (BENCHMARKS.md, "Garbage collection in a loaded server", `benchmarks/gc_pause.py`).
Freezing what start-up made moves it out of the collector's sight (it is never garbage), so a
full collection walks only what requests made since; a larger young generation collects less
often at the same cost per object.
"""

from __future__ import annotations

import gc

YOUNG_THRESHOLD = 10_000  # allocations between young collections (Python's default: 700)


def settle_heap() -> int:
    """Collect once, freeze every object left (start-up's: the model, the index, the app) and
    raise the young generation's threshold; returns how many objects were frozen."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, old)
    return gc.get_freeze_count()
