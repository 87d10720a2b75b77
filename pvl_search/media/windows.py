"""How a video is cut into segments: windows of a few seconds, each one vector in the index.
The defaults live here, once (the indexer, its options and the CLI read them). Light on purpose:
the CLI imports it before it knows whether a command needs the model."""

from __future__ import annotations

import math
from dataclasses import dataclass

from pvl_search.media.types import Span

# Segments: 8 frames over 10 s is 0.8 frames/s, about the density the paper samples MSR-VTT
# clips at (8 frames over 10-30 s), and 10 s is the length of a one-sentence event. A 5 s
# stride (half a window) puts every event of up to 5 s wholly inside some window. Clips of
# 10 s or less stay one segment; an hour of film becomes about 720 segments.
DEFAULT_WINDOW_S = 10.0
DEFAULT_STRIDE_S = 5.0


@dataclass(frozen=True)
class Windows:
    """Cut the video into `segment_spans(duration, window_s, stride_s)`: spans decided by the
    decoding process itself, which reads the duration (the indexer never opens a file in its
    own process, where a bad file could crash it)."""

    window_s: float = DEFAULT_WINDOW_S
    stride_s: float = DEFAULT_STRIDE_S


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
