"""The twin diagnostics (pvl_search.experiments.twins) by hand."""

from __future__ import annotations

import numpy as np
import torch

from pvl_search.data.pairs import FrameCache, PairSet
from pvl_search.experiments.twins import pairwise_report, twin_scores
from pvl_search.model.config import preset
from pvl_search.model.perceiver import PerceiverVL
from pvl_search.model.tokenizer import Tokenizer


def test_pairwise_report_counts_wins_against_each_kind_of_twin() -> None:
    keys = ["a", "a-order", "a-binding", "b"]
    twins = {"a": {"order": "a-order", "binding": "a-binding"}, "b": {"order": "missing"}}
    score = np.array([[0.9, 0.95, 0.1, 0.0],   # query of a: loses to its order twin, beats binding
                      [0.0, 0.0, 0.0, 1.0]])  # query of b: its twin is not among the videos
    report = pairwise_report(score, np.array([0, 3]), keys, twins)
    assert report == {"vs_binding_twin": 100.0, "vs_order_twin": 0.0}


def test_twin_scores_fuse_like_the_search_default() -> None:
    """The diagnostic's "fused" column is what the search default scores: calibrated fusion of
    retrieval and the latent reranker (pvl_search.ranking.fuse), for every pair."""
    config = preset("tiny").replace(hidden=32, heads=2, latents=4, blocks=1, self_layers=1, frame_size=16,
                                    patch=8, frames=2, token_dim=8, embed_dim=16, latent_reranker=True)
    torch.manual_seed(0)
    model = PerceiverVL(config).eval()
    rng = np.random.default_rng(0)
    keys = ["a", "b", "c"]
    cache = FrameCache(rng.integers(0, 255, (3, 2, 16, 16, 3), dtype=np.uint8), np.ones((3, 2), dtype=bool), keys)
    data = PairSet(cache, {k: [f"a caption of {k}"] for k in keys}, Tokenizer(config.text_length))
    with torch.no_grad():
        scores, owners = twin_scores(model, data)
    assert owners.tolist() == [0, 1, 2]
    expected = model.retrieval_scale * scores["multi"] + scores["latent"]
    np.testing.assert_allclose(scores["fused"], expected, rtol=1e-6)
    assert model.retrieval_scale > 1  # the contrastive temperature, not a unit weight
