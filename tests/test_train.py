"""The training loop: frame cache, checkpoints, exact resume, best-checkpoint selection."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pvl_search.data.pairs import FrameCache, PairSet, build_frame_cache
from pvl_search.model.checkpoint import load_model
from pvl_search.model.config import preset
from pvl_search.model.perceiver import PerceiverVL
from pvl_search.model.tokenizer import Tokenizer
from pvl_search.training.loop import TrainConfig, epoch_batches, learning_rate, train
from pvl_search.training.losses import LossWeights
from pvl_search.training.validation import evaluate

CONFIG = preset("tiny").replace(
    hidden=64, heads=4, latents=8, frame_size=32, patch=8, frames=4, token_dim=16, layerdrop=0.0
)


@pytest.fixture()
def pairs(tmp_path) -> PairSet:
    rng = np.random.default_rng(0)
    clips = {f"v{i}": rng.integers(0, 255, (4, 32, 32, 3), dtype=np.uint8) for i in range(12)}

    def decode(path: str) -> tuple[np.ndarray, np.ndarray]:
        if path == "broken.mp4":
            raise ValueError("broken.mp4: not a video")
        return clips[path], np.array([True, True, True, False])

    items = [(key, key) for key in clips] + [("broken", "broken.mp4")]
    cache, failed = build_frame_cache(items, tmp_path / "cache", frames=4, size=32, decode=decode)
    assert failed == {"broken": "broken.mp4: not a video"}
    assert cache.frames.shape == (12, 4, 32, 32, 3) and cache.keys[0] == "v0"
    captions = {key: [f"clip {i} caption a", f"clip {i} caption b"] for i, key in enumerate(clips)}
    return PairSet(cache, captions, Tokenizer(CONFIG.text_length))


def run(pairs: PairSet, out, epochs: int, resume: bool = False, **options) -> PerceiverVL:
    torch.manual_seed(0)
    model = PerceiverVL(CONFIG)
    cfg = TrainConfig(epochs=epochs, batch_size=4, warmup_steps=2, checkpoint_every=2, lr=1e-3, **options)
    train(model, pairs, pairs, cfg, out, resume=resume)
    return model


def test_frame_cache_is_reused(pairs: PairSet, tmp_path) -> None:
    reopened = FrameCache.open(tmp_path / "cache")
    assert np.array_equal(np.asarray(reopened.frames), np.asarray(pairs.cache.frames))
    assert reopened.masks[:, 3].sum() == 0


@pytest.mark.parametrize("mined", [0, 2])
def test_resume_continues_exactly(pairs: PairSet, tmp_path, mined: int) -> None:
    """Also with mined negatives: the bank is part of the saved training state."""
    options = {"mined_negatives": mined, "losses": LossWeights(mixed_nce=1.0)} if mined else {}
    straight = run(pairs, tmp_path / "straight", epochs=2, **options)
    run(pairs, tmp_path / "split", epochs=1, **options)
    resumed = run(pairs, tmp_path / "split", epochs=2, resume=True, **options)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name


def test_checkpoints_and_log(pairs: PairSet, tmp_path) -> None:
    run(pairs, tmp_path / "out", epochs=2)
    lines = [json.loads(line) for line in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    steps = [line for line in lines if line["kind"] == "step"]
    epochs = [line for line in lines if line["kind"] == "epoch"]
    assert len(steps) == 6 and len(epochs) == 2  # 12 videos / batch 4 = 3 steps per epoch
    assert all(np.isfinite(line["loss"]) for line in steps)
    assert all("r1" in epochs[0][f"val_{name}"] for name in ("multi", "mixed", "reranked"))
    # "best" holds the weights of the epoch with the top validation R@1 of the search
    # default (reranked), since this run trains the mixed head.
    best_r1 = max(epoch["val_reranked"]["r1"] for epoch in epochs)
    val = evaluate(load_model(tmp_path / "out" / "best"), pairs)
    assert val["reranked"].r1 == pytest.approx(best_r1)
    assert load_model(tmp_path / "out" / "last").config == CONFIG


def test_schedule_warms_up_then_decays() -> None:
    cfg = TrainConfig(lr=1.0, warmup_steps=10)
    assert learning_rate(0, 100, cfg) == pytest.approx(0.1)
    assert learning_rate(9, 100, cfg) == pytest.approx(1.0)
    assert learning_rate(55, 100, cfg) == pytest.approx(0.5)
    assert learning_rate(100, 100, cfg) == pytest.approx(0.0)


def test_too_little_data_is_a_clear_error(pairs: PairSet, tmp_path) -> None:
    with pytest.raises(ValueError, match="fewer than one batch"):
        train(PerceiverVL(CONFIG), pairs, None, TrainConfig(batch_size=64), tmp_path / "x")


def test_group_batches_keep_groups_together() -> None:
    groups = [f"g{i // 4}" for i in range(24)]  # six groups of four
    batches = list(epoch_batches(24, 8, torch.Generator().manual_seed(3), groups))
    assert sorted(i for batch in batches for i in batch) == list(range(24))
    for batch in batches:  # two whole groups per batch
        assert sorted({groups[i] for i in batch}) == sorted(groups[i] for i in batch[::4])
        assert all(sum(groups[j] == groups[i] for j in batch) == 4 for i in batch)
    plain = list(epoch_batches(24, 8, torch.Generator().manual_seed(3)))
    assert any(len({groups[i] for i in batch}) > 2 for batch in plain)


def test_cli_trains_on_a_synthetic_corpus_with_twin_groups(tmp_path) -> None:
    """`pvl-search train` end to end on real video files: twin groups reach the batches, the
    log carries every validation metric, and `best` is a loadable model."""
    from typer.testing import CliRunner

    import cli
    from pvl_search.data.pairs import load_pair_sets
    from pvl_search.data.synth import generate_corpus

    generate_corpus(tmp_path / "corpus", 24, seed=5, size=64, fps=8, seconds=1.5, workers=1,
                    splits=(0.5, 0.5, 0.0))
    captions = tmp_path / "corpus" / "captions.json"
    result = CliRunner().invoke(cli.app, [
        "train", "--captions", str(captions), "--out", str(tmp_path / "run"), "--epochs", "2",
        "--batch-size", "4", "--warmup", "2", "--mixed-nce", "1", "--group-batches-from", "2",
        "--rerank-only-groups", "--text-mixer-layers", "1", "--temporal-kernel", "3", "--json",
    ])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 2 * (summary["train_videos"] // 4)
    assert summary["command_config"]["group_batches_from"] == 1
    assert summary["command_config"]["rerank_only_groups"]
    epochs = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()
              if json.loads(line)["kind"] == "epoch"]
    assert len(epochs) == 2 and all("val_reranked" in e for e in epochs)
    mixed_inputs = preset("tiny").replace(text_mixer_layers=1, temporal_kernel=3)
    assert load_model(tmp_path / "run" / "best").config == mixed_inputs  # the flags reach the saved config
    # The clip length it trained on (1.5 s videos), so `index` cuts windows that fit it.
    from pvl_search.model.checkpoint import load_clip_seconds

    assert load_clip_seconds(tmp_path / "run" / "best") == 1.5
    # Twins share a group label (four videos each); the cache built by the run is reused.
    datasets, failed = load_pair_sets(captions, preset("tiny"), tmp_path / "run" / "frame-cache")
    train_groups = datasets["train"].groups
    assert not failed and len(set(train_groups)) * 4 == len(train_groups)
    ids = datasets["train"].group_ids([0, 1, 2, 3, 4])
    assert ids.tolist() == [0, 0, 0, 0, 1]  # the corpus lists each group's four videos together


def test_mined_negatives_need_the_listwise_loss(pairs: PairSet, tmp_path) -> None:
    with pytest.raises(ValueError, match="mixed-nce"):
        run(pairs, tmp_path / "out", epochs=1, mined_negatives=2)


def test_init_from_own_checkpoint_copies_weights_and_checks_the_architecture(tmp_path) -> None:
    from pvl_search.model.checkpoint import save_model
    from pvl_search.training.recipe import init_from_checkpoint

    torch.manual_seed(1)
    trained = PerceiverVL(CONFIG)
    save_model(trained, tmp_path / "m")
    torch.manual_seed(2)
    fresh = PerceiverVL(CONFIG)
    init_from_checkpoint(fresh, tmp_path / "m")
    for (name, a), b in zip(trained.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="differs in temporal_kernel"):
        init_from_checkpoint(PerceiverVL(CONFIG.replace(temporal_kernel=3)), tmp_path / "m")
