"""A memory bank of every training video's latest multi-stream embedding and rerank state,
for mining the reranker's hard negatives from the whole training set.

In-batch negatives are almost never the videos a reranker has to tell apart at search time
(the first stage's top candidates: near-duplicates, the same scene with events swapped...).
The bank keeps each video's embedding and rerank state from the last step that saw it; for
each caption the videos the multi-stream embedding ranks highest (its own video and the
batch left out) join the mixed-stream loss as extra candidates. They carry no gradient on the
video side, as in MoCo's queue: stale by at most an epoch, and nearly free (a B x N matrix
product and one decoder MLP per mined pair).
"""

from __future__ import annotations

import torch
from torch import Tensor


class NegativeBank:
    def __init__(self, videos: int, embed_dim: int, state_width: int) -> None:
        self.embeddings = torch.zeros(videos, embed_dim)
        self.states = torch.zeros(videos, state_width)
        self.filled = torch.zeros(videos, dtype=torch.bool)

    def update(self, rows: Tensor, embeddings: Tensor, states: Tensor) -> None:
        """Store the batch's values (detached) for training-set rows `rows` (B,)."""
        rows = rows.cpu()
        self.embeddings[rows] = embeddings.detach().float().cpu()
        self.states[rows] = states.detach().float().cpu()
        self.filled[rows] = True

    def mine(self, text_embeddings: Tensor, batch_rows: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """For each caption (B, d) the `k` banked videos most similar to it, outside the batch.

        Returns their rerank states (B, k, W) and a validity mask (B, k): False where the
        bank does not yet hold k videos outside the batch (early in the first epoch)."""
        scores = text_embeddings.detach().float().cpu() @ self.embeddings.T  # (B, N)
        usable = self.filled.clone()
        usable[batch_rows.cpu()] = False
        scores = scores.masked_fill(~usable, float("-inf"))
        k = min(k, scores.shape[1])
        top, index = scores.topk(k, dim=1)  # (B, k)
        return self.states[index], torch.isfinite(top)

    def state_dict(self) -> dict[str, Tensor]:
        return {"embeddings": self.embeddings, "states": self.states, "filled": self.filled}

    def load_state_dict(self, tensors: dict[str, Tensor]) -> None:
        for name, value in tensors.items():
            getattr(self, name).copy_(value)
