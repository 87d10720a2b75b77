"""The patch reranker (the query reads each candidate's stored patch tokens): batched scores equal
one-at-a-time scores, padding tokens change nothing, its weights round-trip beside a model, it
learns what pooled vectors confuse; in the engine, an index keeps the patch tokens it reads (a
killed `pvl-search index` run and its rerun leave them as an uninterrupted run does), eval and
the searcher agree, and the default comes from search_defaults.json."""

from __future__ import annotations

import json
import os
import subprocess
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
from index_helpers import cli, cli_env, pvl_search, wait_until_stopped

from pvl_search.model.checkpoint import CheckpointError
from pvl_search.model.patch_reranker import (
    PATCH_RERANKER_DIR,
    PatchReranker,
    PatchRerankerConfig,
    load_patch_reranker,
    save_patch_reranker,
)

CONFIG = PatchRerankerConfig(hidden=16, text_tokens=3, video_tokens=10, width=8, heads=2, layers=2)


def _reranker(seed: int = 0, config: PatchRerankerConfig = CONFIG) -> PatchReranker:
    torch.manual_seed(seed)
    reranker = PatchReranker(config)
    torch.nn.init.normal_(reranker.head.weight)  # a fresh head scores 0 everywhere: nothing to compare
    torch.nn.init.normal_(reranker.match.weight)
    return reranker.eval()


def test_batched_scores_equal_one_at_a_time() -> None:
    check_batched_scores_equal_one_at_a_time(_reranker(), CONFIG.text_tokens, CONFIG.video_tokens, CONFIG.hidden)


def test_masked_patch_tokens_change_nothing() -> None:
    """A short clip's padding frames are stored as zero tokens and masked: whatever they hold,
    the score is that of the real tokens alone."""
    reranker = _reranker(1)
    text, video = torch.randn(CONFIG.text_tokens, CONFIG.hidden), torch.randn(4, CONFIG.video_tokens, CONFIG.hidden)
    mask = torch.ones(4, CONFIG.video_tokens, dtype=torch.bool)
    mask[:, 6:] = False
    noisy = video.clone()
    noisy[:, 6:] = torch.randn(4, 4, CONFIG.hidden) * 10
    short = PatchReranker(PatchRerankerConfig(**{**CONFIG.__dict__, "video_tokens": 6}))
    short.load_state_dict(reranker.state_dict())
    with torch.inference_mode():
        masked = reranker.score(text, noisy, mask)
        assert torch.allclose(masked, reranker.score(text, video, mask), atol=1e-5)
        assert torch.allclose(masked, short.eval().score(text, video[:, :6]), atol=1e-5)
        assert not torch.allclose(masked, reranker.score(text, noisy), atol=1e-3)


def test_weights_round_trip_beside_a_model(tmp_path: Path) -> None:
    reranker = _reranker(2)
    assert load_patch_reranker(tmp_path) is None  # a model folder without one
    save_patch_reranker(reranker, tmp_path)
    loaded = load_patch_reranker(tmp_path)
    text, video = torch.randn(CONFIG.text_tokens, CONFIG.hidden), torch.randn(5, CONFIG.video_tokens, CONFIG.hidden)
    with torch.inference_mode():
        assert torch.equal(loaded.score(text, video), reranker.score(text, video))
    (tmp_path / PATCH_RERANKER_DIR / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="not a patch reranker"):
        load_patch_reranker(tmp_path)


def _binding_pool(n_groups: int, seed: int):  # noqa: ANN202 - an EncodedPool
    """Pairs of videos that hold the same two patch patterns in swapped places, and captions that
    say which goes where: their mean-pooled tokens (what a pooled embedding sees) are equal, so
    retrieval is a coin toss within each pair; only reading the patches tells them apart."""
    from pvl_search.training.joint_reranker import EncodedPool

    rng = np.random.default_rng(seed)
    d, m = CONFIG.hidden, CONFIG.video_tokens
    fixed = np.random.default_rng(123)  # the same words and places in every pool
    words = torch.as_tensor(fixed.normal(size=(8, d)), dtype=torch.float32)
    places = torch.as_tensor(fixed.normal(size=(2, d)), dtype=torch.float32)  # as the model's position embeddings
    videos, texts, owners, groups = [], [], [], []
    for g in range(n_groups):
        a, b = rng.choice(8, size=2, replace=False)
        for first, second in ((a, b), (b, a)):
            tokens = torch.as_tensor(rng.normal(size=(m, d)) * 0.1, dtype=torch.float32)
            tokens[: m // 2] += words[first] + places[0]
            tokens[m // 2 :] += words[second] + places[1]
            videos.append(tokens)
            texts.append(torch.stack([words[first], words[second], torch.zeros(d)]))  # "first ..., then ..."
            owners.append(len(videos) - 1)
            groups.append(f"g{g}")
    video = torch.stack(videos)
    embedding = torch.nn.functional.normalize(video.mean(1), dim=-1)
    text = torch.stack(texts)
    text_embedding = torch.nn.functional.normalize(text[:, :2].mean(1), dim=-1)
    return EncodedPool(video, embedding, text, text_embedding, np.asarray(owners), groups)


def test_training_reads_what_pooled_vectors_cannot_tell_apart() -> None:
    from pvl_search.training.joint_reranker import JointTrainConfig, make_optimizer, train_on_pool, validate

    train, val = _binding_pool(64, seed=0), _binding_pool(12, seed=1)
    reranker = PatchReranker(CONFIG)
    cfg = JointTrainConfig(candidates=4, batch_queries=8, passes=40, lr=3e-3, warmup=10, fused_loss=False)
    optimizer, schedule = make_optimizer(reranker, cfg, 40 * len(train) // 8)
    before = validate(reranker, val, scale=1.0, ks=(4,))
    train_on_pool(reranker, train, cfg, 1.0, optimizer, schedule, torch.Generator().manual_seed(0))
    after = validate(reranker, val, scale=1.0, ks=(4,))
    assert before["joint@4"]["r1"] == before["retrieval"]["r1"]  # a fresh head adds 0: retrieval's order
    assert before["retrieval"]["within_group_top1"] <= 75  # swapped places: a coin toss
    assert after["joint@4"]["within_group_top1"] >= 95, after


# -- in the engine: a real index that keeps patch tokens, the searcher and eval --------------------


@pytest.fixture(scope="module")
def patch_corpus(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A small random model with a patch reranker beside it and a real index built with the
    defaults (which keep patch tokens for it)."""
    return build_corpus(tmp_path_factory.mktemp("patch-engine"), "patch")


def test_the_index_keeps_the_patch_tokens_the_model_computes(patch_corpus: dict) -> None:
    from indexer.store.index_reader import IndexReader
    from pvl_search.media.video import read_clip

    runner, config = patch_corpus["runner"], patch_corpus["config"]
    with IndexReader(patch_corpus["index"]) as reader:
        assert reader.layout.patch_shape == (config.patch_tokens, config.hidden)
        stats = reader.stats()
        assert stats.bytes["patches.f16"] >= stats.rows * config.patch_tokens * config.hidden * 2
        ids = reader.segment_ids()
        first = reader.segments(ids[:1])[int(ids[0])]
        stored = reader.patch_tokens(ids[:1])[0]
    clip = read_clip(first.path, (first.start_s, first.end_s), config.frames, config.frame_size)
    fresh = runner.encode_clips(clip.frames[None], clip.mask[None], keep_patches=True).patches[0]
    np.testing.assert_allclose(stored.reshape(-1), fresh, atol=2e-2, rtol=1e-2)  # float16 rows


def test_eval_patch_ranks_equal_the_searchers(patch_corpus: dict) -> None:
    assert patch_corpus["runner"].patch_reranker is not None  # found beside the model
    check_eval_ranks_equal_the_searchers(patch_corpus)


def test_the_default_comes_from_search_defaults(patch_corpus: dict, tmp_path: Path) -> None:
    check_the_default_comes_from_search_defaults(patch_corpus, tmp_path)


def test_a_killed_index_run_leaves_the_patch_tokens_a_whole_run_writes(patch_corpus: dict, tmp_path: Path) -> None:
    """`pvl-search index` SIGKILLed with a video's rows (patch tokens included) appended but not
    committed, then run again: the index holds what an uninterrupted run holds, row for row."""
    from indexer.store.index_reader import IndexReader
    from indexer.store.records import PAUSE_ENV

    args = ["index", str(patch_corpus["videos"]), "--model", str(patch_corpus["model"]), "--window", "1",
            "--stride", "1", "--workers", "1", "--no-thumbnails", "--dtype", "float32", "--json"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert cli(*args, "--index", str(whole)).returncode == 0
    log = tmp_path / "child.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen([pvl_search(), *args, "--index", str(cut)], stdout=subprocess.DEVNULL, stderr=err,
                                env={**cli_env(), PAUSE_ENV: "stores_appended"})
    wait_until_stopped(proc, log, "stores_appended")
    proc.kill()
    proc.wait()
    rerun = cli(*args, "--index", str(cut))
    assert rerun.returncode == 0, rerun.stderr
    assert json.loads(rerun.stdout)["indexed"] == len(patch_corpus["paths"])  # the cut video was never committed

    def rows(folder: Path) -> dict[str, np.ndarray]:
        with IndexReader(folder) as reader:
            ids = reader.segment_ids()
            segments = reader.segments(ids)
            tokens = reader.patch_tokens(ids)
            return {f"{Path(segments[int(i)].path).name}@{segments[int(i)].start_s}": tokens[j]
                    for j, i in enumerate(ids)}

    got, want = rows(cut), rows(whole)
    assert sorted(got) == sorted(want)
    for key in want:
        assert np.array_equal(got[key], want[key]), key
    assert os.path.getsize(cut / "patches.f16") == os.path.getsize(whole / "patches.f16")
