"""Training loop: AdamW, warm-up + cosine schedule, gradient clipping, LayerDrop (in the
model), safetensors checkpoints with resumable optimizer state, per-epoch validation
(validation.py) that keeps the best checkpoint, and a JSON-lines log."""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TextIO

import torch

from pvl_search.data.pairs import PairSet
from pvl_search.data.scene_stream import SceneStream
from pvl_search.model.checkpoint import save_model
from pvl_search.model.perceiver import PerceiverVL
from pvl_search.training.attribute_heads import AttributeHeads
from pvl_search.training.loss_weights import LossWeights
from pvl_search.training.losses import LossOutput, compute_losses
from pvl_search.training.negative_bank import NegativeBank
from pvl_search.training.train_setup import check_options, make_optimizer, training_parameters
from pvl_search.training.train_state import check_resumable, restore_checkpoint, rewind_log, write_checkpoint
from pvl_search.training.validation import ValidationResult, evaluate, probe_summary


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 32
    lr: float = 5e-4
    weight_decay: float = 0.05
    warmup_steps: int = 100
    grad_clip: float = 1.0
    seed: int = 0
    checkpoint_every: int = 200  # steps; a checkpoint is also written at every epoch end
    val_rerank_k: int = 16  # candidates re-scored in the validation "reranked" metric
    # From this epoch on (0 = always, None = never), fill batches with whole groups of related
    # videos (PairSet.groups, e.g. the synthetic benchmark's hard-negative twins) so in-batch
    # negatives include the hardest ones. From the start they stall learning: a curriculum.
    group_batches_from: int | None = None
    # Group members are negatives for the reranking heads only: the multi-stream
    # contrastive loss ignores same-group pairs (see losses.compute_losses).
    rerank_only_groups: bool = False
    # Extra negatives per caption for the listwise mixed-stream loss, mined from a bank of
    # every training video's latest embedding (pvl_search.training.negative_bank); 0 = none.
    mined_negatives: int = 0
    losses: LossWeights = field(default_factory=LossWeights)
    device: str = "cpu"
    val_every: int = 1  # epochs between validations (the last epoch is always validated)
    # A curriculum: before this epoch only the attribute losses train (those declared
    # first_phase in loss_weights.py; retrieval and reranking losses off), so the encoders learn
    # shape, motion and order before a contrastive loss can settle on colour alone. 0 = every
    # loss from the start.
    retrieval_from: int = 0
    # Linear probes at each validation (pvl_search.training.probes): fitted on this many training
    # videos' embeddings, scored on the validation videos; 0 = off. Needs scene labels.
    probe_videos: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainResult:
    steps: int
    resumed_at: int  # the step a resumed run continued from (0: it started fresh)
    seconds: float
    best_epoch: int
    best_r1: float
    history: list[ValidationResult]


# An event for the caller's progress display: {"kind": "step"|"epoch", ...numbers}.
ProgressFn = Callable[[dict], None]


def learning_rate(step: int, total: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def epoch_batches(
    n: int, batch_size: int, generator: torch.Generator, groups: Sequence[str] | None = None
) -> Iterator[list[int]]:
    """A random permutation cut into full batches (a short last batch would weaken the
    contrastive loss and skew the step count). With `groups` (one label per item) the
    groups are shuffled and laid end to end, items shuffled within each, so that members of
    a group mostly share a batch."""
    if groups is None:
        order = torch.randperm(n, generator=generator).tolist()
    else:
        members: dict[str, list[int]] = {}
        for i, label in enumerate(groups):
            members.setdefault(label, []).append(i)
        labels = list(members)
        order = []
        for g in torch.randperm(len(labels), generator=generator).tolist():
            items = members[labels[g]]
            order += [items[j] for j in torch.randperm(len(items), generator=generator).tolist()]
    for start in range(0, n - batch_size + 1, batch_size):
        yield order[start : start + batch_size]


def selection_metric(cfg: TrainConfig) -> str:
    """The validation metric whose R@1 picks the best checkpoint."""
    if cfg.losses.latent_nce:
        return "latent_reranked"
    return "reranked" if cfg.losses.mixed_vtm or cfg.losses.mixed_nce else "multi"


def train(
    model: PerceiverVL,
    train_data: PairSet | SceneStream,
    val_data: PairSet | None,
    cfg: TrainConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    trainable: list[torch.nn.Parameter] | None = None,
    progress: ProgressFn | None = None,
) -> TrainResult:
    """Train in place. `out_dir/last` is the newest checkpoint (resumable), `out_dir/best`
    the one with the best validation R@1 (see `selection_metric`), `out_dir/log.jsonl` the log.

    `train_data` may be a SceneStream: epoch e then trains on its chunk for e (fresh videos),
    written ahead by a background process."""
    out = Path(out_dir)
    stream = train_data if isinstance(train_data, SceneStream) else None
    out.mkdir(parents=True, exist_ok=True)
    check_options(model, train_data, stream, cfg)
    torch.manual_seed(cfg.seed)
    device = torch.device(cfg.device)
    model.to(device)
    params, heads = training_parameters(model, cfg, trainable, device)
    optimizer = make_optimizer(params, cfg)
    steps_per_epoch = len(train_data) // cfg.batch_size
    bank = None
    if cfg.mined_negatives:
        bank = NegativeBank(len(train_data), model.config.embed_dim, model.config.rerank_state_width)
    meta = {"step": 0, "epoch": 0, "best_r1": -1.0, "best_epoch": -1}
    log_path = out / "log.jsonl"
    if resume:  # a resume with nothing (readable) to resume is an error, never a silent fresh start
        check_resumable(out)
        meta = restore_checkpoint(out / "last", model, optimizer, bank, heads)
        rewind_log(log_path, meta)
    generator = torch.Generator().manual_seed(cfg.seed)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    # A fresh run starts its log afresh: lines of one stopped before its first checkpoint go.
    log = open(log_path, "a" if resume else "w")
    run = _TrainRun(model, cfg, out, device, optimizer, params, heads, bank, autocast, log, progress,
                    steps_per_epoch * cfg.epochs, meta["step"], meta["best_r1"], meta["best_epoch"])
    if stream is not None:
        stream.start(meta["epoch"], cfg.epochs)
    try:
        for epoch in range(meta["epoch"], cfg.epochs):
            data = stream.for_epoch(epoch) if stream is not None else train_data
            _train_epoch(run, data, epoch, generator, steps_per_epoch)
            _end_epoch(run, data, val_data, epoch)
    finally:
        log.close()
        if stream is not None:
            stream.stop()
    if val_data is None:
        save_model(model, out / "best")
    return TrainResult(run.step, run.first_step, time.perf_counter() - run.began, run.best_epoch, run.best_r1,
                       run.history)


@dataclass
class _TrainRun:
    """What one call of `train` works with; its steps and validations update the counters."""

    model: PerceiverVL
    cfg: TrainConfig
    out: Path
    device: torch.device
    optimizer: torch.optim.Optimizer
    params: list[torch.nn.Parameter]  # clipped together; the optimizer's parameters
    heads: AttributeHeads | None
    bank: NegativeBank | None
    autocast: contextlib.AbstractContextManager
    log: TextIO
    progress: ProgressFn | None
    total_steps: int
    step: int  # optimizer steps so far, before a resume included
    best_r1: float
    best_epoch: int
    history: list[ValidationResult] = field(default_factory=list)
    began: float = field(default_factory=time.perf_counter)
    first_step: int = field(init=False)  # samples/s counts this process's steps only

    def __post_init__(self) -> None:
        self.first_step = self.step


def _train_epoch(run: _TrainRun, data: PairSet, epoch: int, generator: torch.Generator, steps_per_epoch: int) -> None:
    """The steps of one epoch; after a resume, the batches already trained on are drawn and skipped."""
    cfg = run.cfg
    # Re-seed per epoch so a resumed run sees the batches an uninterrupted one would.
    generator.manual_seed(cfg.seed * 1000 + epoch)
    skip = run.step - epoch * steps_per_epoch  # batches of this epoch done before a resume
    grouped = cfg.group_batches_from is not None and epoch >= cfg.group_batches_from
    labels = data.groups if grouped else None
    for i, indices in enumerate(epoch_batches(len(data), cfg.batch_size, generator, labels)):
        frames, masks, ids = data.batch(indices, generator)
        if i < skip:
            continue
        _train_step(run, data, epoch, indices, (frames, masks, ids))


def _train_step(run: _TrainRun, data: PairSet, epoch: int, indices: list[int],
                batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
    """One optimizer step, its log line, and a checkpoint every `checkpoint_every` steps."""
    cfg, optimizer = run.cfg, run.optimizer
    run.model.train()
    # Per-step seed: LayerDrop, negative sampling and MLM masks are the same
    # whether or not the run was interrupted and resumed.
    torch.manual_seed(cfg.seed * 1_000_003 + run.step)
    for group in optimizer.param_groups:
        group["lr"] = learning_rate(run.step, run.total_steps, cfg)
    with run.autocast:
        losses = _batch_losses(run, data, epoch, indices, batch)
    optimizer.zero_grad(set_to_none=True)
    losses.total.backward()
    torch.nn.utils.clip_grad_norm_(run.params, cfg.grad_clip)
    optimizer.step()
    run.step += 1
    record = {"kind": "step", "step": run.step, "epoch": epoch, "total_steps": run.total_steps,
              "loss": float(losses.total.detach()), **losses.parts,
              "lr": optimizer.param_groups[0]["lr"],
              "samples_per_s": (run.step - run.first_step) * cfg.batch_size / (time.perf_counter() - run.began)}
    run.log.write(json.dumps(record) + "\n")
    if run.progress:
        run.progress(record)
    if run.step % cfg.checkpoint_every == 0:
        _checkpoint(run, epoch)


def _batch_losses(run: _TrainRun, data: PairSet, epoch: int, indices: list[int],
                  batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> LossOutput:
    """`compute_losses` on one batch, with the weights of the curriculum's phase at `epoch`."""
    cfg, device = run.cfg, run.device
    frames, masks, ids = batch
    batch_groups = data.group_ids(indices).to(device) if cfg.rerank_only_groups else None
    weights = cfg.losses if epoch >= cfg.retrieval_from else cfg.losses.in_first_phase()
    labels = data.labels_of(indices) if run.heads is not None else None
    dense_labels = data.token_labels_of(indices) if cfg.losses.token_attributes else None
    return compute_losses(run.model, frames.to(device), masks.to(device), ids.to(device), weights,
                          groups=batch_groups, bank=run.bank, rows=torch.tensor(indices), mined=cfg.mined_negatives,
                          attribute_labels=None if labels is None else labels.to(device), heads=run.heads,
                          token_labels=None if dense_labels is None else dense_labels.to(device))


def _end_epoch(run: _TrainRun, data: PairSet, val_data: PairSet | None, epoch: int) -> None:
    """Validate (when due), log the epoch and write the resumable checkpoint `last`."""
    cfg = run.cfg
    record = {"kind": "epoch", "epoch": epoch, "step": run.step, "seconds": time.perf_counter() - run.began}
    validate = (epoch + 1) % cfg.val_every == 0 or epoch + 1 == cfg.epochs
    if validate and val_data is not None and len(val_data):
        record |= _validate(run, data, val_data, epoch)
    run.log.write(json.dumps(record) + "\n")
    run.log.flush()
    if run.progress:
        run.progress(record)
    _checkpoint(run, epoch + 1)


def _validate(run: _TrainRun, data: PairSet, val_data: PairSet, epoch: int) -> dict:
    """Validation metrics for the epoch's log record; saves `best` when they beat it."""
    cfg, model = run.cfg, run.model
    twins: dict[str, dict[str, float]] = {}
    val = evaluate(model, val_data, device=cfg.device, rerank_k=cfg.val_rerank_k, groups=twins)
    run.history.append(ValidationResult(epoch, val["multi"], val["mixed"], val["reranked"], twins))
    record: dict = {f"val_{name}": metrics.to_dict() for name, metrics in val.items()}
    record["val_groups"] = twins
    if cfg.probe_videos and data.labels is not None and val_data.labels is not None:
        record["val_probes"] = probe_summary(model, data, val_data, cfg.probe_videos)
    # Keep what a search will use: reranked results once the mixed head is trained.
    r1 = val[selection_metric(cfg)].r1
    if r1 > run.best_r1:
        run.best_r1, run.best_epoch = r1, epoch
        save_model(model, run.out / "best")
    return record


def _checkpoint(run: _TrainRun, epoch: int) -> None:
    """`last`, resumable: `epoch` is the one a resume starts in."""
    meta = {"step": run.step, "epoch": epoch, "best_r1": run.best_r1, "best_epoch": run.best_epoch}
    write_checkpoint(run.model, run.out / "last", run.optimizer, meta, run.bank, run.heads)

