"""Moment retrieval metrics, as Charades-STA and QVHighlights report them: each caption with a
known time span (`meta["moments"]` of its video, one [start_s, end_s] per caption, as
`pvl-search synth --long` writes) is searched with the engine's defaults, exactly as a user
would, and its first result is scored.

- video R@1: the first result is the caption's video;
- R@1 at IoU >= 0.5 and >= 0.7: that, and the result's best moment overlaps the true span by
  at least that intersection over union;
- median start error: |moment start - true start|, in seconds, over captions whose video came
  first;
- any-moment R@1 at IoU >= 0.5: the right video first and any of its returned moments (not only
  the best) overlapping enough.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from indexer.evaluate.report import MomentReport
from indexer.search.searcher import Searcher
from pvl_search.data.captions import CaptionRecord

MOMENTS_KEY = "moments"


@dataclass(frozen=True)
class MomentQuery:
    caption: str
    path: str  # the video's real path
    start_s: float
    end_s: float


def moment_queries(records: Iterable[CaptionRecord], split: str) -> list[MomentQuery]:
    """The captions of `split` whose video records a time span for each caption."""
    queries = []
    for r in records:
        spans = r.meta.get(MOMENTS_KEY) if isinstance(r.meta, dict) else None
        if r.split != split or not isinstance(spans, list) or len(spans) != len(r.captions):
            continue
        real = os.path.realpath(r.path)
        queries += [MomentQuery(c, real, float(s[0]), float(s[1])) for c, s in zip(r.captions, spans)]
    return queries


def iou(a: tuple[float, float], b: tuple[float, float]) -> float:
    """Intersection over union of two time spans (0 when they do not meet)."""
    inter = max(0.0, min(a[1], b[1]) - max(a[0], b[0]))
    union = max(a[1], b[1]) - min(a[0], b[0])
    return inter / union if union > 0 else 0.0


def evaluate_moments(searcher: Searcher, queries: list[MomentQuery],
                     progress: Callable[[int, int], None] | None = None) -> MomentReport:
    """Search each caption with the defaults and score its first result (see the module doc)."""
    found = iou50 = iou70 = any50 = moments = 0
    errors, ms = [], []
    for done, q in enumerate(queries, start=1):
        began = time.perf_counter()
        hits = searcher.search(q.caption, k=1).hits
        ms.append((time.perf_counter() - began) * 1000)
        if hits and os.path.realpath(hits[0].path) == q.path and hits[0].moments:
            truth = (q.start_s, q.end_s)
            best = hits[0].moments[0]
            overlap = iou((best.start_s, best.end_s), truth)
            found += 1
            iou50 += overlap >= 0.5
            iou70 += overlap >= 0.7
            any50 += any(iou((m.start_s, m.end_s), truth) >= 0.5 for m in hits[0].moments)
            errors.append(abs(best.start_s - q.start_s))
        moments += len(hits[0].moments) if hits else 0
        if progress:
            progress(done, len(queries))
    n = max(len(queries), 1)
    return MomentReport(
        len(queries), 100 * found / n, 100 * iou50 / n, 100 * iou70 / n,
        float(np.median(errors)) if errors else None, 100 * any50 / n, moments / n,
        float(np.median(ms)) if ms else 0.0,
    )
