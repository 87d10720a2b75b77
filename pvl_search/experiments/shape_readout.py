"""Where an object's shape is lost on the video side: three readouts, each trained or fitted on
shape labels alone (per actor and per colour, `SHAPE_LABELS`) and scored on held-out videos.

- `token_shape_probe`: a linear probe of the shape under each object-covered input token of a
  trained model, alone and with its 3 x 3 neighbours: what the tokens hand the latents.
- `VideoTowerReadout`: a trained model's whole video path (stem, latents, pooled embedding) with
  a fresh linear head on the embedding, as the attribute heads read it, all of it fine-tuned:
  can the tower carry shape when it is asked for nothing else?
- `StemReadout`: a fresh copy of the model's patch stem, max-pooled over tokens and frames, with
  a small MLP: do frames of this size and patch show shape at all?

The linear probes of `pvl_search.training.probes` say *that* shape is missing from the
embeddings; these say *where*, and whether it is the input or the training that withholds it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pvl_search.data.pairs import PairSet
from pvl_search.data.scene_labels import LABELS, TOKEN_BACKGROUND
from pvl_search.model.config import ModelConfig
from pvl_search.model.embeddings import VideoEmbedding
from pvl_search.model.perceiver import PerceiverVL
from pvl_search.training.probes import fit_probe

# The shape of each moving object (by colour-name order) and of the object of each colour
# (or none): readable from any frame the object is in, without event order.
SHAPE_LABELS: tuple[str, ...] = tuple(s.name for s in LABELS if s.attribute in ("actor_shape", "colour_shape"))
_COLUMNS = [i for i, s in enumerate(LABELS) if s.name in SHAPE_LABELS]
_CLASSES = [LABELS[i].classes for i in _COLUMNS]
_GROUP = {LABELS[i].name: LABELS[i].attribute for i in _COLUMNS}  # actor_shape | colour_shape


@torch.no_grad()
def token_shape_probe(model: PerceiverVL, train: PairSet, test: PairSet, *, batch_size: int = 32) -> dict[str, float]:
    """Test accuracy of linear probes for the shape under each object-covered input token
    ("token"), and from the token with its 3 x 3 neighbours on the patch grid ("neighbourhood");
    "majority" is the most frequent shape's share of the test tokens."""
    x_train, y_train = _covered_tokens(model, train, batch_size)
    x_test, y_test = _covered_tokens(model, test, batch_size)
    d = model.config.hidden
    centre = slice(4 * d, 5 * d)  # unfold lists the 3 x 3 neighbours row by row: the token is the middle one
    return {
        "token": fit_probe(x_train[:, centre], y_train, x_test[:, centre], y_test, TOKEN_BACKGROUND),
        "neighbourhood": fit_probe(x_train, y_train, x_test, y_test, TOKEN_BACKGROUND),
        "majority": float(np.bincount(y_test).max() / len(y_test)),
        "test_tokens": len(y_test),
    }


def _covered_tokens(model: PerceiverVL, data: PairSet, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Each object-covered token of every real frame with its 3 x 3 neighbours (zeros off the
    grid), (tokens, 9 D), and the shape covering it."""
    if data.token_labels is None:
        raise ValueError("the token probe needs dense patch labels (a synthetic benchmark's captions file)")
    model.eval()
    cfg = model.config
    grid, generator = cfg.frame_size // cfg.patch, torch.Generator().manual_seed(0)
    features, shapes = [], []
    for start in range(0, len(data), batch_size):
        rows = range(start, min(len(data), start + batch_size))
        frames, masks, _ = data.batch(rows, generator)
        tokens, _ = model.video_inputs(frames, masks)  # (B, F * G, D)
        b, f = frames.shape[:2]
        planes = tokens.float().view(b * f, grid, grid, -1).permute(0, 3, 1, 2)  # (B F, D, g, g)
        around = F.unfold(F.pad(planes, (1, 1, 1, 1)), 3).transpose(1, 2)  # (B F, G, 9 D)
        labels = data.token_labels_of(rows)[..., 0].reshape(b * f, -1)  # (B F, G)
        keep = (labels != TOKEN_BACKGROUND) & masks.reshape(b * f, 1)
        features.append(around[keep].numpy())
        shapes.append(labels[keep].numpy())
    return np.concatenate(features), np.concatenate(shapes)


class VideoTowerReadout(nn.Module):
    """A model's video path to its pooled embedding, and a fresh linear head on that embedding."""

    def __init__(self, model: PerceiverVL) -> None:
        super().__init__()
        self.model = model
        self.head = nn.Linear(model.config.embed_dim, sum(_CLASSES))

    def forward(self, frames: Tensor, masks: Tensor) -> Tensor:
        embedding = self.model.encode_video(frames, masks).embedding  # L2-normalised
        return self.head(embedding * embedding.shape[-1] ** 0.5)


class StemReadout(nn.Module):
    """A fresh patch stem of `config`'s design; per-token MLP, max over tokens and frames, MLP."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d = config.hidden
        self.stem = VideoEmbedding(config).patch_embed
        self.token_mlp = nn.Sequential(nn.GELU(), nn.Linear(d, d), nn.GELU())
        self.head = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, sum(_CLASSES)))

    def forward(self, frames: Tensor, masks: Tensor) -> Tensor:
        b, f = frames.shape[:2]
        tokens = self.token_mlp(self.stem(frames.flatten(0, 1)).flatten(2).transpose(1, 2))  # (B F, G, D)
        tokens = tokens.view(b, f, *tokens.shape[1:]).masked_fill(~masks[:, :, None, None], float("-inf"))
        return self.head(tokens.amax(dim=(1, 2)))


def train_readout(
    readout: nn.Module, train: PairSet, test: PairSet, *, steps: int, lr: float = 3e-4, batch_size: int = 32,
    every: int = 100, seed: int = 0, progress: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Train `readout` (AdamW) on the shape labels of random training batches; every `every`
    steps and at the end, its test accuracy: "actor_shape" (mean over the two moving objects)
    and "colour_shape" (mean over the colours: that colour's shape, or none)."""
    if train.labels is None or test.labels is None:
        raise ValueError("the shape readouts need scene labels (a synthetic benchmark's captions file)")
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW([p for p in readout.parameters() if p.requires_grad], lr=lr, weight_decay=0.05)
    began, curve = time.perf_counter(), []
    for step in range(1, steps + 1):
        readout.train()
        rows = torch.randint(len(train), (batch_size,), generator=generator).tolist()
        frames, masks, _ = train.batch(rows, generator)
        loss = _shape_loss(readout(frames, masks), train.labels[rows][:, _COLUMNS])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % every == 0 or step == steps:
            point = {"step": step, "seconds": round(time.perf_counter() - began, 1),
                     "loss": round(float(loss.detach()), 4), **shape_accuracy(readout, test)}
            curve.append(point)
            if progress:
                progress(point)
    return curve


def _shape_loss(logits: Tensor, labels: Tensor) -> Tensor:
    parts = logits.float().split(_CLASSES, dim=-1)
    return torch.stack([F.cross_entropy(z, labels[:, i]) for i, z in enumerate(parts)]).mean()


@torch.no_grad()
def shape_accuracy(readout: nn.Module, data: PairSet, *, batch_size: int = 50) -> dict[str, float]:
    """Test accuracy of `readout` per label group (see `train_readout`)."""
    readout.eval()
    generator = torch.Generator().manual_seed(0)
    logits = torch.cat([readout(*data.batch(range(i, min(len(data), i + batch_size)), generator)[:2])
                        for i in range(0, len(data), batch_size)])
    labels = data.labels[:, _COLUMNS]
    return _by_group({name: float((z.argmax(1) == labels[:, i]).float().mean())
                      for i, (name, z) in enumerate(zip(SHAPE_LABELS, logits.split(_CLASSES, dim=-1)))})


def majority_baseline(data: PairSet) -> dict[str, float]:
    """What always answering each label's most frequent class scores on `data`, grouped as in
    `shape_accuracy`."""
    labels = data.labels[:, _COLUMNS].numpy()
    return _by_group({name: float(np.bincount(labels[:, i]).max() / len(labels))
                      for i, name in enumerate(SHAPE_LABELS)})


def _by_group(per_label: dict[str, float]) -> dict[str, float]:
    """Per-label accuracies averaged within "actor_shape" and "colour_shape"."""
    groups: dict[str, list[float]] = {}
    for name, value in per_label.items():
        groups.setdefault(_GROUP[name], []).append(value)
    return {group: round(float(np.mean(values)), 4) for group, values in groups.items()}
