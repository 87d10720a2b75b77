"""Can a model tell a synthetic scene from its hard-negative twins?

For every caption of a split: is its own video the top-scoring one among the videos of its
group (the scene with events swapped, colours swapped, both; chance 25% for groups of four),
and is its group the top-scoring group (group R@1)? And against each kind of twin alone
(order swapped, colours swapped), how often does its own video score higher (chance 50)? Scores: multi-stream similarity, mixed-
stream logit, and their sum (what `pvl-search search` ranks reranked candidates by).

    python scripts/twin_accuracy.py --model pvl_search/model/weights/tiny-synth \
        --captions /work/data/synth2000/captions.json --split test --cache /tmp/test-cache
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from pvl_search.data.captions import load_captions
from pvl_search.model.checkpoint import load_model
from pvl_search.training.pairs import PairSet, build_frame_cache
from pvl_search.model.tokenizer import Tokenizer
from pvl_search.training.loop import score_matrices


def scores(model, data: PairSet) -> tuple[dict[str, np.ndarray], np.ndarray]:
    by_method, owners = score_matrices(model, data)
    by_method["sum"] = by_method["multi"] + by_method["mixed"]
    return by_method, np.asarray(owners)


def twin_report(score: np.ndarray, owners: np.ndarray, groups: np.ndarray) -> dict[str, float]:
    same = groups[None, :] == groups[owners][:, None]  # (Q, V): videos of the query's group
    truth = score[np.arange(len(owners)), owners]
    within = ((score >= truth[:, None]) & same).sum(1)  # ties count against the model
    best_in_group = np.where(same, score, -np.inf).max(1)
    beaten_by = [len(set(groups[(score[q] > best_in_group[q]) & ~same[q]])) for q in range(len(owners))]
    return {"within_group_top1": float((within == 1).mean() * 100),
            "group_r1": float((np.asarray(beaten_by) == 0).mean() * 100)}


def pairwise_report(score: np.ndarray, owners: np.ndarray, keys: list[str],
                    twins: dict[str, dict[str, str]]) -> dict[str, float]:
    """Per kind of twin (e.g. order, binding): how often a caption scores its own video above
    that one twin (chance 50). Says which factor the model cannot see."""
    row = {key: i for i, key in enumerate(keys)}
    wins: dict[str, list[bool]] = {}
    for q, video in enumerate(owners):
        for factor, twin in twins.get(keys[video], {}).items():
            if twin in row:
                wins.setdefault(factor, []).append(bool(score[q, video] > score[q, row[twin]]))
    return {f"vs_{factor}_twin": float(np.mean(w) * 100) for factor, w in sorted(wins.items())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--captions", required=True)
    parser.add_argument("--split", default="test")
    parser.add_argument("--cache", required=True, help="frame cache folder (reused when complete)")
    args = parser.parse_args()
    model = load_model(args.model).eval()
    records = [r for r in load_captions(args.captions) if r.split == args.split and "group" in r.meta]
    cache, _ = build_frame_cache([(r.video_id, str(r.path)) for r in records], args.cache,
                                 frames=model.config.frames, size=model.config.frame_size)
    data = PairSet(cache, {r.video_id: r.captions for r in records}, Tokenizer(model.config.text_length),
                   groups={r.video_id: str(r.meta["group"]) for r in records})
    by_method, owners = scores(model, data)
    groups = np.asarray(data.groups)
    twins = {r.video_id: r.meta.get("hard_negatives", {}) for r in records}
    report = {name: twin_report(s, owners, groups) | pairwise_report(s, owners, data.keys, twins)
              for name, s in by_method.items()}
    report["chance_within_group_top1"] = 100 * len(set(groups)) / len(groups)
    print(json.dumps({"queries": len(owners), "videos": len(groups), **report}, indent=2))


if __name__ == "__main__":
    main()
