"""The joint reranker: batched scores equal one-at-a-time scores, its weights round-trip through
their own folder beside a model, it learns from the retrieval stage's own candidates, and a
killed training run resumed from its checkpoint ends with the uninterrupted run's weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from cross_encoder_helpers import (
    build_corpus,
    check_batched_scores_equal_one_at_a_time,
    check_eval_ranks_equal_the_searchers,
    check_the_default_comes_from_search_defaults,
)

from pvl_search.model.checkpoint import CheckpointError
from pvl_search.model.joint_reranker import (
    RERANKER_DIR,
    JointReranker,
    JointRerankerConfig,
    load_reranker,
    save_reranker,
)
from pvl_search.training.joint_reranker import (
    EncodedPool,
    JointTrainConfig,
    candidate_lists,
    make_optimizer,
    train_on_pool,
    validate,
)

CONFIG = JointRerankerConfig(hidden=16, text_tokens=3, video_tokens=4, heads=2, layers=2)


def _reranker(seed: int = 0) -> JointReranker:
    torch.manual_seed(seed)
    reranker = JointReranker(CONFIG)
    torch.nn.init.normal_(reranker.head.weight)  # a fresh head scores 0 everywhere: nothing to compare
    return reranker.eval()


def test_batched_scores_equal_one_at_a_time() -> None:
    check_batched_scores_equal_one_at_a_time(_reranker(), CONFIG.text_tokens, CONFIG.video_tokens, CONFIG.hidden)


def test_weights_round_trip_beside_a_model(tmp_path: Path) -> None:
    reranker = _reranker(1)
    assert load_reranker(tmp_path) is None  # a model folder without one
    save_reranker(reranker, tmp_path)
    loaded = load_reranker(tmp_path)
    text, video = torch.randn(CONFIG.text_tokens, CONFIG.hidden), torch.randn(5, CONFIG.video_tokens, CONFIG.hidden)
    with torch.inference_mode():
        assert torch.equal(loaded.score(text, video), reranker.score(text, video))
    (tmp_path / RERANKER_DIR / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="not a joint reranker"):
        load_reranker(tmp_path)


def _pool(n_videos: int = 24, captions_per_video: int = 2, seed: int = 0) -> EncodedPool:
    """Videos whose latents hold a code that the captions name; the embeddings that retrieval
    compares hold only half of it, so retrieval confuses pairs of videos and the latents can
    tell them apart."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randn(n_videos, CONFIG.hidden, generator=g)
    video_latents = codes[:, None].repeat(1, CONFIG.video_tokens, 1) + 0.1 * torch.randn(
        n_videos, CONFIG.video_tokens, CONFIG.hidden, generator=g)
    partner = torch.arange(n_videos) // 2 * 2  # videos 2i and 2i+1 look alike to retrieval
    video_embeddings = torch.nn.functional.normalize(
        codes[partner] + 0.01 * torch.randn(n_videos, CONFIG.hidden, generator=g), dim=1)
    owners = np.repeat(np.arange(n_videos), captions_per_video)
    text_latents = codes[owners][:, None].repeat(1, CONFIG.text_tokens, 1) + 0.1 * torch.randn(
        len(owners), CONFIG.text_tokens, CONFIG.hidden, generator=g)
    text_embeddings = codes[partner[owners]] + 0.01 * torch.randn(len(owners), CONFIG.hidden, generator=g)
    groups = [f"g{i // 2}" for i in range(n_videos)]
    return EncodedPool(video_latents, video_embeddings, text_latents,
                       torch.nn.functional.normalize(text_embeddings, dim=1), owners, groups)


def test_candidates_are_retrieval_top_k_with_the_own_video_forced_in() -> None:
    pool = _pool()
    top, sims = candidate_lists(pool, 4, force_owner=False)
    full = pool.text_embeddings @ pool.video_embeddings.T
    assert torch.equal(top, full.topk(4, dim=1).indices)
    pool.text_embeddings[0] = -pool.video_embeddings[0]  # caption 0 now ranks its own video last
    forced, forced_sims = candidate_lists(pool, 4, force_owner=True)
    assert forced[0, -1] == pool.owners[0] and (forced == torch.as_tensor(pool.owners)[:, None]).any(1).all()
    assert forced_sims[0, -1] == pytest.approx(float(pool.text_embeddings[0] @ pool.video_embeddings[0]))


def test_training_on_the_retrieval_candidates_fixes_what_retrieval_confuses() -> None:
    train, val = _pool(96, seed=0), _pool(seed=1)  # other videos: it must learn to compare, not recall
    torch.manual_seed(0)
    reranker = JointReranker(CONFIG)
    cfg = JointTrainConfig(candidates=4, batch_queries=8, passes=30, lr=3e-3, warmup=10)
    optimizer, schedule = make_optimizer(reranker, cfg, 30 * len(train) // 8)
    before = validate(reranker, val, scale=1.0, ks=(4,))
    train_on_pool(reranker, train, cfg, 1.0, optimizer, schedule, torch.Generator().manual_seed(0))
    after = validate(reranker, val, scale=1.0, ks=(4,))
    assert before["joint@4"]["r1"] == before["retrieval"]["r1"]  # a fresh head adds 0: retrieval's order
    assert before["retrieval"]["within_group_top1"] <= 75  # the look-alike pairs are a coin toss
    assert after["joint@4"]["within_group_top1"] >= 95 and after["joint@4"]["r1"] > before["retrieval"]["r1"] + 30


@pytest.fixture(scope="module")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A small random model saved the real way, and a real synthetic corpus for validation."""
    from pvl_search.data.synth import generate_corpus
    from pvl_search.model.checkpoint import save_model
    from pvl_search.model.config import preset
    from pvl_search.model.perceiver import PerceiverVL

    root = tmp_path_factory.mktemp("joint")
    torch.manual_seed(0)
    model_dir = save_model(PerceiverVL(preset("tiny").replace(hidden=32, heads=2, latents=4, embed_dim=16)),
                           root / "model")
    generate_corpus(root / "corpus", 16, seed=5, size=64, fps=8, seconds=1.5, workers=1, splits=(0.5, 0.5, 0.0))
    return {"model": model_dir, "captions": root / "corpus" / "captions.json"}


class _Killed(Exception):
    """Stands for a kill right after a chunk's checkpoint."""


@pytest.mark.parametrize("kind", ["joint", "patch"])
def test_a_stopped_run_resumes_to_the_same_weights(tmp_path: Path, small_run: dict, kind: str) -> None:
    from pvl_search.model.patch_reranker import load_patch_reranker
    from pvl_search.training.joint_recipe import JointRun, run_joint_training

    def run(out: str, chunks: int = 2) -> JointRun:
        patch = kind == "patch"  # the patch reranker's recipe: the logit alone, one random candidate
        return JointRun(model_dir=str(small_run["model"]), captions=str(small_run["captions"]),
                        out=str(tmp_path / out), stream_seed=5, heldout_seed=0, chunks=chunks, groups_per_chunk=2,
                        train=JointTrainConfig(candidates=4, batch_queries=4, warmup=2, fused_loss=not patch,
                                               random_candidates=int(patch)), kind=kind, width=8)

    loader = load_patch_reranker if kind == "patch" else load_reranker

    def kill_after_first(line: dict) -> None:
        if line["chunk"] == 0:
            raise _Killed

    run_joint_training(run("whole"))
    with pytest.raises(_Killed):
        run_joint_training(run("cut"), on_event=kill_after_first)
    last = run_joint_training(run("cut"), resume=True)
    assert last["chunk"] == 1
    whole, cut = loader(tmp_path / "whole" / "last"), loader(tmp_path / "cut" / "last")
    for (name, a), b in zip(whole.state_dict().items(), cut.state_dict().values()):
        assert torch.equal(a, b), name
    def logged(out: str) -> list[str]:  # timings aside
        return [line.split('"seconds"')[0] for line in (tmp_path / out / "log.jsonl").read_text().splitlines()]

    assert logged("cut") == logged("whole")
    with pytest.raises(ValueError, match="other options"):
        run_joint_training(run("cut", chunks=3), resume=True)
    with pytest.raises(ValueError, match="already holds"):
        run_joint_training(run("cut"))
    with pytest.raises(ValueError, match="no reranker run"):
        run_joint_training(run("new"), resume=True)


def test_a_run_starts_from_init_weights(tmp_path: Path, small_run: dict) -> None:
    """--init: with a learning rate of 0 the run ends where it started, on the given weights."""
    from pvl_search.model.patch_reranker import load_patch_reranker, save_patch_reranker
    from pvl_search.training.joint_recipe import JointRun, new_reranker, run_joint_training

    def run(out: str, init: Path | None) -> JointRun:
        return JointRun(model_dir=str(small_run["model"]), captions=str(small_run["captions"]),
                        out=str(tmp_path / out), stream_seed=5, heldout_seed=0, chunks=1, groups_per_chunk=2,
                        train=JointTrainConfig(candidates=4, batch_queries=4, lr=0.0, warmup=0, fused_loss=False),
                        kind="patch", width=8, init=None if init is None else str(init))

    from pvl_search.model.checkpoint import load_model

    torch.manual_seed(7)
    start = new_reranker(run("x", None), load_model(small_run["model"]).config)
    save_patch_reranker(start, tmp_path / "start")
    run_joint_training(run("from-init", tmp_path / "start"))
    ended = load_patch_reranker(tmp_path / "from-init" / "last")
    for (name, a), b in zip(start.state_dict().items(), ended.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="holds no patch reranker"):
        run_joint_training(run("bad-init", tmp_path / "from-init"))


# -- in the engine: a real index, the searcher and eval -------------------------------------------


@pytest.fixture(scope="module")
def joint_corpus(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A small random model with a joint reranker beside it and a real index that keeps latents."""
    return build_corpus(tmp_path_factory.mktemp("joint-engine"), "joint")


def test_eval_joint_ranks_equal_the_searchers(joint_corpus: dict) -> None:
    assert joint_corpus["runner"].reranker is not None  # found beside the model
    check_eval_ranks_equal_the_searchers(joint_corpus)


def test_the_default_comes_from_search_defaults(joint_corpus: dict, tmp_path: Path) -> None:
    check_the_default_comes_from_search_defaults(joint_corpus, tmp_path)


def test_search_defaults_are_checked_when_the_model_loads(tmp_path: Path) -> None:
    from indexer.search.request import MAX_RERANK_K, RERANK_MODES
    from pvl_search.model.checkpoint import MAX_DEFAULT_RERANK_K, SEARCH_DEFAULT_RERANKS, load_search_defaults

    assert set(SEARCH_DEFAULT_RERANKS) < set(RERANK_MODES) and MAX_DEFAULT_RERANK_K == MAX_RERANK_K
    good = {"rerank": "joint", "rerank_k": 16, "fusion": "calibrated", "chosen_by": "validation"}
    (tmp_path / "search_defaults.json").write_text(json.dumps(good))
    assert load_search_defaults(tmp_path) == good
    for bad in ({"rerank": "bogus"}, {"rerank": "single"}, {"rerank_k": -5}, {"rerank_k": 10**9}, {"fusion": "max"}):
        (tmp_path / "search_defaults.json").write_text(json.dumps(bad))
        with pytest.raises(CheckpointError, match=next(iter(bad))):
            load_search_defaults(tmp_path)
