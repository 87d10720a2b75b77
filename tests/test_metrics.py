"""Retrieval metrics on hand-made score matrices."""

import numpy as np
import pytest

from pvl_search.metrics import paired_top1_change, ranks_from_scores, retrieval_metrics


def test_ranks_on_a_hand_made_matrix() -> None:
    scores = np.array(
        [
            [0.9, 0.1, 0.2],  # target 0 is best -> rank 1
            [0.5, 0.4, 0.6],  # target 1 is last -> rank 3
            [0.3, 0.8, 0.7],  # target 2 is second -> rank 2
        ]
    )
    assert ranks_from_scores(scores, [0, 1, 2]).tolist() == [1, 3, 2]


def test_ties_count_against_the_model() -> None:
    scores = np.array([[0.5, 0.5, 0.5], [1.0, 1.0, 0.0]])
    assert ranks_from_scores(scores, [0, 1]).tolist() == [3, 2]


def test_recall_and_ranks() -> None:
    metrics = retrieval_metrics([1, 1, 2, 6, 11])
    assert metrics.r1 == pytest.approx(40.0)
    assert metrics.r5 == pytest.approx(60.0)
    assert metrics.r10 == pytest.approx(80.0)
    assert metrics.median_rank == 2
    assert metrics.mean_rank == pytest.approx(4.2)
    assert metrics.queries == 5


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError):
        retrieval_metrics([])
    with pytest.raises(ValueError):
        retrieval_metrics([0, 1])
    with pytest.raises(ValueError):
        ranks_from_scores(np.zeros((2, 3)), [0])


def test_paired_top1_change_and_sign_test() -> None:
    base = [1, 1, 2, 3, 1, 5]
    new = [1, 2, 1, 1, 1, 1]
    change = paired_top1_change(base, new)
    assert (change.gained, change.lost) == (3, 1)
    assert change.p_value == pytest.approx(2 * 5 / 16)  # P(X >= 3 | n=4, 1/2) = 5/16, two-sided
    assert paired_top1_change(base, base).p_value == 1.0
    lopsided = paired_top1_change([2] * 20, [1] * 20)
    assert lopsided.gained == 20 and lopsided.p_value == pytest.approx(2 / 2**20)
    with pytest.raises(ValueError):
        paired_top1_change([1, 2], [1])
