"""How a CLIP visual tower's parts map onto Perceiver-VL: one residual block as our
SelfAttentionBlock's tensors (LayerScale folded in), and the notes on what the copy leaves out
or only approximates. `clip_init.copy_clip_visual` checks the tower and does the copying.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from pvl_search.model.perceiver import PerceiverVL


def _layer_scale(module: nn.Module) -> Tensor | None:
    gamma = getattr(module, "gamma", None)
    return None if gamma is None else gamma.detach()


def block_tensors(block: nn.Module, width: int) -> tuple[dict[str, Tensor], bool]:
    """One CLIP residual block as our SelfAttentionBlock's state (names relative to the block).

    LayerScale gammas are folded into the projection before them: gamma * (W a + b) =
    (diag(gamma) W) a + gamma * b. Returns the tensors and whether any gamma was folded.
    """
    attn, mlp = block.attn, block.mlp
    in_w, in_b = attn.in_proj_weight.detach(), attn.in_proj_bias.detach()  # (3D, D) rows: q, k, v
    out_w, out_b = attn.out_proj.weight.detach(), attn.out_proj.bias.detach()
    proj_w, proj_b = mlp.c_proj.weight.detach(), mlp.c_proj.bias.detach()
    gamma_1, gamma_2 = _layer_scale(block.ls_1), _layer_scale(block.ls_2)
    if gamma_1 is not None:
        out_w, out_b = gamma_1[:, None] * out_w, gamma_1 * out_b
    if gamma_2 is not None:
        proj_w, proj_b = gamma_2[:, None] * proj_w, gamma_2 * proj_b
    tensors = {
        "norm1.weight": block.ln_1.weight.detach(),
        "norm1.bias": block.ln_1.bias.detach(),
        "attn.to_q.weight": in_w[:width],
        "attn.to_q.bias": in_b[:width],
        "attn.to_kv.weight": in_w[width:],  # keys then values, as Attention.to_kv chunks them
        "attn.to_kv.bias": in_b[width:],
        "attn.to_out.weight": out_w,
        "attn.to_out.bias": out_b,
        "norm2.weight": block.ln_2.weight.detach(),
        "norm2.bias": block.ln_2.bias.detach(),
        "mlp.fc1.weight": mlp.c_fc.weight.detach(),
        "mlp.fc1.bias": mlp.c_fc.bias.detach(),
        "mlp.fc2.weight": proj_w,
        "mlp.fc2.bias": proj_b,
    }
    return tensors, gamma_1 is not None or gamma_2 is not None


def _activation_note(block: nn.Module) -> str | None:
    from open_clip.transformer import QuickGELU

    act = getattr(block.mlp, "gelu", None)
    if isinstance(act, QuickGELU):
        return (
            "CLIP's MLP uses QuickGELU (x * sigmoid(1.702 x)) and ours uses exact GELU: a known "
            "approximation (the two differ by at most ~0.02 per unit); fine-tuning absorbs it"
        )
    if isinstance(act, nn.GELU) and act.approximate == "none":
        return None
    return f"CLIP's MLP activation is {act!r}, ours is exact GELU: the copied blocks are approximate"


def copy_notes(
    model: PerceiverVL, visual: nn.Module, blocks: list[nn.Module], blocks_copied: int, folded: bool
) -> list[str]:
    """What the copy leaves out or only approximates, for InitReport.notes."""
    notes = []
    layers = len(model.encoder.layers)
    activation = _activation_note(blocks[0])
    if activation:
        notes.append(activation)
    if folded:
        notes.append("LayerScale gammas (ls_1, ls_2) folded into to_out and fc2")
    if blocks_copied < len(blocks):
        notes.append(
            f"CLIP blocks {blocks_copied}..{len(blocks) - 1} unused "
            f"(our encoder has {layers} self-attention layers)"
        )
    if blocks_copied < layers:
        notes.append(f"self-attention layers {blocks_copied}..{layers - 1} start fresh")
    eps = {block.ln_1.eps for block in blocks} | {block.ln_2.eps for block in blocks}
    ours = model.encoder.layers[0].norm1.eps
    if eps != {ours}:
        notes.append(f"CLIP LayerNorm eps {sorted(eps)} differs from ours ({ours})")
    notes.append(
        "not copied (no counterpart): class token, ln_pre, ln_post, visual projection, text tower; "
        "cross-attentions, latents, modality/temporal/text embeddings, decoder and heads start fresh"
    )
    mean = _preprocess_value(visual, "mean")
    if mean is not None:
        from pvl_search.media.video import CLIP_MEAN, CLIP_STD

        std = _preprocess_value(visual, "std")
        same = torch.allclose(torch.tensor(mean), torch.tensor(CLIP_MEAN)) and torch.allclose(
            torch.tensor(std), torch.tensor(CLIP_STD)
        )
        if not same:
            notes.append(f"CLIP was trained on frames normalised with mean {mean} / std {std}; ours use OpenAI CLIP's")
    return notes


def _preprocess_value(visual: nn.Module, key: str) -> list[float] | None:
    cfg: Any = getattr(visual, "preprocess_cfg", None) or {}
    value = cfg.get(key)
    return None if value is None else [float(v) for v in value]
