"""Data-parallel training on Ray Train: N workers (TorchTrainer; gloo on CPU, NCCL on GPU),
each running shard_loop.train_on_shards on its part of every epoch.

Every worker builds the same initial model (same seed, or the same CLIP / own checkpoint),
so no weights are sent at start. Rank 0 writes the checkpoints into the run folder, which
every node must see at the same path (shared storage, as for `index --ray`). When a worker
dies (killed, out of memory, a lost node), Ray Train stops the group and starts it again, up
to `max_failures` times; each worker then resumes from the run folder's `last` checkpoint,
onto the batches an uninterrupted run would have trained on.

The driver follows the run through the writer's log (log.jsonl) for its progress display,
and reads the writer's result file when the workers are done.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pvl_search.model.config import ModelConfig
from pvl_search.training.loop import ProgressFn, TrainConfig, TrainResult
from pvl_search.training.shard_loop import ShardTrainOptions

RESULT_FILE = "result.json"  # the writer's TrainResult, for the driver


class TrainRunError(RuntimeError):
    """The Ray Train run failed (after its restarts): one line naming the worker's error."""


@dataclass
class RayTrainOptions:
    address: str = "local"  # "local" (start Ray here), "auto" (the running cluster) or "ray://HOST:PORT"
    workers: int = 2
    gpus_per_worker: float = 0.0  # > 0: NCCL, each worker on its share of a GPU
    max_failures: int = 3  # restarts of the worker group after a worker or node dies
    gather: bool = True  # False: per-worker contrastive losses (only to show what the gather buys)


@dataclass
class ShardJob:
    """Everything a worker needs to build and train its replica (plain values: it is pickled)."""

    shards: str
    out: str
    config: dict  # ModelConfig.to_dict()
    train: TrainConfig
    options: ShardTrainOptions
    init: str | None
    train_only: str
    gather: bool = True


def run_worker(job: ShardJob, rank_device: Callable[[], Any] | None = None) -> None:
    """One worker's whole part of the run (inside a Ray Train worker, torch.distributed set up)."""
    import torch

    from pvl_search.training.collective import TorchCollective
    from pvl_search.training.recipe import initial_model
    from pvl_search.training.shard_loop import train_on_shards
    from pvl_search.training.train_state import has_checkpoint

    out = Path(job.out)
    collective = TorchCollective(gather=job.gather)
    train = job.train
    if rank_device is not None:
        device = rank_device()
        if device.type == "cuda":
            torch.cuda.set_device(device)
            train = replace(train, device=str(device))
    model, trainable = initial_model(ModelConfig.from_dict(job.config), train, job.init, job.train_only)
    # The first start of a fresh run finds no checkpoint; a restart after a failure finds rank 0's.
    resume = has_checkpoint(out)
    result = train_on_shards(model, job.shards, out, train, job.options, collective=collective, resume=resume,
                             trainable=trainable)
    if collective.is_writer:
        tmp = out / (RESULT_FILE + ".tmp")
        record = {"steps": result.steps, "resumed_at": result.resumed_at, "seconds": result.seconds,
                  "best_epoch": result.best_epoch, "best_r1": result.best_r1}
        tmp.write_text(json.dumps(record))
        os.replace(tmp, out / RESULT_FILE)


def _train_loop(loop_config: dict) -> None:
    """Ray Train's entry point on each worker."""
    from ray.train.torch import get_device

    run_worker(loop_config["job"], get_device)


def train_with_ray(job: ShardJob, ray_options: RayTrainOptions, *, progress: ProgressFn | None = None) -> TrainResult:
    """Run `job` on `ray_options.workers` Ray Train workers and wait for it; one error line on failure."""
    from pvl_search.ray_connect import connect

    started = connect(ray_options.address, ray_options.workers, ray_options.gpus_per_worker)
    try:
        import ray
        from ray.train import FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer

        out = Path(job.out).absolute()
        out.mkdir(parents=True, exist_ok=True)
        (out / RESULT_FILE).unlink(missing_ok=True)
        job = ShardJob(**{**job.__dict__, "out": str(out), "shards": str(Path(job.shards).absolute()),
                          "gather": ray_options.gather})
        gpu = ray_options.gpus_per_worker > 0
        resources = {"CPU": 1.0, **({"GPU": ray_options.gpus_per_worker} if gpu else {})}
        trainer = TorchTrainer(
            _train_loop,
            train_loop_config={"job": job},
            torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
            scaling_config=ScalingConfig(num_workers=ray_options.workers, use_gpu=gpu,
                                         resources_per_worker=resources),
            run_config=RunConfig(name=f"pvl-train-{out.name}", storage_path=str(out / "ray"),
                                 failure_config=FailureConfig(max_failures=ray_options.max_failures)),
        )
        with _LogFollower(out / "log.jsonl", progress):
            try:
                trainer.fit()
            except Exception as error:  # noqa: BLE001 - Ray wraps the worker's error in its own types
                raise TrainRunError(f"Ray Train run failed: {_worker_error(error)}") from None
        record = json.loads((out / RESULT_FILE).read_text())
        return TrainResult(record["steps"], record["resumed_at"], record["seconds"], record["best_epoch"],
                           record["best_r1"], [])
    finally:
        if started:
            import ray

            ray.shutdown()


def _worker_error(error: BaseException) -> str:
    """The innermost error's first line: what went wrong on the worker, not Ray's wrapping."""
    while error.__cause__ is not None:
        error = error.__cause__
    lines = str(error).strip().splitlines()
    text = lines[-1] if lines else type(error).__name__
    return text if len(text) < 400 else text[:400] + "..."


class _LogFollower:
    """Calls `progress` with each record the writer appends to the log, from a thread."""

    def __init__(self, path: Path, progress: ProgressFn | None) -> None:
        self.path, self.progress = path, progress
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, daemon=True)

    def __enter__(self) -> _LogFollower:
        if self.progress is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _follow(self) -> None:
        offset = 0
        while not self._stop.wait(0.5):
            try:
                with open(self.path) as f:
                    f.seek(offset)
                    chunk = f.read()
            except OSError:
                continue
            complete = chunk[: chunk.rfind("\n") + 1]
            offset += len(complete.encode())
            for line in complete.splitlines():
                try:
                    self.progress(json.loads(line))  # type: ignore[misc]
                except ValueError:
                    continue
