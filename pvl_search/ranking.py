"""The product's ranking rule, defined once: fuse retrieval and rerank scores, then rank
videos by their best segment in two tiers.

- A reranked segment scores its fused rerank score (`fuse`); any other segment keeps its
  retrieval similarity. The two are not on one scale, so a reranked segment is in the upper
  tier and ranks ahead of every segment that was only retrieved.
- A video's key is the best (tier, score) of its segments; videos rank by key.
- Ties: a rank counts them against the model (a video with an equal key ranks ahead of the
  target); an ordering of results breaks them by first appearance in retrieval order.

The searcher, `pvl-search eval` and validation during training all call these functions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

Fusion = Literal["calibrated", "sum", "rerank"]
FUSIONS: tuple[str, ...] = ("calibrated", "sum", "rerank")
FUSION_HELP = ("calibrated (default): rerank logit + retrieval similarity times the model's contrastive "
               "temperature, a product of experts; sum: logit + raw similarity; rerank: the logit alone.")


def fuse(sims: np.ndarray, logits: np.ndarray, fusion: Fusion, retrieval_scale: float = 1.0) -> np.ndarray:
    """The score of a reranked segment, from its retrieval similarity and its reranker logit.

    - "calibrated" (the default): logit + retrieval_scale * similarity. The retrieval scale is
      the model's contrastive temperature (`PerceiverVL.retrieval_scale`), so both terms are
      logits of a trained softmax and add as a product of experts: the reranker corrects
      retrieval where it is sure, and retrieval keeps the say where the reranker is not.
    - "sum": logit + similarity. The similarity's range (-1..1) is small beside a logit, so
      the reranker nearly decides alone.
    - "rerank": the logit alone.
    """
    logits = np.asarray(logits, np.float64)
    if fusion == "rerank":
        return logits
    weight = retrieval_scale if fusion == "calibrated" else 1.0
    return weight * np.asarray(sims, np.float64) + logits


@dataclass
class Keys:
    """Two-tier sort keys: tier (True = reranked) first, then score; higher is better. The
    last axis indexes entries (segments or videos); leading axes are independent queries."""

    tier: np.ndarray  # bool
    score: np.ndarray  # float64

    def _key(self, i: int | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if np.ndim(i) == 0:
            return self.tier[..., i, None], self.score[..., i, None]
        index = np.asarray(i, dtype=np.int64)[:, None]  # one entry per query row
        return np.take_along_axis(self.tier, index, -1), np.take_along_axis(self.score, index, -1)

    def at_least(self, i: int | np.ndarray) -> np.ndarray:
        """Which keys are >= key i (per row when i holds one index per query)."""
        tier, score = self._key(i)
        return (self.tier > tier) | ((self.tier == tier) & (self.score >= score))

    def above(self, i: int | np.ndarray) -> np.ndarray:
        """Which keys are strictly greater than key i."""
        tier, score = self._key(i)
        return (self.tier > tier) | ((self.tier == tier) & (self.score > score))

    def rank(self, target: int | np.ndarray) -> np.ndarray:
        """1-based rank of entry `target` (per row); ties count against it."""
        return self.at_least(target).sum(axis=-1)


def candidate_order(sims: np.ndarray, segment_ids: np.ndarray | None = None) -> np.ndarray:
    """Retrieval order: positions of segments by decreasing similarity, ties by increasing
    segment id. A reranker sees the first K of them."""
    sims = np.asarray(sims)
    ids = np.arange(len(sims)) if segment_ids is None else np.asarray(segment_ids)
    return np.lexsort((ids, -sims.astype(np.float64)))


def segment_keys(sims: np.ndarray, candidates: np.ndarray, rerank_scores: np.ndarray) -> Keys:
    """(S,) keys of segments: `candidates` (positions) were reranked to `rerank_scores`
    (already fused); the rest keep their similarity."""
    tier = np.zeros(len(sims), dtype=bool)
    score = np.asarray(sims, dtype=np.float64).copy()
    candidates = np.asarray(candidates, dtype=np.int64)
    tier[candidates] = True
    score[candidates] = np.asarray(rerank_scores, dtype=np.float64)
    return Keys(tier, score)


def video_keys(segments: Keys, segment_video: np.ndarray, n_videos: int) -> Keys:
    """(V,) keys of videos: each video's best segment key. segment_video (S,) in [0, V)."""
    segment_video = np.asarray(segment_video, dtype=np.int64)
    tier = np.zeros(n_videos, dtype=bool)
    np.logical_or.at(tier, segment_video, segments.tier)
    score = np.full(n_videos, -np.inf)
    same_tier = segments.tier == tier[segment_video]  # only the video's top tier counts
    np.maximum.at(score, segment_video[same_tier], segments.score[same_tier])
    return Keys(tier, score)


def best_segment_ranking(segments: Keys, segment_video: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Videos in rank order and the row of each one's best segment.

    segments: keys of segments listed in retrieval order; segment_video: any video labels.
    Returns (videos, rows): videos by decreasing key, ties by first appearance; rows[i] is the
    first row holding video i's best key."""
    labels, first_seen, dense = np.unique(np.asarray(segment_video), return_index=True, return_inverse=True)
    keys = video_keys(segments, dense, len(labels))
    is_best = (segments.tier == keys.tier[dense]) & (segments.score == keys.score[dense])
    best_rows = np.full(len(labels), -1, dtype=np.int64)
    rows = np.flatnonzero(is_best)
    best_rows[dense[rows[::-1]]] = rows[::-1]  # the first (lowest) row wins
    order = np.lexsort((first_seen, -keys.score, -keys.tier.astype(np.int8)))
    return labels[order], best_rows[order]


def twin_hits(keys: Keys, target: int, twins: np.ndarray) -> tuple[bool, bool]:
    """(within-group top-1, group R@1) of one query: `twins` (V,) bool marks its group's
    videos, the target included. Ties count against the model."""
    within = int((keys.at_least(target) & twins).sum()) == 1
    members = np.flatnonzero(twins)
    best_twin = members[np.lexsort((keys.score[members], keys.tier[members]))[-1]]
    group_first = not bool((keys.above(best_twin) & ~twins).any())
    return within, group_first


def ranks_after_rerank(first: np.ndarray, second: np.ndarray, target: Sequence[int], k: int) -> np.ndarray:
    """Ranks (Q,) of one-segment videos: the top `k` by `first` (Q, V) are reranked to
    `second` (Q, V, already fused); the rest keep their `first` score."""
    first = np.asarray(first, dtype=np.float64)
    top = np.argsort(-first, axis=1, kind="stable")[:, : min(k, first.shape[1])]
    tier = np.zeros(first.shape, dtype=bool)
    np.put_along_axis(tier, top, True, axis=1)
    keys = Keys(tier, np.where(tier, np.asarray(second, dtype=np.float64), first))
    return keys.rank(np.asarray(target, dtype=np.int64)).astype(np.int64)
