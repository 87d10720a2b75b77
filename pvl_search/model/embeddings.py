"""Input embeddings (paper eq. 1): modality + temporal + positional + patch/token embedding."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pvl_search.model.config import ModelConfig
from pvl_search.model.layers import SelfAttentionBlock

VIDEO, TEXT = 0, 1  # rows of the modality embedding
PAD_ID = 0  # open_clip pads with id 0


class VideoEmbedding(nn.Module):
    """Frames (B, F, 3, S, S) -> patch tokens (B, F * g * g, D) and their padding mask.

    An image is a 1-frame video: it takes the same path with F = 1.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        d = config.hidden
        # A stride-P convolution is the linear projection of non-overlapping P x P patches.
        # With a stem, two 3x3 convolutions (the first at stride 2) come first and the
        # projection covers the same P x P pixels at half resolution.
        c = config.conv_stem
        if c:
            self.patch_embed = nn.Sequential(
                nn.Conv2d(3, c, 3, stride=2, padding=1), nn.GELU(),
                nn.Conv2d(c, c, 3, padding=1), nn.GELU(),
                nn.Conv2d(c, d, kernel_size=config.patch // 2, stride=config.patch // 2),
            )
        else:
            self.patch_embed = nn.Conv2d(3, d, kernel_size=config.patch, stride=config.patch)
        self.position = nn.Parameter(torch.randn(config.grid * config.grid, d) * 0.02)
        self.temporal = nn.Parameter(torch.randn(config.max_frames, d) * 0.02)
        k = config.temporal_kernel
        # Each patch position's features mixed with the same position in nearby frames: motion.
        self.temporal_mix = nn.Conv1d(d, d, k, padding=k // 2, groups=d) if k else None
        if self.temporal_mix is not None:
            nn.init.zeros_(self.temporal_mix.weight)  # starts as the paper's embedding
            nn.init.zeros_(self.temporal_mix.bias)

    def temporal_table(self, frames: int) -> Tensor:
        """(F, D) frame-index embeddings; longer videos than the table interpolate it."""
        if frames <= self.temporal.shape[0]:
            return self.temporal[:frames]
        table = self.temporal.T[None]  # (1, D, max_frames)
        return F.interpolate(table, size=frames, mode="linear", align_corners=True)[0].T

    def forward(self, frames: Tensor, frame_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        b, f, c, h, w = frames.shape
        size = self.config.frame_size
        if (c, h, w) != (3, size, size):
            raise ValueError(f"frames must be (B, F, 3, {size}, {size}); got {tuple(frames.shape)}")
        patches = self.patch_embed(frames.reshape(b * f, c, h, w))  # (B*F, D, g, g)
        tokens = patches.flatten(2).transpose(1, 2).reshape(b, f, -1, self.config.hidden)  # (B, F, g*g, D)
        if frame_mask is None:
            frame_mask = torch.ones(b, f, dtype=torch.bool, device=frames.device)
        if self.temporal_mix is not None:
            tokens = tokens + self._mix_over_time(tokens * frame_mask[:, :, None, None].to(tokens.dtype))
        tokens = tokens + self.position[None, None] + self.temporal_table(f)[None, :, None]
        token_mask = frame_mask[:, :, None].expand(b, f, tokens.shape[2])
        return tokens.reshape(b, -1, self.config.hidden), token_mask.reshape(b, -1)

    def _mix_over_time(self, tokens: Tensor) -> Tensor:
        """(B, F, G, D) -> (B, F, G, D): the depthwise temporal convolution, padded frames zeroed."""
        b, f, g, d = tokens.shape
        series = tokens.permute(0, 2, 3, 1).reshape(b * g, d, f)
        return self.temporal_mix(series).reshape(b, g, d, f).permute(0, 3, 1, 2)


class TextEmbedding(nn.Module):
    """Token ids (B, L) -> tokens (B, L, D) and their padding mask (id 0 is padding).

    With `token_dim` set, the 49k-row table is token_dim wide and projected up to D
    (ALBERT-style factorisation), which keeps a small model small.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        width = config.token_dim or config.hidden
        self.token = nn.Embedding(config.vocab_size, width)
        nn.init.normal_(self.token.weight, std=0.02)
        self.project = nn.Linear(width, config.hidden, bias=False) if config.token_dim else nn.Identity()
        self.position = nn.Parameter(torch.randn(config.text_length, config.hidden) * 0.02)
        # Replaces the tokens chosen for masked language modelling.
        self.mask_token = nn.Parameter(torch.zeros(config.hidden))
        self.mixer = nn.ModuleList(
            SelfAttentionBlock(config.hidden, heads=config.heads, mlp_ratio=config.mlp_ratio)
            for _ in range(config.text_mixer_layers)
        )

    def forward(self, token_ids: Tensor, replace_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        b, length = token_ids.shape
        if length > self.config.text_length:
            raise ValueError(f"text has {length} tokens; the model takes at most {self.config.text_length}")
        tokens = self.project(self.token(token_ids))  # (B, L, D)
        if replace_mask is not None:
            tokens = torch.where(replace_mask[..., None], self.mask_token.to(tokens.dtype), tokens)
        tokens = tokens + self.position[:length]
        mask = token_ids != PAD_ID
        for layer in self.mixer:  # words in their context, before the latents read them
            tokens = layer(tokens, key_mask=mask)
        return tokens, mask

    def output_logits(self, hidden: Tensor) -> Tensor:
        """Vocabulary logits tied to the token table: (..., token_dim or D) -> (..., vocab)."""
        return hidden @ self.token.weight.T
