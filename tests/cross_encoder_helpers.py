"""Shared by the joint- and patch-reranker tests: a small random model with the reranker saved
beside it, real encoded videos and a real SQLite + FAISS index keeping what that reranker reads;
and the two engine checks both rerankers must pass (eval's ranks are the searcher's; the default
comes from search_defaults.json, and an index without the rows falls back or refuses)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_latent_rerank import CAPTIONS, COLOURS, frame_fn

# Per reranker: the option that keeps its rows, and the words of its refusal without them.
KEPT = {"joint": ("store_latents", "keeps no latents"), "patch": ("store_patches", "keeps no patch tokens"),
        "stacked": ("store_patches", "keeps no patch tokens")}
# What "auto" falls back to on an index without those rows (stacked's model has a latent reranker).
FALLBACK = {"joint": "mixed", "patch": "mixed", "stacked": "latent"}


def build_corpus(root: Path, kind: str) -> dict:
    """`kind` joint or patch: a model with that reranker beside it; stacked: a patch reranker
    beside a model with a latent reranker too."""
    from indexer.encoding import ModelRunner
    from indexer.ingest.pipeline import IndexOptions, build_index
    from indexer.store.index_store import IndexStore
    from pvl_search.media.sample_files import write_video
    from pvl_search.model.checkpoint import save_model
    from pvl_search.model.config import preset
    from pvl_search.model.joint_reranker import JointReranker, JointRerankerConfig, save_reranker
    from pvl_search.model.patch_reranker import PatchReranker, PatchRerankerConfig, save_patch_reranker
    from pvl_search.model.perceiver import PerceiverVL

    torch.manual_seed(0)
    config = preset("tiny").replace(hidden=64, heads=4, latents=8, frame_size=32, patch=8, frames=4, token_dim=16,
                                    latent_reranker=kind == "stacked")
    model = PerceiverVL(config)
    if model.latent_reranker is not None:
        torch.nn.init.normal_(model.latent_reranker.head.weight)  # a fresh head scores 0 everywhere
    model_dir = save_model(model, root / "model")
    if kind == "joint":
        reranker = JointReranker(JointRerankerConfig(64, 8, 8, heads=4, layers=2))
        save = save_reranker
    else:
        reranker = PatchReranker(PatchRerankerConfig(64, 8, config.patch_tokens, width=16, heads=4))
        torch.nn.init.normal_(reranker.match.weight)
        save = save_patch_reranker
    torch.nn.init.normal_(reranker.head.weight)  # a fresh head scores 0 everywhere: nothing to compare
    save(reranker, model_dir)
    videos = root / "videos"
    videos.mkdir()
    paths = [write_video(videos / f"v{i}.mp4", frame_fn=frame_fn(i), seconds=2.0, fps=4, width=48, height=40)
             for i in range(len(COLOURS))]
    runner = ModelRunner.from_folder(model_dir, device="cpu", dtype="float32")
    with IndexStore(root / "index") as store:  # the defaults keep what a model's rerankers read
        build_index([videos], store, runner, IndexOptions(window_s=1.0, stride_s=1.0, workers=1, thumbnails=False,
                                                          store_latents=True if kind == "joint" else None))
    entries = [{"video_id": f"v{i}", "path": f"videos/v{i}.mp4", "split": "test", "captions": CAPTIONS[i],
                "meta": {"group": f"g{i // 2}"}} for i in range(len(paths))]
    (root / "captions.json").write_text(json.dumps({"videos": entries}))
    return {"root": root, "index": root / "index", "runner": runner, "paths": paths, "model": model_dir,
            "videos": videos, "captions": root / "captions.json", "texts": CAPTIONS, "config": config, "kind": kind}


def check_batched_scores_equal_one_at_a_time(reranker: torch.nn.Module, text_tokens: int, video_tokens: int,
                                              hidden: int) -> None:
    """(Q, K) scores in one call equal each pair scored alone and each query's `score`, and each
    candidate's score depends on that candidate and that query only."""
    text = torch.randn(3, text_tokens, hidden)
    video = torch.randn(3, 7, video_tokens, hidden)
    with torch.inference_mode():
        batched = reranker(text, video)  # (3 queries, 7 candidates each)
        alone = torch.tensor([[float(reranker(text[q : q + 1], video[q : q + 1, c : c + 1])[0, 0]) for c in range(7)]
                              for q in range(3)])
        one_query = torch.stack([reranker.score(text[q], video[q]) for q in range(3)])
        assert batched.shape == (3, 7)
        assert torch.allclose(batched, alone, atol=1e-5) and torch.allclose(batched, one_query, atol=1e-6)
        assert torch.allclose(reranker.score(text[0], video[0].flip(0)), batched[0].flip(0), atol=1e-5)
        assert not torch.allclose(reranker.score(text[1], video[0]), batched[0], atol=1e-3)


def check_eval_ranks_equal_the_searchers(corpus: dict) -> None:
    from indexer.evaluate.driver import evaluate_index
    from indexer.search.searcher import Searcher

    kind = corpus["kind"]
    with Searcher(corpus["index"], runner=corpus["runner"]) as searcher:
        report = evaluate_index(searcher, corpus["captions"], rerank_ks=(2, 4), single=False, exhaustive_limit=0)
        for k in (2, 4):
            got = []
            for target, texts in enumerate(corpus["texts"]):
                for text in texts:
                    hits = searcher.search(text, k=6, rerank_k=k, rerank=kind).hits
                    assert hits[0].best.rerank_score is not None
                    got.append(next(h.rank for h in hits if h.path == str(corpus["paths"][target])))
            assert report.method(kind, k).ranks == got, k


def check_the_default_comes_from_search_defaults(corpus: dict, tmp_path: Path) -> None:
    from indexer.encoding import ModelRunner
    from indexer.ingest.pipeline import IndexOptions, build_index
    from indexer.search.request import SearchError
    from indexer.search.searcher import Searcher
    from indexer.store.index_store import IndexStore

    kind = corpus["kind"]
    defaults = corpus["model"] / "search_defaults.json"
    defaults.write_text(json.dumps({"rerank": kind, "rerank_k": 3}))
    try:
        runner = ModelRunner.from_folder(corpus["model"], device="cpu", dtype="float32")
    finally:
        defaults.unlink()
    with Searcher(corpus["index"], runner=runner) as searcher:
        result = searcher.search("a red screen", k=6)
        assert result.rerank == kind
        assert sum(h.best.rerank_score is not None for h in result.hits) <= 3  # rerank_k from the file
        explicit = searcher.search("a red screen", k=6, rerank=kind, rerank_k=3)
        assert [h.to_dict() for h in result.hits] == [h.to_dict() for h in explicit.hits]
    option, refusal = KEPT[kind]
    plain = tmp_path / "index"
    with IndexStore(plain) as store:  # an index without those rows: "auto" falls back, the reranker is refused
        build_index([corpus["paths"][0]], store, runner,
                    IndexOptions(window_s=1.0, stride_s=1.0, workers=1, thumbnails=False, **{option: False}))
    with Searcher(plain, runner=runner) as searcher:
        assert searcher.search("red").rerank == FALLBACK[kind]
        with pytest.raises(SearchError, match=f"{refusal}.*--{option.replace('_', '-')}"):
            searcher.search("red", rerank=kind)
