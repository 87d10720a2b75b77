"""The joint reranker: a small cross-encoder over one query's text latents and a candidate's
stored video latents, read together token by token.

Retrieval compares two pooled vectors; the paper's mixed decoder blends them through one
constant [CLS] query. Neither can check "the red one moves first" across the two sides. Here a
[CLS] token and the candidate's video latents attend jointly over themselves and the query's
text latents, through a few pre-norm transformer blocks, and [CLS] gives the match logit.

The text side is context only (keys and values, not updated per candidate), so its
projections are computed once per query and each candidate costs a pass over 1 + N_video
tokens: K candidates are one batched call. It is trained on frozen retrieval towers
(pvl_search.training.joint_reranker), so it never moves what FAISS searches, and it lives in
its own weights file beside the model (`reranker/` in the model folder).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from pvl_search.model.layers import MLP, attend, merge_heads, split_heads
from pvl_search.model.side_weights import load_beside, save_beside

RERANKER_DIR = "reranker"  # inside a model folder


@dataclass(frozen=True)
class JointRerankerConfig:
    hidden: int  # D of the retrieval model's latents (both towers)
    text_tokens: int  # N text latents per query
    video_tokens: int  # N video latents per candidate
    heads: int = 4
    layers: int = 2
    mlp_ratio: float = 4.0

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


class JointBlock(nn.Module):
    """Pre-norm block: the candidate's tokens attend over themselves and the query's text
    latents (context, projected once per query), then an MLP."""

    def __init__(self, dim: int, *, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.norm_text = nn.LayerNorm(dim)
        self.to_qkv = nn.Linear(dim, 3 * dim)
        self.text_to_kv = nn.Linear(dim, 2 * dim)
        self.to_out = nn.Linear(dim, dim)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = MLP(dim, ratio=mlp_ratio)

    def text_context(self, text: Tensor) -> tuple[Tensor, Tensor]:
        """(Q, Nt, D) text latents -> their keys and values, (Q, H, Nt, dh) each."""
        k, v = self.text_to_kv(self.norm_text(text)).chunk(2, dim=-1)
        return split_heads(k, self.heads), split_heads(v, self.heads)

    def forward(self, x: Tensor, text_kv: tuple[Tensor, Tensor]) -> Tensor:
        """x (Q, K, L, D): each query's K candidates' tokens; text_kv from `text_context`."""
        nq, nk, length, dim = x.shape
        q, k, v = (split_heads(t, self.heads) for t in self.to_qkv(self.norm(x)).reshape(nq * nk, length, -1)
                   .chunk(3, dim=-1))  # (Q*K, H, L, dh)
        tk, tv = (t[:, None].expand(-1, nk, -1, -1, -1).reshape(nq * nk, *t.shape[1:]) for t in text_kv)
        attended = attend(q, torch.cat([k, tk], dim=2), torch.cat([v, tv], dim=2), None)
        x = x + self.to_out(merge_heads(attended)).reshape(nq, nk, length, dim)
        return x + self.mlp(self.norm_mlp(x))


class JointReranker(nn.Module):
    """Match logits of (query, candidate) pairs from text latents and stored video latents."""

    def __init__(self, config: JointRerankerConfig) -> None:
        super().__init__()
        self.config = config
        d = config.hidden
        self.cls = nn.Parameter(torch.zeros(1, d))
        # A latent's index is its identity (each learned latent query reads its own things).
        self.video_position = nn.Parameter(torch.zeros(config.video_tokens, d))
        self.text_position = nn.Parameter(torch.zeros(config.text_tokens, d))
        self.norm_video = nn.LayerNorm(d)
        self.blocks = nn.ModuleList(
            JointBlock(d, heads=config.heads, mlp_ratio=config.mlp_ratio) for _ in range(config.layers))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 1)
        nn.init.normal_(self.cls, std=0.02)
        nn.init.normal_(self.video_position, std=0.02)
        nn.init.normal_(self.text_position, std=0.02)
        nn.init.zeros_(self.head.weight)  # starts at logit 0: the fused score is retrieval's
        nn.init.zeros_(self.head.bias)

    def forward(self, text_latents: Tensor, video_latents: Tensor) -> Tensor:
        """text_latents (Q, Nt, D), video_latents (Q, K, Nv, D): each query's own K candidates
        -> logits (Q, K)."""
        nq, nk = video_latents.shape[:2]
        text = text_latents + self.text_position
        video = self.norm_video(video_latents) + self.video_position  # stored rows: rescaled first
        x = torch.cat([self.cls.expand(nq, nk, 1, -1), video], dim=2)  # (Q, K, 1 + Nv, D)
        for block in self.blocks:
            x = block(x, block.text_context(text))
        return self.head(self.norm(x[:, :, 0]))[..., 0]

    def score(self, text_latents: Tensor, video_latents: Tensor) -> Tensor:
        """One query's latents (Nt, D) against K candidates' (K, Nv, D) -> (K,)."""
        return self(text_latents[None], video_latents[None])[0]


def save_reranker(reranker: JointReranker, model_folder: str | Path) -> Path:
    """Write the reranker into `model_folder/reranker/` (config + float32 safetensors)."""
    return save_beside(reranker, reranker.config.to_json(), model_folder, RERANKER_DIR)


def load_reranker(model_folder: str | Path, *, device: str | torch.device = "cpu") -> JointReranker | None:
    """The joint reranker stored beside a model, or None when the folder has none."""
    def build(config: dict) -> JointReranker:
        return JointReranker(JointRerankerConfig(**config))

    return load_beside(model_folder, RERANKER_DIR, build, "a joint reranker", device=device)
