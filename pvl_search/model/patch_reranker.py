"""The patch reranker: a cross-encoder in which the query reads a candidate's patch tokens.

Retrieval compares two pooled vectors, and the latent and joint rerankers read the candidate's
32 stored latents; shape is what those keep worst (probe 0.57 from the video embedding against
0.87 from the text's). Here the query's text latents and a [CLS] token are the Perceiver's
latent array and the candidate's patch tokens (the model's own video input tokens: patch
embedding, temporal mix, position, frame index; F x g x g of them) are its input: each block
lets the query tokens attend over themselves, then cross-attend over every patch of every frame,
then an MLP. [CLS] gives the match logit, fused with the retrieval similarity.

The patch tokens are projected to keys and values once per candidate (shared by the blocks) in a
narrow width, so a candidate costs about M x D x 2w multiply-adds plus a small pass over
1 + N_text tokens: K candidates are one batched call. It is trained on frozen retrieval towers
(pvl_search.training.joint_reranker) and lives in its own weights file, `patch-reranker/` in the
model folder; the index stores each segment's patch tokens for it (indexer's token store).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from pvl_search.model.layers import MLP, attend, merge_heads, split_heads
from pvl_search.model.side_weights import load_beside, save_beside

PATCH_RERANKER_DIR = "patch-reranker"  # inside a model folder


@dataclass(frozen=True)
class PatchRerankerConfig:
    hidden: int  # D of the retrieval model (its text latents and patch tokens)
    text_tokens: int  # N text latents per query
    video_tokens: int  # M = F x g x g patch tokens per candidate
    width: int = 64  # the reranker's own width (query tokens, keys, values)
    heads: int = 4
    layers: int = 2
    mlp_ratio: float = 4.0

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


class PatchBlock(nn.Module):
    """Pre-norm: self-attention over the query tokens, cross-attention onto the patch keys and
    values, MLP."""

    def __init__(self, width: int, *, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.heads = heads
        self.norm_self = nn.LayerNorm(width)
        self.self_qkv = nn.Linear(width, 3 * width)
        self.self_out = nn.Linear(width, width)
        self.norm_cross = nn.LayerNorm(width)
        self.cross_q = nn.Linear(width, width)
        self.cross_out = nn.Linear(width, width)
        self.norm_mlp = nn.LayerNorm(width)
        self.mlp = MLP(width, ratio=mlp_ratio)

    def forward(self, x: Tensor, keys: Tensor, values: Tensor, key_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """x (P, T, w) query tokens of P pairs; keys, values (P, H, M, dh); key_mask (P, M)
        -> the updated x and each head's match (P, H): the log-normaliser of the cross-attention,
        averaged over the query tokens (how strongly the query found matching patches)."""
        q, k, v = (split_heads(t, self.heads) for t in self.self_qkv(self.norm_self(x)).chunk(3, dim=-1))
        x = x + self.self_out(merge_heads(attend(q, k, v, None)))
        q = split_heads(self.cross_q(self.norm_cross(x)), self.heads)
        logits = (q @ keys.transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (P, H, T, M)
        if key_mask is not None:
            logits = logits.masked_fill(~key_mask[:, None, None, :], float("-inf"))
        lse = torch.logsumexp(logits.float(), dim=-1)  # (P, H, T)
        attended = (logits - lse[..., None].to(logits.dtype)).exp() @ values
        x = x + self.cross_out(merge_heads(attended))
        return x + self.mlp(self.norm_mlp(x)), lse.mean(-1)


class PatchReranker(nn.Module):
    """Match logits of (query, candidate) pairs from text latents and stored patch tokens."""

    def __init__(self, config: PatchRerankerConfig) -> None:
        super().__init__()
        self.config = config
        w = config.width
        self.cls = nn.Parameter(torch.zeros(1, w))
        self.text_in = nn.Sequential(nn.LayerNorm(config.hidden), nn.Linear(config.hidden, w))
        self.text_position = nn.Parameter(torch.zeros(config.text_tokens, w))
        self.norm_video = nn.LayerNorm(config.hidden)
        self.video_kv = nn.Linear(config.hidden, 2 * w)
        self.blocks = nn.ModuleList(
            PatchBlock(w, heads=config.heads, mlp_ratio=config.mlp_ratio) for _ in range(config.layers))
        self.norm = nn.LayerNorm(w)
        self.head = nn.Linear(w, 1)
        # A late-interaction readout beside [CLS]: a pooled mean over 512 patches hides the few
        # that hold the object, so without it [CLS] has nothing to learn from at the start.
        self.match = nn.Linear(config.heads * config.layers, 1)
        nn.init.normal_(self.cls, std=0.02)
        nn.init.normal_(self.text_position, std=0.02)
        nn.init.zeros_(self.head.weight)  # starts at logit 0: the fused score is retrieval's
        nn.init.zeros_(self.head.bias)
        nn.init.zeros_(self.match.weight)
        nn.init.zeros_(self.match.bias)

    def forward(self, text_latents: Tensor, patch_tokens: Tensor, patch_mask: Tensor | None = None) -> Tensor:
        """text_latents (Q, Nt, D), patch_tokens (Q, K, M, D): each query's own K candidates,
        patch_mask (Q, K, M) True for real tokens (None: all real) -> logits (Q, K)."""
        nq, nk, m, _ = patch_tokens.shape
        heads = self.config.heads
        keys, values = self.video_kv(self.norm_video(patch_tokens)).reshape(nq * nk, m, -1).chunk(2, dim=-1)
        keys, values = split_heads(keys, heads), split_heads(values, heads)
        text = self.text_in(text_latents) + self.text_position  # once per query
        x = torch.cat([self.cls.expand(nq, 1, -1), text], dim=1)
        x = x[:, None].expand(nq, nk, *x.shape[1:]).reshape(nq * nk, *x.shape[1:])
        mask = None if patch_mask is None else patch_mask.reshape(nq * nk, m)
        matches = []
        for block in self.blocks:
            x, match = block(x, keys, values, mask)
            matches.append(match)
        score = self.head(self.norm(x[:, 0]))[:, 0] + self.match(torch.cat(matches, 1).to(x.dtype))[:, 0]
        return score.float().reshape(nq, nk)

    def score(self, text_latents: Tensor, patch_tokens: Tensor, patch_mask: Tensor | None = None) -> Tensor:
        """One query's latents (Nt, D) against K candidates' patch tokens (K, M, D) -> (K,)."""
        return self(text_latents[None], patch_tokens[None], None if patch_mask is None else patch_mask[None])[0]


def stored_patch_tokens(inputs: Tensor, frame_mask: Tensor) -> Tensor:
    """The model's input tokens (B, F * g * g, D) as an index stores them for this reranker:
    float32, a padding frame's tokens exact zeros (`real_patches` finds them again)."""
    b, frames = frame_mask.shape
    real = frame_mask[:, :, None].expand(b, frames, inputs.shape[1] // frames).reshape(b, -1, 1)
    return inputs.float() * real.to(inputs.device)


def real_patches(patch_tokens: Tensor) -> Tensor:
    """(..., M, D) stored patch tokens -> (..., M) True for a real frame's token (not zeros)."""
    return patch_tokens.abs().amax(-1) > 0


def save_patch_reranker(reranker: PatchReranker, model_folder: str | Path) -> Path:
    """Write the reranker into `model_folder/patch-reranker/` (config + float32 safetensors)."""
    return save_beside(reranker, reranker.config.to_json(), model_folder, PATCH_RERANKER_DIR)


def load_patch_reranker(model_folder: str | Path, *, device: str | torch.device = "cpu") -> PatchReranker | None:
    """The patch reranker stored beside a model, or None when the folder has none."""
    def build(config: dict) -> PatchReranker:
        return PatchReranker(PatchRerankerConfig(**config))

    return load_beside(model_folder, PATCH_RERANKER_DIR, build, "a patch reranker", device=device)
