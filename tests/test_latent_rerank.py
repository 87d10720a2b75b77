"""The latent reranker end to end on a tiny real index (random small model with a latent
reranker, real encoded videos, real SQLite + FAISS): the index keeps latents by itself, the
evaluation's latent ranks equal what `Searcher.search(rerank="latent")` returns, the twin
metrics equal a direct computation, and "auto" follows the model folder's search defaults."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from indexer.encoding import ModelRunner
from indexer.evaluate.driver import evaluate_index
from indexer.evaluate.report import LATENT, MIXED, MULTI
from indexer.ingest.pipeline import IndexOptions, build_index
from indexer.search.request import SearchError
from indexer.search.searcher import Searcher
from indexer.store.index_store import IndexStore
from pvl_search.media.sample_files import write_video
from pvl_search.model.checkpoint import CheckpointError, load_search_defaults, save_model
from pvl_search.model.config import preset
from pvl_search.model.perceiver import PerceiverVL

COLOURS = [(220, 30, 30), (30, 200, 40), (40, 60, 230), (240, 220, 30), (20, 20, 20), (230, 230, 230)]
CAPTIONS = [["a red screen"], ["green stripes"], ["a blue square", "blue"], ["yellow flashes"], ["dark"], ["white"]]
KS = (2, 4)


def frame_fn(video: int):
    colour = np.array(COLOURS[video], dtype=np.uint8)

    def draw(i: int, width: int, height: int) -> np.ndarray:
        frame = np.full((height, width, 3), 128, dtype=np.uint8)
        frame[: height // 2 + 3 * i, : width // 2 + 2 * (video % 3)] = colour
        return frame

    return draw


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("latent")
    torch.manual_seed(0)
    config = preset("tiny").replace(hidden=64, heads=4, latents=8, frame_size=32, patch=8, frames=4, token_dim=16,
                                    latent_reranker=True)
    model_dir = root / "model"
    save_model(PerceiverVL(config), model_dir)
    videos = root / "videos"
    videos.mkdir()
    paths = [write_video(videos / f"v{i}.mp4", frame_fn=frame_fn(i), seconds=2.0, fps=4, width=48, height=40)
             for i in range(len(COLOURS))]
    runner = ModelRunner.from_folder(model_dir, device="cpu", dtype="float32")
    index = root / "index"
    with IndexStore(index) as store:  # no store_latents option: the model's reranker asks for them
        summary = build_index([videos], store, runner, IndexOptions(window_s=1.0, stride_s=1.0, workers=1,
                                                                     thumbnails=False))
        assert summary.indexed == len(paths) and store.layout.latent_shape == (8, 64)
    entries = [{"video_id": f"v{i}", "path": f"videos/v{i}.mp4", "split": "test", "captions": CAPTIONS[i],
                "meta": {"group": f"g{i // 2}", "factors": ["heldout"] if i < 2 else []}}  # twins: (0 1) (2 3) (4 5)
               for i in range(len(paths))]
    captions = root / "captions.json"
    captions.write_text(json.dumps({"videos": entries}))
    return {"root": root, "index": index, "runner": runner, "captions": captions, "paths": paths,
            "model": model_dir}


def test_eval_latent_ranks_equal_the_searchers(corpus: dict) -> None:
    with Searcher(corpus["index"], runner=corpus["runner"]) as searcher:
        report = evaluate_index(searcher, corpus["captions"], rerank_ks=KS, single=False, exhaustive_limit=0)
        assert {(m.method, m.k) for m in report.methods} == {(MULTI, None)} | {
            (m, k) for m in (MIXED, LATENT) for k in KS}
        queries = [(text, v) for v, texts in enumerate(CAPTIONS) for text in texts]
        for k in KS:
            got = []
            for text, target in queries:
                hits = searcher.search(text, k=6, rerank_k=k, rerank="latent").hits
                assert hits and all(h.best.rerank_score is not None for h in hits[:1])
                got.append(next(h.rank for h in hits if h.path == str(corpus["paths"][target])))
            assert report.method(LATENT, k).ranks == got, k


def test_twin_metrics_equal_a_direct_computation(corpus: dict) -> None:
    with Searcher(corpus["index"], runner=corpus["runner"]) as searcher:
        report = evaluate_index(searcher, corpus["captions"], rerank_ks=KS, single=False, exhaustive_limit=0)
        store = searcher.store
        ids = store.segment_ids()
        info = store.segments(ids)
        video_of = {str(p): i for i, p in enumerate(corpus["paths"])}
        seg_video = np.array([video_of[info[i].path] for i in ids.tolist()])
        emb = store.embeddings(ids)
        within, first = [], []
        for v, texts in enumerate(CAPTIONS):
            for text in texts:
                sims = emb @ corpus["runner"].encode_queries([text]).embeddings[0]
                per_video = np.array([sims[seg_video == u].max() for u in range(6)])
                twins = np.arange(6) // 2 == v // 2
                within.append(bool((per_video[twins] >= per_video[v]).sum() == 1))
                first.append(bool(per_video[twins].max() >= per_video[~twins].max()))
        multi = report.method(MULTI).groups
        assert multi["within_group_top1"] == pytest.approx(100 * np.mean(within))
        assert multi["group_r1"] == pytest.approx(100 * np.mean(first))
        assert multi["queries"] == len(within)
        assert multi["within_group_top1:heldout"] == pytest.approx(100 * np.mean(within[:2]))


def test_auto_follows_the_model_folders_search_defaults(corpus: dict, tmp_path: Path) -> None:
    with Searcher(corpus["index"], runner=corpus["runner"]) as searcher:
        assert searcher.search("blue", k=3).rerank == "mixed"  # no defaults file: the paper's reranker
    (corpus["model"] / "search_defaults.json").write_text(json.dumps({"rerank": "latent"}))
    try:
        runner = ModelRunner.from_folder(corpus["model"], device="cpu", dtype="float32")
        with Searcher(corpus["index"], runner=runner) as searcher:
            assert searcher.search("blue", k=3).rerank == "latent"
    finally:
        (corpus["model"] / "search_defaults.json").unlink()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "search_defaults.json").write_text(json.dumps({"rerank": 3}))
    with pytest.raises(CheckpointError, match="unexpected entry"):
        load_search_defaults(bad)


def test_latent_needs_an_index_that_keeps_latents(corpus: dict, tmp_path: Path) -> None:
    index = tmp_path / "index"
    with IndexStore(index) as store:
        build_index([corpus["paths"][0]], store, corpus["runner"],
                    IndexOptions(window_s=1.0, stride_s=1.0, workers=1, thumbnails=False, store_latents=False))
    with Searcher(index, runner=corpus["runner"]) as searcher:
        with pytest.raises(SearchError, match="keeps no latents"):
            searcher.search("red", rerank="latent")
        (corpus["model"] / "search_defaults.json").write_text(json.dumps({"rerank": "latent"}))
        try:  # "auto" falls back to the paper's reranker where the latent one cannot run
            runner = ModelRunner.from_folder(corpus["model"], device="cpu", dtype="float32")
        finally:
            (corpus["model"] / "search_defaults.json").unlink()
    with Searcher(index, runner=runner) as searcher:
        assert searcher.search("red").rerank == "mixed"
