"""The twin diagnostics (pvl_search.experiments.twins) by hand."""

from __future__ import annotations

import numpy as np

from pvl_search.experiments.twins import pairwise_report


def test_pairwise_report_counts_wins_against_each_kind_of_twin() -> None:
    keys = ["a", "a-order", "a-binding", "b"]
    twins = {"a": {"order": "a-order", "binding": "a-binding"}, "b": {"order": "missing"}}
    score = np.array([[0.9, 0.95, 0.1, 0.0],   # query of a: loses to its order twin, beats binding
                      [0.0, 0.0, 0.0, 1.0]])  # query of b: its twin is not among the videos
    report = pairwise_report(score, np.array([0, 3]), keys, twins)
    assert report == {"vs_binding_twin": 100.0, "vs_order_twin": 0.0}
