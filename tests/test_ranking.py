"""The ranking rule (pvl_search.ranking) by hand: two tiers, best segment per video, ties."""

from __future__ import annotations

import numpy as np

from pvl_search.metrics import ranks_from_scores
from pvl_search.ranking import (
    Keys,
    best_segment_ranking,
    candidate_order,
    fuse,
    ranks_after_rerank,
    segment_keys,
    twin_hits,
    video_keys,
)


def rank_after_rerank(sims: np.ndarray, segment_video: np.ndarray, target: int, cand: np.ndarray,
                      fused: np.ndarray) -> int:
    keys = video_keys(segment_keys(sims, cand, fused), segment_video, int(segment_video.max()) + 1)
    return int(keys.rank(target))


ONE_SEGMENT_EACH = np.arange(5)  # segment i is video i


def test_candidate_order_breaks_ties_by_segment_id() -> None:
    sims = np.array([0.5, 0.9, 0.5, 0.1, 0.9])
    assert candidate_order(sims).tolist() == [1, 4, 0, 2, 3]
    assert candidate_order(sims, np.array([9, 8, 7, 6, 5])).tolist() == [4, 1, 2, 0, 3]


def test_gt_inside_k_moves_with_the_rerank() -> None:
    sims = np.array([0.9, 0.8, 0.7, 0.6, 0.5])  # retrieval order 0 1 2 3 4
    cand = candidate_order(sims)[:3]
    # Video 2 (retrieval rank 3) gets the best rerank score: first; video 0 drops to third.
    fused = np.array([1.0, 2.0, 5.0])  # for videos 0, 1, 2
    assert rank_after_rerank(sims, ONE_SEGMENT_EACH, 2, cand, fused) == 1
    assert rank_after_rerank(sims, ONE_SEGMENT_EACH, 1, cand, fused) == 2
    assert rank_after_rerank(sims, ONE_SEGMENT_EACH, 0, cand, fused) == 3
    # K = everything: a plain ranking by the rerank score.
    full = np.array([0.0, 3.0, 1.0, 4.0, 2.0])
    everything = candidate_order(sims)
    got = [rank_after_rerank(sims, ONE_SEGMENT_EACH, t, everything, full[everything]) for t in range(5)]
    assert got == ranks_from_scores(np.tile(full, (5, 1)), range(5)).tolist() == [5, 2, 4, 1, 3]


def test_gt_outside_k_keeps_its_retrieval_rank() -> None:
    sims = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    cand = candidate_order(sims)[:2]
    terrible = np.array([-100.0, -200.0])  # reranked videos still stay ahead of the rest
    for target in (2, 3, 4):
        assert rank_after_rerank(sims, ONE_SEGMENT_EACH, target, cand, terrible) == target + 1
    assert rank_after_rerank(sims, ONE_SEGMENT_EACH, 1, cand, terrible) == 2


def test_ties_count_against_the_model() -> None:
    sims = np.array([0.9, 0.8, 0.7, 0.7, 0.5])
    cand = candidate_order(sims)[:3]  # 0, 1, 2
    # Inside K: the gt ties with another reranked video -> the worse of the two ranks.
    fused = np.array([3.0, 3.0, 1.0])
    assert rank_after_rerank(sims, ONE_SEGMENT_EACH, 0, cand, fused) == 2
    assert rank_after_rerank(sims, ONE_SEGMENT_EACH, 1, cand, fused) == 2
    # Outside K: video 3 ties in retrieval with video 2 (which is inside): counted as ahead.
    assert rank_after_rerank(sims, ONE_SEGMENT_EACH, 3, cand, fused) == 4
    # Both outside and tied with each other: each ranks behind the other.
    cand2 = candidate_order(sims)[:2]
    assert rank_after_rerank(sims, ONE_SEGMENT_EACH, 2, cand2, fused[:2]) == 4
    assert rank_after_rerank(sims, ONE_SEGMENT_EACH, 3, cand2, fused[:2]) == 4


def test_a_video_ranks_by_its_best_reranked_segment() -> None:
    # Segments 0,1 -> video 0; 2,3 -> video 1; 4 -> video 2.
    seg_video = np.array([0, 0, 1, 1, 2])
    sims = np.array([0.9, 0.1, 0.8, 0.7, 0.75])
    cand = candidate_order(sims)[:3]  # segments 0, 2, 4: every video has one reranked
    assert cand.tolist() == [0, 2, 4]
    fused = np.array([1.0, 2.0, 0.5])
    assert [rank_after_rerank(sims, seg_video, v, cand, fused) for v in range(3)] == [2, 1, 3]
    # K = 2 segments: videos 0 and 1 reranked, video 2 (retrieval rank 3) stays third.
    cand = candidate_order(sims)[:2]
    assert [rank_after_rerank(sims, seg_video, v, cand, fused[:2]) for v in range(3)] == [2, 1, 3]
    # Video 1's second segment is reranked too: its best fused score counts.
    cand = candidate_order(sims)[:4]  # 0, 2, 4, 3
    assert [rank_after_rerank(sims, seg_video, v, cand, np.array([1.0, -5.0, 0.5, 4.0])) for v in range(3)] == [
        2, 1, 3]


def test_reranked_videos_rank_first_and_twin_hits_read_the_same_keys() -> None:
    keys = video_keys(segment_keys(np.array([0.9, 0.5, 0.1]), np.array([2, 1]), np.array([-3.0, -4.0])),
                      np.array([0, 1, 2]), 3)
    assert np.lexsort((keys.score, keys.tier))[::-1].tolist() == [2, 1, 0]  # reranked (by score), then retrieved
    assert twin_hits(keys, 2, np.array([False, True, True])) == (True, True)
    assert twin_hits(keys, 1, np.array([False, True, True])) == (False, True)
    assert twin_hits(keys, 0, np.array([True, True, False])) == (False, False)


def test_search_order_takes_each_videos_best_segment_and_breaks_ties_by_appearance() -> None:
    # Rows in retrieval order; videos 7, 3, 7, 5, 3; the first two rows were reranked.
    sims = np.array([0.9, 0.8, 0.7, 0.6, 0.6])
    keys = segment_keys(sims, np.arange(2), fuse(sims[:2], np.array([-1.0, 0.5]), "sum"))
    videos, best = best_segment_ranking(keys, np.array([7, 3, 7, 5, 3]))
    assert videos.tolist() == [3, 7, 5]  # 3 fused 1.3 > 7 fused -0.1; then 5 (0.6), retrieved only
    assert best.tolist() == [1, 0, 3]  # a reranked segment beats a higher retrieved one of its video
    tied = segment_keys(np.array([0.5, 0.5, 0.5]), np.arange(0), np.empty(0))
    videos, best = best_segment_ranking(tied, np.array([4, 2, 4]))
    assert videos.tolist() == [4, 2] and best.tolist() == [0, 1]  # ties: first appearance, first row


def test_fusion_modes() -> None:
    assert fuse(np.array([0.5]), np.array([2.0]), "sum").tolist() == [2.5]
    assert fuse(np.array([0.5]), np.array([2.0]), "sum", 30.0).tolist() == [2.5]  # sum ignores the scale
    assert fuse(np.array([0.5]), np.array([2.0]), "rerank").tolist() == [2.0]
    assert fuse(np.array([0.5, -0.1]), np.array([2.0, 1.0]), "calibrated", 30.0).tolist() == [17.0, -2.0]


def test_calibrated_fusion_is_a_product_of_the_two_softmaxes() -> None:
    """Retrieval's softmax over candidates uses scale * similarity; adding the reranker's logit
    multiplies the two distributions (renormalised): a candidate both like wins."""
    sims, logits = np.array([0.30, 0.28, 0.10]), np.array([-1.0, 1.0, 3.0])
    scale = 50.0

    def softmax(x: np.ndarray) -> np.ndarray:
        e = np.exp(x - x.max())
        return e / e.sum()

    product = softmax(scale * sims) * softmax(logits)
    assert np.allclose(softmax(fuse(sims, logits, "calibrated", scale)), product / product.sum())
    assert fuse(sims, logits, "sum").argmax() == 2  # raw sum: the reranker alone decides
    assert fuse(sims, logits, "calibrated", scale).argmax() == 1  # both experts' compromise


def test_matrix_ranks_equal_the_segment_rule_with_one_segment_per_video() -> None:
    rng = np.random.default_rng(0)
    first, second = rng.normal(size=(6, 9)), rng.normal(size=(6, 9))
    target = rng.integers(0, 9, 6)
    got = ranks_after_rerank(first, first + second, target, k=4)
    for q in range(6):
        cand = candidate_order(first[q])[:4]
        keys = video_keys(segment_keys(first[q], cand, first[q][cand] + second[q][cand]), np.arange(9), 9)
        assert got[q] == keys.rank(int(target[q]))


def test_rerank_reorders_only_the_first_stage_top_k() -> None:
    first = np.array([[0.9, 0.8, 0.7, 0.1], [0.9, 0.8, 0.7, 0.1], [0.1, 0.2, 0.3, 0.9]])
    second = np.array([[0.0, 0.0, 5.0, 9.0], [0.0, 0.0, 5.0, 9.0], [1.0, 0.0, 0.0, 0.0]])
    # query 0: target 2 is third by the first stage, first among the top 3 by the second;
    # query 1: target 3 is outside the top 3, so its second-stage score is never seen;
    # query 2: target 0 is outside the top 3 (rank 4) even though it wins the second stage.
    assert ranks_after_rerank(first, second, [2, 3, 0], k=3).tolist() == [1, 4, 4]
    assert ranks_after_rerank(first, second, [2, 3, 0], k=4).tolist() == [2, 1, 1]


def test_keys_compare_tier_before_score() -> None:
    keys = Keys(np.array([True, False, True]), np.array([-5.0, 9.0, -5.0]))
    assert keys.at_least(0).tolist() == [True, False, True]
    assert keys.above(1).tolist() == [True, False, True]
    assert keys.rank(1) == 3 and keys.rank(0) == 2
