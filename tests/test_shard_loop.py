"""The shard training loop in one process: exact resume mid-epoch, gradient accumulation with the
learning rate scaled by the global batch, and bf16 autocast."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_train_distributed import CONFIG, largest_difference, weights, write_shards

from pvl_search.training.loop import TrainConfig
from pvl_search.training.recipe import initial_model
from pvl_search.training.shard_loop import ShardTrainOptions, train_on_shards


class Stop(Exception):
    pass


def config(**changes: object) -> TrainConfig:
    return TrainConfig(**{"epochs": 2, "batch_size": 4, "lr": 1e-3, "warmup_steps": 2, "seed": 1,
                          "checkpoint_every": 3, **changes})


def run(shards: Path, out: Path, cfg: TrainConfig, options: ShardTrainOptions, *, resume: bool = False,
        stop_at: int | None = None) -> None:
    model, _ = initial_model(CONFIG, cfg, None, "all")

    def progress(record: dict) -> None:
        if stop_at is not None and record.get("step") == stop_at and record["kind"] == "step":
            raise Stop  # as if the process died right after this step

    train_on_shards(model, shards, out, cfg, options, resume=resume, progress=progress)


def steps(out: Path) -> list[dict]:
    return [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if r["kind"] == "step"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("shards")
    write_shards(folder, videos=20, per_shard=6)
    return folder


def test_a_stopped_run_resumes_onto_the_same_batches(shards: Path, tmp_path: Path) -> None:
    options = ShardTrainOptions(loader_workers=0, shuffle_buffer=8, precision="float32")
    run(shards, tmp_path / "whole", config(), options)
    # 20 videos, batch 4: 5 steps an epoch. Stopped after step 7 (checkpoint at 6, mid-epoch 2).
    with pytest.raises(Stop):
        run(shards, tmp_path / "cut", config(), options, stop_at=7)
    run(shards, tmp_path / "cut", config(), options, resume=True)
    assert [r["step"] for r in steps(tmp_path / "cut")] == list(range(1, 11))
    assert [r["loss"] for r in steps(tmp_path / "cut")] == pytest.approx([r["loss"] for r in steps(tmp_path / "whole")],
                                                                         abs=1e-6)
    assert largest_difference(weights(tmp_path / "cut" / "last"), weights(tmp_path / "whole" / "last")) == 0


def test_accumulation_steps_the_global_batch_and_scales_the_rate(shards: Path, tmp_path: Path) -> None:
    options = ShardTrainOptions(loader_workers=0, accumulate=2, precision="float32")
    run(shards, tmp_path / "acc", config(epochs=1, warmup_steps=1), options)
    logged = steps(tmp_path / "acc")
    assert len(logged) == 2  # 5 batches of 4: two steps of 2, the fifth batch left over
    # The rate is for a global batch of --batch-size (4); this run's is 8: twice the peak.
    assert logged[0]["lr"] == pytest.approx(2 * 1e-3)
    options = ShardTrainOptions(loader_workers=0, accumulate=2, lr_batch=8, precision="float32")
    run(shards, tmp_path / "acc8", config(epochs=1, warmup_steps=1), options)
    assert steps(tmp_path / "acc8")[0]["lr"] == pytest.approx(1e-3)


def test_bf16_autocast_trains(shards: Path, tmp_path: Path) -> None:
    options = ShardTrainOptions(loader_workers=0, precision="bfloat16")
    run(shards, tmp_path / "bf16", config(epochs=1), options)
    logged = steps(tmp_path / "bf16")
    assert len(logged) == 5 and all(torch.isfinite(torch.tensor(r["loss"])) for r in logged)
    model, _ = initial_model(CONFIG, config(), None, "all")
    assert largest_difference(weights(tmp_path / "bf16" / "last"), model.state_dict()) > 0
