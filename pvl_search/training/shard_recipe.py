"""A whole training run from a shard folder (`pvl-search train --shards`): the run record,
the model (fresh, CLIP-initialised or from an own checkpoint), and one process or N Ray Train
workers; a summary the CLI prints, as `recipe.train_from_captions` gives."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from pvl_search.model.checkpoint import save_clip_seconds
from pvl_search.model.config import ModelConfig
from pvl_search.shards.format import Manifest
from pvl_search.training.loop import ProgressFn, TrainConfig
from pvl_search.training.ray_train import RayTrainOptions, ShardJob, train_with_ray
from pvl_search.training.recipe import (
    RunSummary,
    check_init_options,
    initial_model,
    record_run,
    training_clip_seconds,
)
from pvl_search.training.shard_loop import ShardTrainOptions, check_shard_options, train_on_shards


def train_from_shards(
    shards: str | Path,
    out_dir: str | Path,
    config: ModelConfig,
    cfg: TrainConfig,
    options: ShardTrainOptions,
    *,
    init: str | None = None,
    train_only: str = "all",
    resume: bool = False,
    ray: RayTrainOptions | None = None,
    progress: ProgressFn | None = None,
) -> RunSummary:
    """Train on the shards' train split (validating on their val split when they hold one), in
    this process, or on `ray.workers` Ray Train workers (`cfg.batch_size` is per worker)."""
    folder, out = Path(shards), Path(out_dir)
    manifest = Manifest.read(folder)
    train_part = manifest.split(options.train_split, folder)
    decisions = {"shards": str(folder), "shards_sha256": manifest.sha256, "config": config.to_dict(),
                 "train": cfg.to_dict(), "options": options.to_dict(), "init": init, "train_only": train_only,
                 "workers": ray.workers if ray else 1}
    record_run(out, decisions, resume=resume)
    clip = training_clip_seconds(manifest.source, None)
    if clip is not None:  # so the best weights tell `index` what windows fit them
        save_clip_seconds(out / "best", *clip)
    if ray is None:
        model, trainable = initial_model(config, cfg, init, train_only)
        result = train_on_shards(model, folder, out, cfg, options, resume=resume, trainable=trainable,
                                 progress=progress)
    else:
        # Refuse bad options here, in one line, not on N workers (without building a model here).
        check_init_options(init, train_only)
        check_shard_options(config, cfg, options, manifest, folder)
        job = ShardJob(str(folder), str(out), config.to_dict(), cfg, options, init, train_only)
        result = train_with_ray(job, ray, progress=progress)
    val = manifest.splits.get(options.val_split)
    failed = {**train_part.failed, **(val.failed if val else {})}
    return RunSummary(str(out), train_part.samples, val.samples if val else 0, failed, result.steps,
                      result.resumed_at, result.seconds, result.best_epoch, result.best_r1, init,
                      {**cfg.to_dict(), **asdict(options)})
