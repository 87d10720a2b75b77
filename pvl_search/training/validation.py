"""Validation during training: every caption of a held-out set against every video, scored
the ways a search can rank (multi-stream, mixed and latent rerankers, and the search default
that reranks the multi-stream top k), with twin-group metrics and, on request, linear probes.
`loop.train` runs it at each validation; the twin diagnostics reuse its score matrices."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from pvl_search.data.pairs import PairSet, subset
from pvl_search.metrics import RetrievalMetrics, group_metrics, ranks_from_scores, retrieval_metrics
from pvl_search.model.perceiver import PerceiverVL
from pvl_search.ranking import fuse, ranks_after_rerank
from pvl_search.training.probes import probe_features, run_probes


@dataclass
class ValidationResult:
    epoch: int
    multi: RetrievalMetrics  # multi-stream embeddings alone
    mixed: RetrievalMetrics  # mixed-stream decoder alone, over every video
    reranked: RetrievalMetrics  # the search default: multi top-k, re-scored by similarity + mixed logit
    groups: dict[str, dict[str, float]] = field(default_factory=dict)  # method -> twin-group metrics


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
    scale = model.retrieval_scale  # the search default's fusion (pvl_search.ranking.fuse)
    result["reranked"] = retrieval_metrics(
        ranks_after_rerank(multi, fuse(multi, scores["mixed"], "calibrated", scale), owners, rerank_k))
    if "latent" in scores:
        result["latent_reranked"] = retrieval_metrics(
            ranks_after_rerank(multi, fuse(multi, scores["latent"], "calibrated", scale), owners, rerank_k))
    return result


def probe_summary(model: PerceiverVL, train_data: PairSet, val_data: PairSet, videos: int) -> dict:
    """Per-attribute probe accuracy of both embeddings, fitted on `videos` training videos."""
    report = run_probes(probe_features(model, subset(train_data, range(min(videos, len(train_data))))),
                        probe_features(model, val_data), features=("video_embedding", "text_embedding"))
    keep = ("colour", "shape", "size", "motion", "shape_by_time", "motion_by_time", "order", "binding")
    return {feature: {k: round(row[k], 3) for k in keep} for feature, row in report.items() if feature != "chance"}
