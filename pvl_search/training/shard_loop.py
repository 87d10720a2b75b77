"""Training from shards, on one process or many (data parallel): `train_on_shards`.

Each worker streams its own part of every epoch from the shard folder
(pvl_search.shards.reader: every sample once per epoch, none twice, the same plan on every
worker without talking). Per optimizer step a worker runs `accumulate` micro-batches of
`batch_size`; the in-batch losses see every worker's pairs through the collective's gather,
gradients are averaged over workers, and the one writer (rank 0) logs, validates and
checkpoints. So N workers with batch B train like one process with batch N*B
(collective.py says why), and a run killed anywhere resumes from its last checkpoint onto the
same batches.

The learning rate follows the global batch (workers x batch x accumulate): `lr` is the peak
for a global batch of `lr_batch` and scales linearly with it; warm-up and the cosine decay
count optimizer steps of the global batch.

What the single-process loop (loop.py) has and this one refuses: group-aware batches and
losses, mined negatives, and the synthetic stream (they need the whole training set in
one process).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Protocol, TextIO

import numpy as np
import torch

from pvl_search.data.pairs import FrameCache, PairSet
from pvl_search.model.checkpoint import save_model
from pvl_search.model.config import ModelConfig
from pvl_search.model.perceiver import PerceiverVL
from pvl_search.model.tokenizer import Tokenizer
from pvl_search.precision import choose_dtype
from pvl_search.shards.format import Manifest
from pvl_search.shards.reader import ShardBatch, load_split, shard_batches, steps_per_epoch
from pvl_search.training.attribute_heads import AttributeHeads
from pvl_search.training.collective import Solo
from pvl_search.training.loop import ProgressFn, TrainConfig, TrainResult, learning_rate, selection_metric
from pvl_search.training.losses import compute_losses
from pvl_search.training.train_setup import make_optimizer, training_parameters, uses_attribute_heads
from pvl_search.training.train_state import check_resumable, restore_checkpoint, rewind_log, write_checkpoint
from pvl_search.training.validation import ValidationResult, evaluate


@dataclass
class ShardTrainOptions:
    """How a shard run feeds and steps, beyond TrainConfig (whose batch_size is per worker)."""

    loader_workers: int = 2  # data-loader processes per worker
    shuffle_buffer: int = 256  # samples shuffled together within a reader (beside the shard order)
    accumulate: int = 1  # micro-batches per optimizer step
    lr_batch: int | None = None  # the global batch `lr` is meant for (None: batch_size, i.e. no scaling alone)
    precision: str = "auto"  # autocast: auto (bf16 on CUDA and on CPUs with native bf16), float32, bfloat16
    train_split: str = "train"
    val_split: str = "val"  # validated on when the shards hold it

    def to_dict(self) -> dict:
        return asdict(self)


class BatchSource(Protocol):
    """Where a worker's micro-batches come from: the same count every epoch, and an epoch's
    batches in a fixed order from any starting point."""

    def batches_per_epoch(self) -> int: ...

    def epoch(self, epoch: int, skip: int) -> Iterator[ShardBatch]: ...


@dataclass
class ShardSource:
    """This worker's part of a shard folder's split (the reader's plan)."""

    folder: Path
    split: str
    batch_size: int
    text_length: int
    seed: int
    rank: int = 0
    world: int = 1
    loader_workers: int = 2
    shuffle_buffer: int = 256
    scene_labels: tuple[int, int, int] | None = None  # (frames, size, patch) when a loss needs them

    def batches_per_epoch(self) -> int:
        part = Manifest.read(self.folder).split(self.split, self.folder)
        return steps_per_epoch(part, world=self.world, loader_workers=self.loader_workers,
                               batch_size=self.batch_size)

    def epoch(self, epoch: int, skip: int) -> Iterator[ShardBatch]:
        return shard_batches(self.folder, self.split, batch_size=self.batch_size, text_length=self.text_length,
                             seed=self.seed, epoch=epoch, rank=self.rank, world=self.world,
                             loader_workers=self.loader_workers, shuffle_buffer=self.shuffle_buffer, skip=skip,
                             with_scene_labels=self.scene_labels)


def check_shard_options(config: ModelConfig, cfg: TrainConfig, options: ShardTrainOptions, manifest: Manifest,
                        folder: Path) -> None:
    """Refuse what cannot train from these shards, in one line, before anything starts."""
    if (manifest.frames, manifest.size) != (config.frames, config.frame_size):
        raise ValueError(f"{folder}: shards hold {manifest.frames} frames of {manifest.size} px, the model takes "
                         f"{config.frames} of {config.frame_size} (write shards with the model's --config, or "
                         "pass --frames/--size to `pvl-search shards`)")
    if cfg.group_batches_from is not None or cfg.rerank_only_groups or cfg.mined_negatives:
        raise ValueError("training from shards does not support group batches, --rerank-only-groups or mined "
                         "negatives (they need the whole training set in one process)")
    if cfg.losses.latent_nce and not config.latent_reranker:
        raise ValueError("the latent reranker's loss needs a model with one (--latent-reranker)")
    if options.accumulate < 1:
        raise ValueError(f"--accumulate must be at least 1, not {options.accumulate}")
    if options.precision not in ("auto", "float32", "bfloat16"):
        raise ValueError(f"--precision must be auto, float32 or bfloat16, not {options.precision!r}")


def autocast_for(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast where it pays (CUDA, CPUs with native bf16) or where asked; else none."""
    dtype = choose_dtype(precision, device)
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def validation_set(folder: Path, manifest: Manifest, split: str, text_length: int) -> PairSet | None:
    """The shards' validation split as an in-memory PairSet (small by design), or None."""
    if split not in manifest.splits or not manifest.splits[split].samples:
        return None
    samples = load_split(folder, split)
    cache = FrameCache(np.stack([s.frames for s in samples]), np.stack([s.mask for s in samples]),
                       [s.key for s in samples])
    return PairSet(cache, {s.key: s.captions for s in samples}, Tokenizer(text_length),
                   groups={s.key: str(s.meta["group"]) for s in samples if "group" in s.meta})


@dataclass
class _Run:
    model: PerceiverVL
    cfg: TrainConfig
    options: ShardTrainOptions
    out: Path
    device: torch.device
    optimizer: torch.optim.Optimizer
    params: list[torch.nn.Parameter]
    heads: AttributeHeads | None
    collective: Solo
    autocast: contextlib.AbstractContextManager
    lr_cfg: TrainConfig  # cfg with the learning rate scaled to the global batch
    log: TextIO | None
    progress: ProgressFn | None
    total_steps: int
    global_batch: int
    step: int
    best_r1: float
    best_epoch: int
    history: list[ValidationResult] = field(default_factory=list)
    began: float = field(default_factory=time.perf_counter)
    first_step: int = 0


def train_on_shards(
    model: PerceiverVL,
    shards: str | Path,
    out_dir: str | Path,
    cfg: TrainConfig,
    options: ShardTrainOptions,
    *,
    collective: Solo | None = None,
    resume: bool = False,
    trainable: list[torch.nn.Parameter] | None = None,
    progress: ProgressFn | None = None,
    source: BatchSource | None = None,
) -> TrainResult:
    """Train `model` in place on the shard folder's train split; see the module doc.

    Every worker calls this with its collective (None: one process). `out_dir` must be the same
    folder for all (shared storage across machines): the writer keeps `last` (resumable) and
    `best` there, and `log.jsonl`. `source` replaces the shard reader (tests feed given batches)."""
    folder, out = Path(shards), Path(out_dir)
    collective = collective or Solo()
    manifest = Manifest.read(folder)
    check_shard_options(model.config, cfg, options, manifest, folder)
    config = model.config
    torch.manual_seed(cfg.seed)
    device = torch.device(cfg.device)
    model.to(device)
    params, heads = training_parameters(model, cfg, trainable, device)
    optimizer = make_optimizer(params, cfg)
    if source is None:
        needs_labels = uses_attribute_heads(cfg) or bool(cfg.losses.token_attributes)
        source = ShardSource(folder, options.train_split, cfg.batch_size, config.text_length, cfg.seed,
                             collective.rank, collective.world, options.loader_workers, options.shuffle_buffer,
                             (config.frames, config.frame_size, config.patch) if needs_labels else None)
    micro = source.batches_per_epoch()
    steps_per_epoch = micro // options.accumulate
    if steps_per_epoch < 1:
        raise ValueError(f"{folder}: {micro} batches of {cfg.batch_size} per worker and epoch is fewer than one "
                         f"optimizer step of {options.accumulate} (fewer workers or a smaller --batch-size)")
    global_batch = cfg.batch_size * collective.world * options.accumulate
    lr_cfg = replace(cfg, lr=cfg.lr * global_batch / (options.lr_batch or cfg.batch_size))
    meta = {"step": 0, "epoch": 0, "best_r1": -1.0, "best_epoch": -1}
    log_path = out / "log.jsonl"
    if resume:
        check_resumable(out)
        meta = restore_checkpoint(out / "last", model, optimizer, None, heads)
    log = None
    if collective.is_writer:
        out.mkdir(parents=True, exist_ok=True)
        if resume:
            rewind_log(log_path, meta)
        log = open(log_path, "a" if resume else "w")
    run = _Run(model, cfg, options, out, device, optimizer, params, heads, collective,
               autocast_for(device, options.precision), lr_cfg, log, progress, steps_per_epoch * cfg.epochs,
               global_batch, meta["step"], meta["best_r1"], meta["best_epoch"])
    run.first_step = run.step
    val = validation_set(folder, manifest, options.val_split, config.text_length) if collective.is_writer else None
    try:
        for epoch in range(meta["epoch"], cfg.epochs):
            _train_epoch(run, source, epoch, steps_per_epoch)
            _end_epoch(run, val, epoch)
    finally:
        if log is not None:
            log.close()
    if collective.is_writer and val is None:
        save_model(model, out / "best")
    collective.barrier()
    return TrainResult(run.step, run.first_step, time.perf_counter() - run.began, run.best_epoch, run.best_r1,
                       run.history)


def _train_epoch(run: _Run, source: BatchSource, epoch: int, steps_per_epoch: int) -> None:
    accumulate = run.options.accumulate
    done = run.step - epoch * steps_per_epoch  # optimizer steps of this epoch before a resume
    wanted = (steps_per_epoch - done) * accumulate
    pending: list[ShardBatch] = []
    for i, batch in enumerate(source.epoch(epoch, done * accumulate)):
        if i >= wanted:
            break
        pending.append(batch)
        if len(pending) == accumulate:
            _step(run, pending, epoch)
            pending = []


def _step(run: _Run, micro: list[ShardBatch], epoch: int) -> None:
    """One optimizer step over this worker's micro-batches, gradients averaged over workers."""
    cfg, optimizer = run.cfg, run.optimizer
    run.model.train()
    torch.manual_seed(cfg.seed * 1_000_003 + run.step)  # LayerDrop and sampling: the same on every worker
    for group in optimizer.param_groups:
        group["lr"] = learning_rate(run.step, run.total_steps, run.lr_cfg)
    optimizer.zero_grad(set_to_none=True)
    weights = cfg.losses if epoch >= cfg.retrieval_from else cfg.losses.in_first_phase()
    parts: dict[str, float] = {}
    total = 0.0
    for batch in micro:
        with run.autocast:
            losses = compute_losses(run.model, batch.frames.to(run.device), batch.mask.to(run.device),
                                    batch.token_ids.to(run.device), weights,
                                    attribute_labels=_on(batch.labels, run.device), heads=run.heads,
                                    token_labels=_on(batch.token_labels, run.device),
                                    gather=run.collective.gather)
        (losses.total / len(micro)).backward()
        total += float(losses.total.detach()) / len(micro)
        for name, value in losses.parts.items():
            parts[name] = parts.get(name, 0.0) + value / len(micro)
    run.collective.average_gradients(run.params)
    torch.nn.utils.clip_grad_norm_(run.params, cfg.grad_clip)
    optimizer.step()
    run.step += 1
    record = {"kind": "step", "step": run.step, "epoch": epoch, "total_steps": run.total_steps, "loss": total,
              **parts, "lr": optimizer.param_groups[0]["lr"], "workers": run.collective.world,
              "samples_per_s": (run.step - run.first_step) * run.global_batch / (time.perf_counter() - run.began)}
    if run.log is not None:
        run.log.write(json.dumps(record) + "\n")
        run.log.flush()
    if run.progress:
        run.progress(record)
    if run.step % cfg.checkpoint_every == 0:
        _checkpoint(run, epoch)


def _on(tensor: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if tensor is None else tensor.to(device)


def _end_epoch(run: _Run, val: PairSet | None, epoch: int) -> None:
    """Validate on the writer (the others wait), log the epoch, write `last`."""
    cfg = run.cfg
    record: dict = {"kind": "epoch", "epoch": epoch, "step": run.step, "seconds": time.perf_counter() - run.began}
    due = (epoch + 1) % cfg.val_every == 0 or epoch + 1 == cfg.epochs
    if run.collective.is_writer and due and val is not None and len(val):
        metrics = evaluate(run.model, val, device=cfg.device, rerank_k=cfg.val_rerank_k)
        run.history.append(ValidationResult(epoch, metrics["multi"], metrics["mixed"], metrics["reranked"]))
        record |= {f"val_{name}": m.to_dict() for name, m in metrics.items()}
        r1 = metrics[selection_metric(cfg)].r1
        if r1 > run.best_r1:
            run.best_r1, run.best_epoch = r1, epoch
            save_model(run.model, run.out / "best")
    if run.log is not None:
        run.log.write(json.dumps(record) + "\n")
        run.log.flush()
    if run.progress:
        run.progress(record)
    _checkpoint(run, epoch + 1)


def _checkpoint(run: _Run, epoch: int) -> None:
    """`last` (resumable; `epoch` is the one a resume starts in), by the writer; the others wait
    so that no worker runs ahead of the checkpoint a restart would go back to."""
    if run.collective.is_writer:
        meta = {"step": run.step, "epoch": epoch, "best_r1": run.best_r1, "best_epoch": run.best_epoch}
        write_checkpoint(run.model, run.out / "last", run.optimizer, meta, None, run.heads)
    run.collective.barrier()
