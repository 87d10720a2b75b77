"""Can a model tell a synthetic scene from its hard-negative twins?

For every caption of a split: is its own video the top-scoring one among the videos of its
group (the scene with events swapped, colours swapped, both; chance 25% for groups of four),
and is its group the top-scoring group (group R@1)? Against each kind of twin alone (order
swapped, colours swapped), how often does its own video score higher (chance 50)? Scores:
multi-stream similarity, mixed-stream logit, latent-reranker logit (when the model has one),
and "fused": what the search default scores (pvl_search.ranking.fuse, calibrated, of
retrieval and the latent reranker, or the mixed one without it).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pvl_search.data.captions import load_captions
from pvl_search.data.pairs import PairSet, build_frame_cache
from pvl_search.metrics import group_metrics
from pvl_search.model.checkpoint import load_model
from pvl_search.model.perceiver import PerceiverVL
from pvl_search.model.tokenizer import Tokenizer
from pvl_search.ranking import fuse
from pvl_search.training.validation import score_matrices


def twin_scores(model: PerceiverVL, data: PairSet) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """(Q, V) score matrices per method (multi, mixed, latent when the model has one, and
    fused: the search default's score of every pair) and the column of each query's own video."""
    by_method, owners = score_matrices(model, data)
    reranker = by_method.get("latent", by_method["mixed"])
    by_method["fused"] = fuse(by_method["multi"], reranker, "calibrated", model.retrieval_scale)
    return by_method, np.asarray(owners)


def pairwise_report(score: np.ndarray, owners: np.ndarray, keys: list[str],
                    twins: dict[str, dict[str, str]]) -> dict[str, float]:
    """Per kind of twin (e.g. order, binding): how often a caption scores its own video above
    that one twin, in percent (chance 50). Says which factor the model cannot see."""
    row = {key: i for i, key in enumerate(keys)}
    wins: dict[str, list[bool]] = {}
    for q, video in enumerate(owners):
        for factor, twin in twins.get(keys[video], {}).items():
            if twin in row:
                wins.setdefault(factor, []).append(bool(score[q, video] > score[q, row[twin]]))
    return {f"vs_{factor}_twin": float(np.mean(w) * 100) for factor, w in sorted(wins.items())}


def twin_accuracy(model_dir: str | Path, captions: str | Path, split: str, cache: str | Path) -> dict:
    """Within-group top-1, group R@1 and the pairwise rates of a model folder on one split of
    a `pvl-search synth` captions file (frames cached in `cache`, reused when complete)."""
    model = load_model(model_dir).eval()
    records = [r for r in load_captions(captions) if r.split == split and "group" in r.meta]
    frame_cache, _ = build_frame_cache([(r.video_id, str(r.path)) for r in records], cache,
                                       frames=model.config.frames, size=model.config.frame_size)
    data = PairSet(frame_cache, {r.video_id: r.captions for r in records}, Tokenizer(model.config.text_length),
                   groups={r.video_id: str(r.meta["group"]) for r in records})
    by_method, owners = twin_scores(model, data)
    groups = np.asarray(data.groups)
    twins = {r.video_id: r.meta.get("hard_negatives", {}) for r in records}
    report = {name: group_metrics(s, owners, groups) | pairwise_report(s, owners, data.keys, twins)
              for name, s in by_method.items()}
    report["chance_within_group_top1"] = 100 * len(set(groups)) / len(groups)
    return {"queries": len(owners), "videos": len(groups), **report}
