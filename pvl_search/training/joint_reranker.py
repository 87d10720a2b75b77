"""Training a cross-encoder reranker on frozen retrieval towers: the joint reranker
(pvl_search.model.joint_reranker, over stored latents) or the patch reranker
(pvl_search.model.patch_reranker, over stored patch tokens).

The reranker only ever sees what the search engine gives it: a query and the retrieval stage's
own top-K candidates. So training does the same. Fresh synthetic videos (the scene stream, in
chunks of twin groups, never the evaluation corpus's held-out triples) are encoded once by the
frozen model; each caption's candidates are its retrieval top-K within the chunk (the twins and
the look-alikes retrieval confuses: hard negatives by construction), its own video forced in.
The loss is listwise over those K, on the score the search ranks by: the reranker's logit plus
the retrieval similarity times the model's contrastive temperature (calibrated fusion), so the
reranker learns what retrieval gets wrong, not what it already knows; or on the logit alone
(`fused_loss=False`), which teaches a reranker starting from nothing on every caption.

Nothing the towers compute changes: retrieval R@1 is the shipped model's, whatever happens here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from pvl_search.data.pairs import PairSet
from pvl_search.metrics import group_metrics, ranks_from_scores, retrieval_metrics
from pvl_search.model.joint_reranker import JointReranker
from pvl_search.model.patch_reranker import PatchReranker, stored_patch_tokens
from pvl_search.model.perceiver import PerceiverVL
from pvl_search.ranking import ranks_after_rerank

Reranker = JointReranker | PatchReranker  # both score (Q, Nt, D) text latents against (Q, K, Nv, D) video rows


@dataclass(frozen=True)
class JointTrainConfig:
    candidates: int = 16  # retrieval top-K each caption is reranked within
    batch_queries: int = 32  # captions per step
    passes: int = 2  # passes over a chunk's captions before the next chunk
    lr: float = 3e-4
    warmup: int = 100  # steps
    weight_decay: float = 0.05
    seed: int = 0
    # The loss reads the reranker's logit plus the retrieval term (what the search ranks by), or
    # the logit alone: then every caption teaches it the whole match, not only retrieval's misses
    # (the patch reranker learns nothing in its first hundreds of steps otherwise).
    fused_loss: bool = True
    # Of the `candidates`, this many are random videos of the chunk instead of retrieval's next
    # best: easy negatives that teach colour and motion before the look-alikes teach shape.
    random_candidates: int = 0


@dataclass
class EncodedPool:
    """A set of videos and their captions, encoded once by the frozen towers."""

    video_latents: Tensor  # (V, Nv, D) what the reranker reads of each video: latents, or patch tokens (bf16)
    video_embeddings: Tensor  # (V, d)
    text_latents: Tensor  # (C, Nt, D)
    text_embeddings: Tensor  # (C, d)
    owners: np.ndarray  # (C,) each caption's video
    groups: list[str]  # (V,) twin group of each video

    def __len__(self) -> int:
        return len(self.owners)


@torch.inference_mode()
def encode_pool(model: PerceiverVL, data: PairSet, *, batch_size: int = 64, device: str = "cpu",
                patches: bool = False) -> EncodedPool:
    """Every video and caption of `data` through the frozen towers: embeddings, and the video's
    latents or, with `patches`, its patch tokens (bfloat16 to halve the memory; padding frames'
    tokens zero, as an index stores them)."""
    model.eval()
    g = torch.Generator().manual_seed(0)
    latents, embeddings = [], []
    for start in range(0, len(data), batch_size):
        frames, masks, _ = data.batch(range(start, min(len(data), start + batch_size)), g)
        out = model.encode_video(frames.to(device), masks.to(device), keep_inputs=patches)
        if patches:
            latents.append(stored_patch_tokens(out.inputs, masks).cpu().to(torch.bfloat16))
        else:
            latents.append(out.latents.float().cpu())
        embeddings.append(out.embedding.float().cpu())
    ids, owners = data.all_captions()
    text_latents, text_embeddings = [], []
    for start in range(0, len(ids), batch_size):
        out = model.encode_text(ids[start : start + batch_size].to(device))
        text_latents.append(out.latents.float().cpu())
        text_embeddings.append(out.embedding.float().cpu())
    return EncodedPool(torch.cat(latents), torch.cat(embeddings), torch.cat(text_latents), torch.cat(text_embeddings),
                       np.asarray(owners, dtype=np.int64), list(data.groups))


def candidate_lists(pool: EncodedPool, k: int, *, force_owner: bool) -> tuple[Tensor, Tensor]:
    """Each caption's retrieval top-`k` videos (C, k) and their similarities (C, k); with
    `force_owner`, a caption whose own video is not among them gets it in the last place."""
    sims = pool.text_embeddings @ pool.video_embeddings.T  # (C, V)
    top_sims, top = sims.topk(min(k, sims.shape[1]), dim=1)
    if force_owner:
        owners = torch.as_tensor(pool.owners)
        missing = ~(top == owners[:, None]).any(1)
        top[missing, -1] = owners[missing]
        top_sims[missing, -1] = sims[missing, owners[missing]]
    return top, top_sims


def with_random_candidates(pool: EncodedPool, candidates: Tensor, sims: Tensor, n: int, generator: torch.Generator
                           ) -> tuple[Tensor, Tensor]:
    """`candidates` (C, k) and `sims` with `n` random videos (never the caption's own) appended."""
    videos = len(pool.video_embeddings)
    owners = torch.as_tensor(pool.owners)
    extra = torch.randint(0, videos, (len(candidates), n), generator=generator)
    extra = torch.where(extra == owners[:, None], (extra + 1) % videos, extra)
    extra_sims = (pool.text_embeddings[:, None, :] * pool.video_embeddings[extra]).sum(-1)
    return torch.cat([candidates, extra], 1), torch.cat([sims, extra_sims], 1)


def listwise_loss(reranker: Reranker, pool: EncodedPool, rows: Tensor, candidates: Tensor, sims: Tensor,
                  scale: float, *, fused: bool = True) -> Tensor:
    """Cross-entropy of each caption's own video among its candidates, on the fused score (or,
    not `fused`, on the reranker's logit alone)."""
    cand = candidates[rows]  # (B, K)
    logits = reranker(pool.text_latents[rows], pool.video_latents[cand].float())  # (B, K)
    target = (cand == torch.as_tensor(pool.owners)[rows][:, None]).float().argmax(1)
    return F.cross_entropy(logits + scale * sims[rows] if fused else logits, target)


def batches(n: int, size: int, passes: int, generator: torch.Generator) -> Iterator[Tensor]:
    """Rows of `passes` shuffled passes over n captions, `size` at a time (a short tail dropped)."""
    for _ in range(passes):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n - size + 1, size):
            yield order[start : start + size]


def make_optimizer(reranker: Reranker, cfg: JointTrainConfig, total_steps: int
                   ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (decay on matrices only), linear warm-up then cosine to zero over `total_steps`."""
    decay = [p for p in reranker.parameters() if p.dim() >= 2]
    rest = [p for p in reranker.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": rest, "weight_decay": 0.0}], lr=cfg.lr)

    def factor(step: int) -> float:
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        progress = (step - cfg.warmup) / max(1, total_steps - cfg.warmup)
        return 0.5 * (1 + np.cos(np.pi * min(1.0, progress)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_on_pool(reranker: Reranker, pool: EncodedPool, cfg: JointTrainConfig, scale: float,
                  optimizer: torch.optim.Optimizer, schedule: torch.optim.lr_scheduler.LambdaLR,
                  generator: torch.Generator, on_step: Callable[[float], None] | None = None) -> None:
    """`cfg.passes` passes of listwise steps over one encoded chunk."""
    candidates, sims = candidate_lists(pool, cfg.candidates - cfg.random_candidates, force_owner=True)
    if cfg.random_candidates:
        candidates, sims = with_random_candidates(pool, candidates, sims, cfg.random_candidates, generator)
    reranker.train()
    for rows in batches(len(pool), cfg.batch_queries, cfg.passes, generator):
        loss = listwise_loss(reranker, pool, rows, candidates, sims, scale, fused=cfg.fused_loss)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(reranker.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if on_step is not None:
            on_step(float(loss.detach()))


@torch.inference_mode()
def validate(reranker: Reranker, pool: EncodedPool, scale: float, ks: tuple[int, ...] = (16, 50)) -> dict:
    """R@1, within-group top-1 and group R@1 of retrieval alone and of the joint rerank at each
    K (calibrated fusion), on an encoded validation pool (one segment per video)."""
    reranker.eval()
    sims = (pool.text_embeddings @ pool.video_embeddings.T).numpy().astype(np.float64)  # (C, V)
    out = {"retrieval": _summary(ranks_from_scores(sims, pool.owners), sims, pool)}
    for k in ks:
        candidates, top_sims = candidate_lists(pool, k, force_owner=False)
        fused = np.full_like(sims, -np.inf)
        for start in range(0, len(pool), 32):  # a few queries at a time: (Q, K, Nv, D) pairs
            rows = torch.arange(start, min(len(pool), start + 32))
            logits = reranker(pool.text_latents[rows], pool.video_latents[candidates[rows]].float())
            block = np.full((len(rows), sims.shape[1]), -np.inf)
            np.put_along_axis(block, candidates[rows].numpy(), (logits + scale * top_sims[rows]).double().numpy(), 1)
            fused[start : start + len(rows)] = block
        second = np.where(np.isfinite(fused), fused, sims * scale)  # only the top K are read
        ranks = ranks_after_rerank(sims, second, pool.owners, k)
        out[f"joint@{k}"] = _summary(ranks, np.where(np.isfinite(fused), fused + 1e6, sims), pool)
    return out


def _summary(ranks: np.ndarray, scores: np.ndarray, pool: EncodedPool) -> dict:
    metrics = retrieval_metrics(ranks)
    return {"r1": round(metrics.r1, 2), "r5": round(metrics.r5, 2),
            **{k: round(v, 2) for k, v in group_metrics(scores, pool.owners, pool.groups).items()}}
