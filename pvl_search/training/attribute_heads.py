"""Auxiliary attribute heads: dense supervision from scene metadata, used in training only.

A contrastive loss over random batches can be satisfied by colour alone (shortcut learning):
shape, motion and order then never enter the embeddings. These heads read the multi-stream
embedding of a video *and* of a caption with one shared linear classifier per label, so both
encoders must put every stated attribute into the vector that FAISS searches, and in the same
directions, which is what lets a video and its caption meet.
"""

from __future__ import annotations

import math
from collections.abc import Collection

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pvl_search.data.scene_labels import LABELS, TEXT_LABELS, TOKEN_CLASSES


class AttributeHeads(nn.Module):
    """One linear classifier over the L2-normalised embedding, all labels in one matrix."""

    def __init__(self, embed_dim: int, hidden: int | None = None, *, video_only: bool = False) -> None:
        super().__init__()
        self.sizes = [spec.classes for spec in LABELS]
        self.linear = nn.Linear(embed_dim, sum(self.sizes))
        # A second classifier that reads the video embedding alone (not shared with the text
        # side), when a video-only objective asks for it.
        self.video_linear = nn.Linear(embed_dim, sum(self.sizes)) if video_only else None
        self.scale = math.sqrt(embed_dim)  # unit-norm inputs: give each coordinate unit scale
        # Per-token heads (shape, motion) on the video input tokens, when `hidden` is given.
        self.tokens = nn.Linear(hidden, sum(TOKEN_CLASSES)) if hidden else None

    def forward(self, embedding: Tensor) -> list[Tensor]:
        """(B, d) -> one (B, classes) logit tensor per label, in LABELS order."""
        return list(self.linear(embedding * self.scale).split(self.sizes, dim=-1))

    def loss(self, embedding: Tensor, labels: Tensor, *, text: bool = False,
             only: Collection[str] | None = None) -> Tensor:
        """Mean cross-entropy over the labels (for text, over those a caption always states;
        with `only`, over those named there)."""
        parts = [
            F.cross_entropy(logits.float(), labels[:, i])
            for i, (spec, logits) in enumerate(zip(LABELS, self(embedding)))
            if (not text or spec.name in TEXT_LABELS) and (only is None or spec.name in only)
        ]
        return torch.stack(parts).mean()

    def video_loss(self, embedding: Tensor, labels: Tensor, *, only: Collection[str]) -> Tensor:
        """Mean cross-entropy over the labels in `only`, from the video-only classifier."""
        if self.video_linear is None:
            raise ValueError("these heads were built without a video-only classifier (video_only=False)")
        logits = self.video_linear(embedding * self.scale).split(self.sizes, dim=-1)
        parts = [F.cross_entropy(out.float(), labels[:, i])
                 for i, (spec, out) in enumerate(zip(LABELS, logits)) if spec.name in only]
        return torch.stack(parts).mean()

    def token_loss(self, tokens: Tensor, labels: Tensor, frame_mask: Tensor) -> Tensor:
        """Cross-entropy of each real frame's patch tokens (B, F*G, D) against their dense
        labels (B, F, G, 2) (pvl_search.data.scene_labels.token_labels): shape and motion."""
        if self.tokens is None:
            raise ValueError("these heads were built without token heads (hidden=None)")
        b, f, g, _ = labels.shape
        logits = self.tokens(tokens).view(b, f, g, -1)[frame_mask]  # (real frames, G, classes)
        real = labels[frame_mask]  # (real frames, G, 2)
        shape_logits, motion_logits = logits.float().split(list(TOKEN_CLASSES), dim=-1)
        return (F.cross_entropy(shape_logits.flatten(0, 1), real[..., 0].flatten())
                + F.cross_entropy(motion_logits.flatten(0, 1), real[..., 1].flatten())) / 2
