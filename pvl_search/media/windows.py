"""How a video is cut into segments: windows of a few seconds, each one vector in the index.
The defaults live here, once (the indexer, its options and the CLI read them). Light on purpose:
the CLI imports it before it knows whether a command needs the model."""

from __future__ import annotations

import math
from dataclasses import dataclass

from pvl_search.media.types import Span

# Windows follow the model: a window is as long as the clips it was trained on (its folder's
# clip.json), since a window that blurs several events into one embedding matches none of
# their captions. On the moment benchmark (BENCHMARKS.md, "Moments"), the shipped model found
# the caption's long video first for 12.5 % of captions with 10 s windows and 84.2 % with its
# own 3 s.
#
# Besides the grid, each shot gets a window cut at its edges (SHOTS; pvl_search/media/shots.py):
# on the benchmark's validation corpus that took the video found first from 83.2 % (3 s every
# 1.29 s, no shot windows) to 98.4 % (the same grid with them), and with shot windows a sparser
# grid did as well or better (2.0 s: 100 %, 2.4 s: 99.5 %, 3.0 s: 100 %). The stride is the
# share of the window that keeps the grid dense enough for events inside one long shot (which
# the grid alone must find: strides of 1.5 / 1.3 / 1.0 s found 76.1 / 84.2 / 91.8 % there
# without shot windows) within the budget of 4x the segments of the old 10 s / 5 s windows.
STRIDE_FRACTION = 2 / 3
SHOTS = True
LEGACY_WINDOW_S = 10.0
LEGACY_STRIDE_S = 5.0
DEFAULT_WINDOW_S = LEGACY_WINDOW_S  # the dataclass default below (tests, benchmarks)
DEFAULT_STRIDE_S = LEGACY_STRIDE_S


@dataclass(frozen=True)
class Windows:
    """Cut the video into `segment_spans(duration, window_s, stride_s)`: spans decided by the
    decoding process itself, which reads the duration (the indexer never opens a file in its
    own process, where a bad file could crash it)."""

    window_s: float = DEFAULT_WINDOW_S
    stride_s: float = DEFAULT_STRIDE_S
    # Also one window per shot, cut at the shot's edges (pvl_search/media/shots.py).
    shots: bool = False


def segment_spans(
    duration: float, window_s: float = DEFAULT_WINDOW_S, stride_s: float = DEFAULT_STRIDE_S
) -> list[Span]:
    """Cut [0, duration] into windows of `window_s` seconds at most `stride_s` apart.

    A video no longer than one window is one span covering all of it. Longer videos get
    ceil((duration - window) / stride) + 1 windows spread evenly, so the first starts at 0,
    the last ends exactly at `duration`, and no window is a near-copy of its neighbour (as a
    fixed stride plus one extra window snapped to the end would give).
    """
    if window_s <= 0 or stride_s <= 0:
        raise ValueError(f"window_s and stride_s must be positive, got {window_s}, {stride_s}")
    if duration <= window_s:
        return [(0.0, float(max(duration, 0.0)))]
    count = math.ceil((duration - window_s) / stride_s - 1e-9) + 1
    step = (duration - window_s) / (count - 1)
    return [(i * step, i * step + window_s) for i in range(count - 1)] + [
        (duration - window_s, float(duration))
    ]


def model_windows(clip_s: float | None) -> Windows:
    """The default windows for a model trained on clips of `clip_s` seconds (None: unknown,
    the legacy 10 s / 5 s), with a window per shot."""
    if clip_s is None:
        return Windows(LEGACY_WINDOW_S, LEGACY_STRIDE_S)
    return Windows(float(clip_s), round(float(clip_s) * STRIDE_FRACTION, 3), shots=SHOTS)
