"""Shots: where a video cuts from one scene to the next, and one window per shot.

A fixed grid of windows starts wherever the grid falls, so the window nearest an event that
begins at a cut usually holds the end of the shot before or misses the event's first moments
(an object popping into view, the first of two actions). Measured on the moment benchmark's
validation corpus (BENCHMARKS.md, "Moments"): for the captions whose video was missed, the
clip cut exactly at the event's edges matched the caption far better than any grid window
(cosine 0.55-0.82 against 0.38-0.68). So besides the grid, each shot gets a window of its own,
cut at its edges.

Cuts are found from small frames (`CUT_SIZE` pixels square, at most `CUT_FPS` frames a
second): the mean absolute change between consecutive frames jumps at a cut, well above the
motion within a shot. A frame change counts as a cut when it is at least `CUT_MIN_CHANGE`
(on 0-255 pixels) and `CUT_RATIO` times the video's median change.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pvl_search.media.types import Span

CUT_SIZE = 32
CUT_FPS = 8.0
CUT_MIN_CHANGE = 12.0
CUT_RATIO = 4.0
_BATCH = 256  # frames decoded at once
# A shot shorter than this share of the window is a flash, not an event of its own; one longer
# than MAX_SHOT_WINDOWS windows gets windows at its two edges (the grid covers its middle).
MIN_SHOT_FRACTION = 0.5
MAX_SHOT_WINDOWS = 2.0
_SAME_SPAN_S = 0.05  # a shot window this close to a grid window at both ends is that window


def detect_cuts(path: str | Path) -> list[float]:
    """Times (seconds) at which a new shot starts, in order. A video decord cannot read gets
    none (its grid windows still cover it)."""
    from pvl_search.media.decoders import DecordReader
    from pvl_search.media.types import VideoDecodeError

    try:
        reader = DecordReader(Path(path), (CUT_SIZE, CUT_SIZE), threads=1)
    except VideoDecodeError:
        return []
    times = reader.times
    if len(times) < 2:
        return []
    fps = (len(times) - 1) / max(float(times[-1] - times[0]), 1e-6)
    step = max(1, int(round(fps / CUT_FPS)))
    indices = np.arange(0, len(times), step)
    changes = []
    previous = None
    try:
        for start in range(0, len(indices), _BATCH):
            batch = reader.reader.get_batch(indices[start : start + _BATCH].tolist()).asnumpy().astype(np.float32)
            frames = batch if previous is None else np.concatenate([previous[None], batch])
            changes.append(np.abs(np.diff(frames, axis=0)).mean(axis=(1, 2, 3)))
            previous = batch[-1]
    except Exception:  # noqa: BLE001 - a decode failure mid-file: the grid alone covers it
        return []
    change = np.concatenate(changes)
    threshold = max(CUT_MIN_CHANGE, CUT_RATIO * float(np.median(change)))
    # Change i is between sampled frames i and i + 1: the new shot starts at frame i + 1.
    return [float(times[indices[i + 1]]) for i in np.flatnonzero(change >= threshold)]


def shot_spans(cuts: Sequence[float], duration: float, window_s: float) -> list[Span]:
    """One window per shot between `cuts`: the whole shot when it is an event's length, its
    first and last `window_s` when it is longer; shots too short to hold an event get none. A
    video that never cuts gets none: its grid windows are all it has to offer."""
    inside = [c for c in cuts if 0.0 < c < duration]
    if not inside:
        return []
    bounds = [0.0, *inside, float(duration)]
    spans: list[Span] = []
    for start, end in zip(bounds, bounds[1:]):
        length = end - start
        if length < MIN_SHOT_FRACTION * window_s:
            continue
        if length <= MAX_SHOT_WINDOWS * window_s:
            spans.append((start, end))
        else:
            spans += [(start, start + window_s), (end - window_s, end)]
    return spans


def with_shots(grid: Sequence[Span], shots: Sequence[Span]) -> list[Span]:
    """The grid's windows and the shot windows that are not one of them, in time order."""
    extra = [s for s in shots
             if not any(abs(s[0] - g[0]) < _SAME_SPAN_S and abs(s[1] - g[1]) < _SAME_SPAN_S for g in grid)]
    return sorted([*grid, *extra])
