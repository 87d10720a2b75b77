"""Training loop: AdamW, warm-up + cosine schedule, gradient clipping, LayerDrop (in the
model), safetensors checkpoints with resumable optimizer state, per-epoch validation that
keeps the best checkpoint, and a JSON-lines log."""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from pvl_search.training.attribute_heads import AttributeHeads
from pvl_search.model.checkpoint import load_state, save_model
from pvl_search.training.losses import LossWeights, compute_losses
from pvl_search.metrics import RetrievalMetrics, group_metrics, ranks_after_rerank, ranks_from_scores, retrieval_metrics
from pvl_search.model.perceiver import PerceiverVL
from pvl_search.training.negative_bank import NegativeBank
from pvl_search.training.pairs import PairSet
from pvl_search.data.scene_stream import SceneStream

TRAIN_STATE_FILE = "train_state.safetensors"
BANK_FILE = "negative_bank.safetensors"
HEADS_FILE = "attribute_heads.safetensors"


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
    # A curriculum: before this epoch only the attribute losses train (retrieval and reranking
    # losses off), so the encoders learn shape, motion and order before a contrastive loss can
    # settle on colour alone. 0 = every loss from the start.
    retrieval_from: int = 0
    # Linear probes at each validation (pvl_search.experiments.probes): fitted on this many training
    # videos' embeddings, scored on the validation videos; 0 = off. Needs scene labels.
    probe_videos: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ValidationResult:
    epoch: int
    multi: RetrievalMetrics  # multi-stream embeddings alone
    mixed: RetrievalMetrics  # mixed-stream decoder alone, over every video
    reranked: RetrievalMetrics  # the search default: multi top-k, re-scored by similarity + mixed logit
    groups: dict[str, dict[str, float]] = field(default_factory=dict)  # method -> twin-group metrics


@dataclass
class TrainResult:
    steps: int
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


@torch.no_grad()
def score_matrices(
    model: PerceiverVL, data: PairSet, *, batch_size: int = 32, device: str = "cpu"
) -> tuple[dict[str, np.ndarray], list[int]]:
    """Every caption of `data` against every video, (captions, videos) each: "multi"
    (multi-stream similarity), "mixed" (the [CLS] decoder's logits) and, when the model has
    one, "latent" (the latent reranker's logits); and each caption's video index."""
    model.eval()
    g = torch.Generator().manual_seed(0)
    embeddings, states, latents = [], [], []
    for start in range(0, len(data), batch_size):
        frames, masks, _ = data.batch(range(start, min(len(data), start + batch_size)), g)
        out = model.encode_video(frames.to(device), masks.to(device))
        embeddings.append(out.embedding)
        states.append(model.rerank_state(out.latents))
        latents.append(out.latents)
    video_embedding, video_states, video_latents = torch.cat(embeddings), torch.cat(states), torch.cat(latents)
    ids, owners = data.all_captions()
    parts: dict[str, list[torch.Tensor]] = {"multi": [], "mixed": []}
    if model.latent_reranker is not None:
        parts["latent"] = []
    for start in range(0, len(ids), batch_size):
        text = model.encode_text(ids[start : start + batch_size].to(device))
        parts["multi"].append(text.embedding @ video_embedding.T)
        parts["mixed"].append(model.mixed_scores(model.rerank_state(text.latents), video_states))
        if "latent" in parts:  # a few queries at a time: the pair tensor is (Q, V, H, N, N)
            parts["latent"].append(torch.cat([model.latent_scores(text.latents[i : i + 4], video_latents)
                                              for i in range(0, len(text.latents), 4)]))
    return {name: torch.cat(p).float().cpu().numpy() for name, p in parts.items()}, owners


def evaluate(
    model: PerceiverVL, data: PairSet, *, batch_size: int = 32, device: str = "cpu", rerank_k: int = 16,
    groups: dict[str, dict[str, float]] | None = None,
) -> dict[str, RetrievalMetrics]:
    """Text-to-video R@K over `data`, every caption a query: "multi" (embedding dot product),
    "mixed" (factorised decoder over all videos), "reranked" (multi-stream top `rerank_k`
    re-scored by similarity + mixed logit, as `pvl-search search` does by default) and, with a
    latent reranker, "latent" and "latent_reranked" likewise.

    With `groups` (a dict to fill), each method's twin-group metrics go there too."""
    scores, owners = score_matrices(model, data, batch_size=batch_size, device=device)
    multi = scores["multi"]
    if groups is not None:
        groups.update({name: group_metrics(s, owners, data.groups) for name, s in scores.items()})
    result = {name: retrieval_metrics(ranks_from_scores(s, owners)) for name, s in scores.items()}
    result["reranked"] = retrieval_metrics(ranks_after_rerank(multi, multi + scores["mixed"], owners, rerank_k))
    if "latent" in scores:
        result["latent_reranked"] = retrieval_metrics(
            ranks_after_rerank(multi, multi + scores["latent"], owners, rerank_k))
    return result


def attributes_only(weights: LossWeights) -> LossWeights:
    """The curriculum's first phase: the same attribute weights, every other loss off."""
    return LossWeights(contrastive=0.0, mixed_vtm=0.0, mixed_nce=0.0, single_vtm=0.0, mlm=0.0, latent_nce=0.0,
                       attributes=weights.attributes, token_attributes=weights.token_attributes)


def selection_metric(cfg: TrainConfig) -> str:
    """The validation metric whose R@1 picks the best checkpoint."""
    if cfg.losses.latent_nce:
        return "latent_reranked"
    return "reranked" if cfg.losses.mixed_vtm or cfg.losses.mixed_nce else "multi"


def save_train_state(folder: Path, optimizer: torch.optim.Optimizer, meta: dict) -> None:
    """Optimizer moments as safetensors and counters as metadata: resuming never unpickles."""
    tensors, scalars = {}, {}
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value) and value.dim() > 0:
                tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{key}"] = float(value)
    tmp = folder / (TRAIN_STATE_FILE + ".tmp")
    save_file(tensors, str(tmp), metadata={"meta": json.dumps(meta), "scalars": json.dumps(scalars)})
    os.replace(tmp, folder / TRAIN_STATE_FILE)


def load_train_state(folder: Path, optimizer: torch.optim.Optimizer) -> dict:
    from safetensors import safe_open

    path = folder / TRAIN_STATE_FILE
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(path))
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    for name, value in json.loads(metadata["scalars"]).items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = torch.tensor(value)
    saved = optimizer.state_dict()
    saved["state"] = state
    optimizer.load_state_dict(saved)
    return json.loads(metadata["meta"])


def _write_checkpoint(
    model: PerceiverVL, folder: Path, optimizer: torch.optim.Optimizer, meta: dict, bank: NegativeBank | None,
    heads: AttributeHeads | None = None,
) -> None:
    save_model(model, folder)
    if heads is not None:  # training-only weights: part of the state a resume needs
        tmp = folder / (HEADS_FILE + ".tmp")
        save_file({k: v.detach().cpu().contiguous() for k, v in heads.state_dict().items()}, str(tmp))
        os.replace(tmp, folder / HEADS_FILE)
    if bank is not None:  # part of the training state: a resumed run mines what this one would
        tmp = folder / (BANK_FILE + ".tmp")
        save_file({k: v.contiguous() for k, v in bank.state_dict().items()}, str(tmp))
        os.replace(tmp, folder / BANK_FILE)
    save_train_state(folder, optimizer, meta)


def _probe_summary(model: PerceiverVL, train_data: PairSet, val_data: PairSet, videos: int) -> dict:
    """Per-attribute probe accuracy of both embeddings, fitted on `videos` training videos."""
    from pvl_search.training.pairs import subset
    from pvl_search.experiments.probes import run_probes, probe_features

    report = run_probes(probe_features(model, subset(train_data, range(min(videos, len(train_data))))),
                        probe_features(model, val_data), features=("video_embedding", "text_embedding"))
    keep = ("colour", "shape", "size", "motion", "shape_by_time", "motion_by_time", "order", "binding")
    return {feature: {k: round(row[k], 3) for k in keep} for feature, row in report.items() if feature != "chance"}


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
    if len(train_data) < cfg.batch_size:
        raise ValueError(f"{len(train_data)} training videos is fewer than one batch of {cfg.batch_size}")
    if cfg.retrieval_from and not (cfg.losses.attributes or cfg.losses.token_attributes):
        raise ValueError("a curriculum (retrieval from a later epoch) needs attribute losses to train before it")
    if cfg.losses.latent_nce and model.latent_reranker is None:
        raise ValueError("the latent reranker's loss needs a model with one (--latent-reranker)")
    if cfg.mined_negatives and not cfg.losses.mixed_nce:
        raise ValueError("mined negatives feed the listwise mixed-stream loss: give it a weight (--mixed-nce)")
    if stream is not None and (cfg.mined_negatives or cfg.rerank_only_groups):
        raise ValueError("mined negatives and --rerank-only-groups need a fixed training set, not a stream")
    if cfg.losses.attributes and stream is None and train_data.labels is None:
        raise ValueError("the attribute loss needs scene labels (a synthetic benchmark's captions file)")
    torch.manual_seed(cfg.seed)
    device = torch.device(cfg.device)
    model.to(device)
    params = trainable if trainable is not None else list(model.parameters())
    if trainable is not None:  # e.g. stage one of the paper's CLIP schedule: the rest is frozen
        keep = {id(p) for p in trainable}
        for p in model.parameters():
            p.requires_grad_(id(p) in keep)
    dense = bool(cfg.losses.token_attributes)
    heads = (AttributeHeads(model.config.embed_dim, model.config.hidden if dense else None).to(device)
             if cfg.losses.attributes or dense else None)
    if heads is not None:
        params = params + list(heads.parameters())
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]  # norms, biases, single vectors
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr
    )
    steps_per_epoch = len(train_data) // cfg.batch_size
    total_steps = steps_per_epoch * cfg.epochs
    step, start_epoch, best_r1, best_epoch = 0, 0, -1.0, -1
    history: list[ValidationResult] = []
    bank = None
    if cfg.mined_negatives:
        bank = NegativeBank(len(train_data), model.config.embed_dim, model.config.rerank_state_width)
    if resume and (out / "last" / TRAIN_STATE_FILE).exists():
        load_state(model, load_file(str(out / "last" / "model.safetensors")), source=str(out / "last"))
        if bank is not None and (out / "last" / BANK_FILE).exists():
            bank.load_state_dict(load_file(str(out / "last" / BANK_FILE)))
        if heads is not None:
            heads.load_state_dict(load_file(str(out / "last" / HEADS_FILE)))
        meta = load_train_state(out / "last", optimizer)
        step, start_epoch = meta["step"], meta["epoch"]
        best_r1, best_epoch = meta["best_r1"], meta["best_epoch"]
    generator = torch.Generator().manual_seed(cfg.seed)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    log = open(out / "log.jsonl", "a")
    began, first_step = time.perf_counter(), step  # samples/s counts this process's steps only
    if stream is not None:
        stream.start(start_epoch, cfg.epochs)
    try:
        for epoch in range(start_epoch, cfg.epochs):
            data = stream.for_epoch(epoch) if stream is not None else train_data
            # Re-seed per epoch so a resumed run sees the batches an uninterrupted one would.
            generator.manual_seed(cfg.seed * 1000 + epoch)
            skip = step - epoch * steps_per_epoch  # batches of this epoch done before a resume
            grouped = cfg.group_batches_from is not None and epoch >= cfg.group_batches_from
            labels = data.groups if grouped else None
            for i, indices in enumerate(epoch_batches(len(data), cfg.batch_size, generator, labels)):
                frames, masks, ids = data.batch(indices, generator)
                if i < skip:
                    continue
                model.train()
                # Per-step seed: LayerDrop, negative sampling and MLM masks are the same
                # whether or not the run was interrupted and resumed.
                torch.manual_seed(cfg.seed * 1_000_003 + step)
                for group in optimizer.param_groups:
                    group["lr"] = learning_rate(step, total_steps, cfg)
                with autocast:
                    batch_groups = data.group_ids(indices).to(device) if cfg.rerank_only_groups else None
                    weights = cfg.losses if epoch >= cfg.retrieval_from else attributes_only(cfg.losses)
                    labels = data.labels_of(indices) if heads is not None else None
                    dense_labels = data.token_labels_of(indices) if dense else None
                    losses = compute_losses(model, frames.to(device), masks.to(device), ids.to(device), weights,
                                            batch_groups, bank, torch.tensor(indices), cfg.mined_negatives,
                                            None if labels is None else labels.to(device), heads,
                                            None if dense_labels is None else dense_labels.to(device))
                optimizer.zero_grad(set_to_none=True)
                losses.total.backward()
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                optimizer.step()
                step += 1
                record = {"kind": "step", "step": step, "epoch": epoch, "total_steps": total_steps,
                          "loss": float(losses.total.detach()), **losses.parts,
                          "lr": optimizer.param_groups[0]["lr"],
                          "samples_per_s": (step - first_step) * cfg.batch_size / (time.perf_counter() - began)}
                log.write(json.dumps(record) + "\n")
                if progress:
                    progress(record)
                if step % cfg.checkpoint_every == 0:
                    _write_checkpoint(model, out / "last", optimizer,
                                      {"step": step, "epoch": epoch, "best_r1": best_r1, "best_epoch": best_epoch},
                                      bank, heads)
            record = {"kind": "epoch", "epoch": epoch, "step": step, "seconds": time.perf_counter() - began}
            validate = (epoch + 1) % cfg.val_every == 0 or epoch + 1 == cfg.epochs
            if validate and val_data is not None and len(val_data):
                twins: dict[str, dict[str, float]] = {}
                val = evaluate(model, val_data, device=cfg.device, rerank_k=cfg.val_rerank_k, groups=twins)
                history.append(ValidationResult(epoch, val["multi"], val["mixed"], val["reranked"], twins))
                record |= {f"val_{name}": metrics.to_dict() for name, metrics in val.items()}
                record["val_groups"] = twins
                if cfg.probe_videos and data.labels is not None and val_data.labels is not None:
                    record["val_probes"] = _probe_summary(model, data, val_data, cfg.probe_videos)
                # Keep what a search will use: reranked results once the mixed head is trained.
                r1 = val[selection_metric(cfg)].r1
                if r1 > best_r1:
                    best_r1, best_epoch = r1, epoch
                    save_model(model, out / "best")
            log.write(json.dumps(record) + "\n")
            log.flush()
            if progress:
                progress(record)
            _write_checkpoint(model, out / "last", optimizer,
                              {"step": step, "epoch": epoch + 1, "best_r1": best_r1, "best_epoch": best_epoch},
                              bank, heads)
    finally:
        log.close()
        if stream is not None:
            stream.stop()
    if val_data is None:
        save_model(model, out / "best")
    return TrainResult(step, time.perf_counter() - began, best_epoch, best_r1, history)

