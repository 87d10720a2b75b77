"""Moments inside a result video: which stretches of it match the query, read from the
retrieval score of every segment of the video (one dot product each with the stored
embeddings, no decoding).

- The best moment grows from the segment the ranking chose: neighbours (in time) whose score
  is within `MERGE_MARGIN` of that segment's join it, so an event longer than one window is
  one moment with the start of its first window and the end of its last.
- Other strong moments: local peaks scoring within `OTHER_MARGIN` of the best, each grown the
  same way, at most `MAX_MOMENTS` in all, none sharing a second with another (windows overlap,
  so a peak next to a moment is that moment seen again, not another place).
- The timeline: the video's length cut into at most `TIMELINE_POINTS` equal steps, each the
  best score of the segments that cover the step's middle (what the page draws as a strip).

The margins were chosen on the moment benchmark's validation corpus (BENCHMARKS.md,
"Moments"); a score is a cosine in [-1, 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from indexer.store.records import VideoSegments

MERGE_MARGIN = 0.1
OTHER_MARGIN = 0.1
MAX_MOMENTS = 5
TIMELINE_POINTS = 120


@dataclass(frozen=True)
class Moment:
    start_s: float
    end_s: float
    score: float  # the best retrieval score (cosine) among its segments
    segment_id: int  # that segment: "more like this moment" searches with its embedding

    def to_dict(self) -> dict:
        return {"start_s": self.start_s, "end_s": self.end_s, "score": self.score, "segment_id": self.segment_id}


@dataclass(frozen=True)
class Timeline:
    """Scores along the video: `scores[i]` covers [i * step_s, (i + 1) * step_s)."""

    step_s: float
    scores: list[float]

    def to_dict(self) -> dict:
        return {"step_s": self.step_s, "scores": list(self.scores)}


def _grow(scores: np.ndarray, peak: int, margin: float, taken: np.ndarray) -> tuple[int, int]:
    """The run of rows around `peak` whose scores stay within `margin` of the peak's and that
    no earlier moment took."""
    floor = scores[peak] - margin
    lo = peak
    while lo > 0 and not taken[lo - 1] and scores[lo - 1] >= floor:
        lo -= 1
    hi = peak
    while hi < len(scores) - 1 and not taken[hi + 1] and scores[hi + 1] >= floor:
        hi += 1
    return lo, hi


def find_moments(
    segments: VideoSegments,
    scores: np.ndarray,
    best_id: int,
    *,
    merge_margin: float = MERGE_MARGIN,
    other_margin: float = OTHER_MARGIN,
    max_moments: int = MAX_MOMENTS,
) -> list[Moment]:
    """The video's moments, the one around segment `best_id` first (see the module doc).
    `scores[i]` belongs to `segments.ids[i]`."""
    scores = np.asarray(scores, np.float64)
    if len(scores) == 0:
        return []
    rows = np.flatnonzero(segments.ids == best_id)
    first = int(rows[0]) if len(rows) else int(np.argmax(scores))
    taken = np.zeros(len(scores), dtype=bool)
    moments = []
    for peak in [first, *np.argsort(-scores, kind="stable").tolist()]:
        if len(moments) >= max_moments:
            break
        if taken[peak] or (moments and scores[peak] < scores[first] - other_margin):
            continue
        neighbours = scores[max(peak - 1, 0) : peak + 2]
        if moments and scores[peak] < neighbours.max():
            continue  # a slope, not a peak: it belongs to a neighbour's moment
        lo, hi = _grow(scores, peak, merge_margin, taken)
        taken[lo : hi + 1] = True
        start, end = float(segments.starts[lo]), float(segments.ends[hi])
        if any(start < m.end_s and m.start_s < end for m in moments):
            continue  # overlapping windows: a stretch already shown, not another place
        moments.append(Moment(start, end, float(scores[peak]), int(segments.ids[peak])))
    return moments


def timeline(segments: VideoSegments, scores: np.ndarray, duration: float | None,
             points: int = TIMELINE_POINTS) -> Timeline:
    """The video's scores on an even grid of at most `points` steps (see the module doc);
    a step no segment covers scores the lowest score of the video."""
    scores = np.asarray(scores, np.float64)
    if len(scores) == 0:
        return Timeline(0.0, [])
    length = max(float(duration or 0.0), float(segments.ends.max()), 1e-6)
    step = length / points
    middles = (np.arange(points) + 0.5) * step
    covers = (segments.starts[None, :] <= middles[:, None]) & (middles[:, None] < segments.ends[None, :])
    grid = np.where(covers, scores[None, :], -np.inf).max(axis=1)
    grid[~np.isfinite(grid)] = scores.min()
    return Timeline(round(step, 4), [round(float(v), 4) for v in grid])
