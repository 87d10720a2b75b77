"""Data-parallel training on a real local Ray Train (2 CPU workers over gloo), from shards.

The acceptance of issue #26: two workers of batch B end with the weights one process reaches
with batch 2B on the same samples (the gathered contrastive loss makes it so, and the same run
without the gather does not); a worker killed with SIGKILL mid-run is restarted and the run
resumes from its checkpoint and completes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from index_helpers import assert_one_error_line, cli, cli_env, pvl_search

from pvl_search.model.checkpoint import load_model
from pvl_search.model.config import preset
from pvl_search.model.tokenizer import Tokenizer
from pvl_search.shards.format import Manifest, Sample, ShardEntry, SplitManifest, file_sha256, sample_key, shard_name
from pvl_search.shards.format import write_samples as write_tar
from pvl_search.shards.reader import ShardStream, collate, load_split, rank_order
from pvl_search.training.loop import TrainConfig
from pvl_search.training.loss_weights import LossWeights
from pvl_search.training.ray_train import RayTrainOptions, ShardJob, train_with_ray
from pvl_search.training.recipe import initial_model
from pvl_search.training.shard_loop import ShardTrainOptions, train_on_shards

pytest.importorskip("ray.train.torch")

CONFIG = preset("tiny")
WORDS = ["red", "green", "blue", "circle", "square", "moves", "left", "right", "up", "down", "grows", "spins"]
SEED = 3
BATCH = 4  # per worker


def write_shards(folder: Path, *, videos: int = 32, per_shard: int = 10, seed: int = 0) -> Manifest:
    """A train split of `videos` random clips with two word-salad captions each, as shards."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    samples = [Sample(sample_key("train", i), f"v{i}",
                      rng.integers(0, 256, (CONFIG.frames, CONFIG.frame_size, CONFIG.frame_size, 3), dtype=np.uint8),
                      np.ones(CONFIG.frames, bool), [" ".join(rng.choice(WORDS, 5)) for _ in range(2)])
               for i in range(videos)]
    entries = []
    for j in range(0, videos, per_shard):
        name = shard_name("train", j // per_shard)
        with open(folder / name, "wb") as f:
            write_tar(f, samples[j : j + per_shard])
        entries.append(ShardEntry(name, len(samples[j : j + per_shard]), file_sha256(folder / name)))
    manifest = Manifest(CONFIG.frames, CONFIG.frame_size, {"clips_per_video": 1}, "test",
                        {"train": SplitManifest(entries)}, per_shard)
    manifest.write(folder)
    return manifest


def train_config(steps_batch: int, **changes: object) -> TrainConfig:
    """The in-batch contrastive loss alone: the mixed-stream VTM loss draws its hard negatives at
    random from each worker's own batch, which no single process reproduces draw for draw."""
    return TrainConfig(epochs=1, batch_size=steps_batch, lr=1e-3, warmup_steps=2, seed=SEED, checkpoint_every=1000,
                       losses=LossWeights(mixed_vtm=0.0), **changes)


@dataclass
class GlobalBatches:
    """The reference's batches: step s is worker 0's batch s followed by worker 1's (the order
    the gather concatenates them in), built from the same samples and captions."""

    folder: Path
    world: int
    loader_workers: int

    def _orders(self) -> list[list[str]]:
        return [rank_order(self.folder, "train", seed=SEED, epoch=0, rank=r, world=self.world,
                           loader_workers=self.loader_workers, shuffle_buffer=256) for r in range(self.world)]

    def batches_per_epoch(self) -> int:
        return min(len(order) for order in self._orders()) // BATCH

    def epoch(self, epoch: int, skip: int):  # noqa: ANN201
        stream = ShardStream(self.folder, "train", text_length=CONFIG.text_length, seed=SEED, epoch=epoch)
        samples = {s.key: s for s in load_split(self.folder, "train")}
        tokenizer = Tokenizer(CONFIG.text_length)
        orders = self._orders()
        for step in range(skip, self.batches_per_epoch()):
            keys = [k for order in orders for k in order[step * BATCH : (step + 1) * BATCH]]
            yield collate([stream.training_sample(samples[k], tokenizer) for k in keys])


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_model(folder).state_dict()


def largest_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture
def ray_session():
    """A Ray of this process for one test, shut down after it: a second Ray alive on the machine
    while another test's `pvl-search train` starts its own made Ray Train's own address lookups
    fail ("Found multiple active Ray instances") and once hung that run's restart."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=128 * 1024**2, log_to_driver=False,
             configure_logging=False)
    yield ray
    ray.shutdown()


def test_two_workers_train_like_one_process_with_the_doubled_batch(tmp_path: Path, ray_session: object) -> None:
    shards = tmp_path / "shards"
    write_shards(shards)
    options = ShardTrainOptions(loader_workers=1, lr_batch=2 * BATCH, precision="float32")
    job = ShardJob(str(shards), str(tmp_path / "two"), CONFIG.to_dict(), train_config(BATCH), options, None, "all")
    result = train_with_ray(job, RayTrainOptions(workers=2))
    assert result.steps == 4  # 16 samples per worker, batches of 4

    # The reference: one process, batch 2B, the same samples per step.
    reference = one_process(shards, tmp_path / "one", options)
    together = largest_difference(weights(tmp_path / "two" / "last"), reference)
    # What float rounding alone moves: the same one-process run on another thread count (another
    # summation order, on any number of cores). Adam turns rounding noise into steps where a gradient
    # is zero in exact arithmetic (the key biases).
    threads = torch.get_num_threads()
    torch.set_num_threads(2 if threads == 1 else 1)
    try:
        rounding = largest_difference(one_process(shards, tmp_path / "other-threads", options), reference)
    finally:
        torch.set_num_threads(threads)

    # The same two workers without the gather: each worker's contrastive loss sees its own batch only.
    alone = ShardJob(**{**job.__dict__, "out": str(tmp_path / "alone")})
    train_with_ray(alone, RayTrainOptions(workers=2, gather=False))
    apart = largest_difference(weights(tmp_path / "alone" / "last"), reference)
    print(f"largest weight difference to one process: two workers {together:.2e}, without the gather {apart:.2e}; "
          f"one process on another thread count {rounding:.2e}")
    assert together <= max(4 * rounding, 1e-6), (together, rounding)
    assert apart > 100 * max(together, rounding)


def one_process(shards: Path, out: Path, options: ShardTrainOptions) -> dict[str, torch.Tensor]:
    model, _ = initial_model(CONFIG, train_config(2 * BATCH), None, "all")
    train_on_shards(model, shards, out, train_config(2 * BATCH), options, source=GlobalBatches(shards, 2, 1))
    return weights(out / "last")


def ray_train_workers() -> list[int]:
    """Pids of the Ray Train worker processes running now (Ray names them after their actor)."""
    listing = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [int(line.split()[0]) for line in listing.splitlines() if "ray::RayTrainWorker" in line]


def test_a_killed_worker_is_restarted_and_the_run_resumes_from_its_checkpoint(tmp_path: Path) -> None:
    shards, out = tmp_path / "shards", tmp_path / "run"
    write_shards(shards, videos=48)
    # 48 videos, 2 workers of batch 4: 6 steps an epoch, 60 in all, a checkpoint every 2.
    command = [pvl_search(), "train", "--shards", str(shards), "--out", str(out), "--workers", "2",
               "--epochs", "10", "--batch-size", "4", "--checkpoint-every", "2", "--loader-workers", "1", "--json"]
    run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env(),
                           start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and run.poll() is None:
            if (out / "last").is_dir() and _logged_steps(out)[-1:] >= [5] and ray_train_workers():
                break
            time.sleep(0.2)
        else:
            pytest.fail(f"the run did not reach step 5: {run.poll()} {run.stderr.read() if run.poll() else ''}")
        victim = ray_train_workers()[-1]
        killed_at = _logged_steps(out)[-1]
        os.kill(victim, signal.SIGKILL)
        stdout, stderr = run.communicate(timeout=300)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    assert run.returncode == 0, stderr[-2000:]
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["steps"] == 60
    assert 0 < summary["resumed_at"] <= killed_at + 2  # from a checkpoint, not from the start
    assert _logged_steps(out) == list(range(1, 61))  # the log reads as one uninterrupted run
    assert (out / "best" / "model.safetensors").is_file()
    assert victim not in ray_train_workers()


def _logged_steps(out: Path) -> list[int]:
    try:
        lines = (out / "log.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return []
    steps = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("kind") == "step":
            steps.append(record["step"])
    return steps


def test_train_from_shards_refuses_in_one_line(tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    write_shards(shards, videos=8)
    out = str(tmp_path / "run")
    assert_one_error_line(cli("train", "--out", out), "--captions", "--shards")
    assert_one_error_line(cli("train", "--shards", str(shards), "--out", out, "--config", "base"),
                          "8 frames of 64 px", "384")
    assert_one_error_line(cli("train", "--captions", str(tmp_path / "c.json"), "--out", out, "--workers", "2"),
                          "--shards")
    assert_one_error_line(cli("train", "--shards", str(shards), "--out", out, "--rerank-only-groups"),
                          "--rerank-only-groups")
    assert_one_error_line(cli("train", "--shards", str(tmp_path), "--out", out), "manifest.json")
