"""Text-to-video retrieval metrics, MSR-VTT convention: one ground-truth video per caption,
ranks are 1-based, and ties are counted against the model (a video scoring the same as the
ground truth ranks ahead of it)."""

from __future__ import annotations

import math
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


@dataclass
class PairedChange:
    """How a method changes top-1 results against a baseline on the same queries."""

    gained: int  # queries ranked first by the method, not by the baseline
    lost: int  # the reverse
    p_value: float  # exact two-sided sign test on gained vs lost (ties ignored)


def paired_top1_change(baseline_ranks: Sequence[int], ranks: Sequence[int]) -> PairedChange:
    """Compare R@1 of two methods query by query: a gain of a few points on a few hundred
    queries is often noise, and this says how often."""
    base = np.asarray(baseline_ranks) == 1
    new = np.asarray(ranks) == 1
    if base.shape != new.shape:
        raise ValueError("both methods must rank the same queries")
    gained, lost = int((new & ~base).sum()), int((base & ~new).sum())
    n = gained + lost
    tail = sum(math.comb(n, i) for i in range(max(gained, lost), n + 1))
    p_value = 1.0 if n == 0 else min(1.0, 2 * tail / 2**n)
    return PairedChange(gained, lost, float(p_value))


def group_metrics(scores: np.ndarray, target: Sequence[int], groups: Sequence[str]) -> dict[str, float]:
    """Twin-group diagnostics, in percent: `within_group_top1` (the query's own video scores
    above every other video of its group; chance 1/group size) and `group_r1` (no video of
    another group scores above the best of the query's group)."""
    scores = np.asarray(scores, dtype=np.float64)
    target = np.asarray(target, dtype=np.int64)
    labels = np.unique(np.asarray(groups), return_inverse=True)[1]
    same = labels[None, :] == labels[target][:, None]  # (Q, V)
    truth = scores[np.arange(len(target)), target]
    within = ((scores >= truth[:, None]) & same).sum(1) == 1  # ties count against the model
    best_in_group = np.where(same, scores, -np.inf).max(1)
    group_first = ~((scores > best_in_group[:, None]) & ~same).any(1)
    return {"within_group_top1": float(within.mean() * 100), "group_r1": float(group_first.mean() * 100)}
