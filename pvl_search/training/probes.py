"""Linear probes: what a model's embeddings hold, attribute by attribute.

R@1 says *that* retrieval fails; a probe says *why*. For each scene label
(pvl_search.data.scene_labels: each event's colour, shape, size and motion, event order,
binding) a multinomial logistic regression on standardised features is fitted on one split
and scored on another. Features: the multi-stream embedding and the mean-pooled latents, of
videos and of captions (every caption is a sample carrying its video's labels).

Training's validation runs them (validation.probe_summary, `train --probe-videos`), and so
does `pvl-search probe` (pvl_search.experiments.probes, which loads the splits).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pvl_search.data.pairs import PairSet
from pvl_search.data.scene_labels import LABELS
from pvl_search.model.perceiver import PerceiverVL

FEATURES = ("video_embedding", "video_latents", "text_embedding", "text_latents")


@dataclass
class ProbeFeatures:
    """Features (name -> (samples, dim)) and the labels of each sample, for one split."""

    features: dict[str, np.ndarray]
    video_labels: np.ndarray  # (videos, labels)
    text_labels: np.ndarray  # (captions, labels)

    def labels_for(self, feature: str) -> np.ndarray:
        return self.video_labels if feature.startswith("video") else self.text_labels


@torch.no_grad()
def probe_features(model: PerceiverVL, data: PairSet, *, batch_size: int = 64) -> ProbeFeatures:
    """Encode every video and caption of `data` (which must carry scene labels)."""
    if data.labels is None:
        raise ValueError("probes need scene labels (a synthetic benchmark's captions file)")
    model.eval()
    g = torch.Generator().manual_seed(0)
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in FEATURES}
    for start in range(0, len(data), batch_size):
        frames, masks, _ = data.batch(range(start, min(len(data), start + batch_size)), g)
        out = model.encode_video(frames, masks)
        parts["video_embedding"].append(out.embedding)
        parts["video_latents"].append(out.latents.mean(1).float())
    ids, owners = data.all_captions()
    for start in range(0, len(ids), batch_size):
        out = model.encode_text(ids[start : start + batch_size])
        parts["text_embedding"].append(out.embedding)
        parts["text_latents"].append(out.latents.mean(1).float())
    features = {name: torch.cat(p).numpy() for name, p in parts.items()}
    video_labels = data.labels.numpy()
    return ProbeFeatures(features, video_labels, video_labels[np.asarray(owners)])


def fit_probe(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
              classes: int, *, weight_decay: float = 1e-3, steps: int = 200) -> float:
    """Test accuracy of a softmax regression fitted (L-BFGS, L2) on standardised features."""
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    xtr = torch.as_tensor((x_train - mean) / std, dtype=torch.float32)
    xte = torch.as_tensor((x_test - mean) / std, dtype=torch.float32)
    ytr = torch.as_tensor(y_train, dtype=torch.long)
    weight = torch.zeros(xtr.shape[1], classes, requires_grad=True)
    bias = torch.zeros(classes, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(xtr @ weight + bias, ytr) + weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        predicted = (xte @ weight + bias).argmax(1).numpy()
    return float((predicted == y_test).mean())


def run_probes(train: ProbeFeatures, test: ProbeFeatures,
               features: tuple[str, ...] = FEATURES) -> dict[str, dict[str, float]]:
    """{feature: {label: test accuracy}} for every feature and label, plus per-attribute means
    over the two events ("colour", "shape", "size", "motion") and "chance" per label."""
    report: dict[str, dict[str, float]] = {}
    with torch.random.fork_rng():
        torch.manual_seed(0)
        for feature in features:
            ytr, yte = train.labels_for(feature), test.labels_for(feature)
            row = {spec.name: fit_probe(train.features[feature], ytr[:, i], test.features[feature], yte[:, i],
                                        spec.classes) for i, spec in enumerate(LABELS)}
            report[feature] = row | attribute_means(row)
    report["chance"] = {spec.name: float(np.bincount(test.video_labels[:, i], minlength=spec.classes).max()
                                         / len(test.video_labels)) for i, spec in enumerate(LABELS)}
    return report


def attribute_means(row: Mapping[str, float]) -> dict[str, float]:
    """Per attribute, the mean accuracy over the two moving objects: "shape", "size" and
    "motion" per object (whichever acts first), "colour" and "<attr>_by_time" per event in
    time order (which also needs the order of the events)."""
    groups: dict[str, list[float]] = {}
    for spec in LABELS:
        if spec.name.startswith(("lead_", "other_")):
            groups.setdefault(spec.attribute.removeprefix("actor_"), []).append(row[spec.name])
        elif spec.name.startswith(("first_", "second_")):
            key = "colour" if spec.attribute == "colour" else f"{spec.attribute}_by_time"
            groups.setdefault(key, []).append(row[spec.name])
    return {key: float(np.mean(v)) for key, v in groups.items()}
