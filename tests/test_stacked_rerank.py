"""The stacked reranker (indexer/search/rerankers.py): the latent reranker's logit plus the patch
reranker's, weighted by the model's search_defaults.json, through a real index that keeps both
stores; the same engine checks as each reranker alone (tests/cross_encoder_helpers.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from cross_encoder_helpers import (
    build_corpus,
    check_eval_ranks_equal_the_searchers,
    check_the_default_comes_from_search_defaults,
)


@pytest.fixture(scope="module")
def stacked_corpus(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A random model with a latent reranker and a patch reranker beside it, and a real index
    built with the defaults (which keep latents and patch tokens for it)."""
    return build_corpus(tmp_path_factory.mktemp("stacked-engine"), "stacked")


def _runner_with_defaults(corpus: dict, defaults: dict):  # noqa: ANN202 - a ModelRunner
    from indexer.encoding import ModelRunner

    path = corpus["model"] / "search_defaults.json"
    path.write_text(json.dumps(defaults))
    try:
        return ModelRunner.from_folder(corpus["model"], device="cpu", dtype="float32")
    finally:
        path.unlink()


def test_stacked_scores_are_the_latent_plus_the_weighted_patch_logits(stacked_corpus: dict) -> None:
    from indexer.search.rerankers import stored_scores
    from indexer.store.index_reader import IndexReader

    weighted = _runner_with_defaults(stacked_corpus, {"rerank": "stacked", "patch_weight": 0.25})
    plain = stacked_corpus["runner"]  # no search_defaults.json: weight 1
    encoded = plain.encode_queries(["a red screen"])
    with IndexReader(stacked_corpus["index"]) as store:
        ids = store.segment_ids()[:5]
        args = (encoded.rerank_states[0], encoded.latents[0], ids)
        latent = stored_scores(plain, store, "latent", *args)
        patch = stored_scores(plain, store, "patch", *args)
        assert np.abs(latent).max() > 1e-3 and np.abs(patch).max() > 1e-3  # both halves count
        np.testing.assert_allclose(stored_scores(plain, store, "stacked", *args), latent + patch, rtol=1e-6)
        np.testing.assert_allclose(stored_scores(weighted, store, "stacked", *args), latent + 0.25 * patch,
                                   rtol=1e-6, atol=1e-7)


def test_batched_searches_equal_one_at_a_time(stacked_corpus: dict) -> None:
    from indexer.search.searcher import Searcher

    texts = [text for texts in stacked_corpus["texts"] for text in texts][:6]
    with Searcher(stacked_corpus["index"], runner=stacked_corpus["runner"]) as searcher:
        together = searcher.search_many(texts, k=6, rerank="stacked", rerank_k=4)
        alone = [searcher.search(text, k=6, rerank="stacked", rerank_k=4) for text in texts]
    assert all(r.rerank == "stacked" for r in together)
    assert [[h.to_dict() for h in r.hits] for r in together] == [[h.to_dict() for h in r.hits] for r in alone]


def test_eval_stacked_ranks_equal_the_searchers(stacked_corpus: dict) -> None:
    check_eval_ranks_equal_the_searchers(stacked_corpus)


def test_the_default_comes_from_search_defaults(stacked_corpus: dict, tmp_path: Path) -> None:
    check_the_default_comes_from_search_defaults(stacked_corpus, tmp_path)


@pytest.mark.parametrize("weight", [-1, 101, "half", True])
def test_a_bad_patch_weight_is_one_error(stacked_corpus: dict, weight: object) -> None:
    from pvl_search.model.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="patch_weight"):
        _runner_with_defaults(stacked_corpus, {"rerank": "stacked", "patch_weight": weight})
