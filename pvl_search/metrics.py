"""Text-to-video retrieval metrics, MSR-VTT convention: one ground-truth video per caption,
ranks are 1-based, and ties are counted against the model (a video scoring the same as the
ground truth ranks ahead of it)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np


@dataclass
class RetrievalMetrics:
    r1: float  # percent of queries whose video ranks first
    r5: float
    r10: float
    median_rank: float
    mean_rank: float
    queries: int

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def ranks_from_scores(scores: np.ndarray, target: Sequence[int]) -> np.ndarray:
    """scores (Q, V), higher is better; target[q] = column of query q's video -> ranks (Q,)."""
    scores = np.asarray(scores, dtype=np.float64)
    target = np.asarray(target, dtype=np.int64)
    if scores.ndim != 2 or len(target) != scores.shape[0]:
        raise ValueError(f"scores must be (queries, videos) with one target per query; got {scores.shape}")
    truth = scores[np.arange(len(target)), target][:, None]
    at_least_as_good = (scores >= truth).sum(axis=1)  # includes the target itself
    return at_least_as_good.astype(np.int64)


def retrieval_metrics(ranks: Sequence[int]) -> RetrievalMetrics:
    ranks = np.asarray(ranks, dtype=np.int64)
    if ranks.size == 0:
        raise ValueError("no queries to evaluate")
    if (ranks < 1).any():
        raise ValueError("ranks are 1-based")
    recall = {k: float((ranks <= k).mean() * 100) for k in (1, 5, 10)}
    return RetrievalMetrics(
        r1=recall[1],
        r5=recall[5],
        r10=recall[10],
        median_rank=float(np.median(ranks)),
        mean_rank=float(ranks.mean()),
        queries=int(ranks.size),
    )


def ranks_after_rerank(first: np.ndarray, second: np.ndarray, target: Sequence[int], k: int) -> np.ndarray:
    """Two-stage ranks: the top `k` videos by `first` (Q, V) are re-ordered by `second`
    (Q, V); a target outside the top k keeps its first-stage rank (which is > k)."""
    first = np.asarray(first, dtype=np.float64)
    second = np.asarray(second, dtype=np.float64)
    ranks = ranks_from_scores(first, target)
    k = min(k, first.shape[1])
    top = np.argsort(-first, axis=1, kind="stable")[:, :k]  # (Q, k)
    rescored = np.take_along_axis(second, top, axis=1)
    truth = second[np.arange(len(target)), np.asarray(target)][:, None]
    inside = ranks <= k
    ranks[inside] = (rescored >= truth).sum(axis=1)[inside]
    return ranks
