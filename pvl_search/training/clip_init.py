"""Initialise Perceiver-VL from a CLIP ViT (paper section 4.2, two-stage training).

The paper copies CLIP's visual patch embedding, its positional embedding and its transformer
blocks into Perceiver-VL's input embedding and self-attention stack, starts the
cross-attentions fresh, trains the fresh parts alone first and then everything.

Like timm's checkpoint filters, this module maps a foreign checkpoint onto our names and
resamples what has a different shape (patch kernel, position grid). Weights are read only
from local files: open_clip builds the architecture from a registered name (e.g. `ViT-B-16`)
plus a weights file, or from `local-dir:/folder` holding `open_clip_config.json` and weights.
How each CLIP block maps onto ours, and the notes on what that approximates, are in
clip_mapping.py.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pvl_search.model.config import ModelConfig
from pvl_search.model.perceiver import PerceiverVL
from pvl_search.training.clip_mapping import block_tensors, copy_notes

LOCAL_DIR = "local-dir:"
SPEC_FORM = "clip:MODEL:PATH (e.g. clip:ViT-B-16:/models/clip.safetensors) or clip:local-dir:/folder"
# Weights open_clip looks for inside a local-dir folder (same suffixes as its own search).
_LOCAL_DIR_WEIGHTS = ("*.safetensors", "*.bin", "*.pth")
# Our parameters that the CLIP visual tower can initialise (the default `copied` set of
# `trainable_parameters`): patch embedding, 2-D patch positions, the self-attention stack.
CLIP_SHAPED = re.compile(r"^(video_embed\.patch_embed\.(weight|bias)|video_embed\.position|encoder\.layers\.\d+\..+)$")


class ClipInitError(ValueError):
    """CLIP weights that cannot initialise this model; the message names the file or value."""


@dataclass
class InitReport:
    """What `init_from_clip` did, for the CLI to show and the trainer to log."""

    source: str  # model name and weights file it came from
    copied: list[str] = field(default_factory=list)  # our parameter names now holding CLIP values
    blocks_copied: int = 0  # CLIP blocks copied into encoder.layers[0 : blocks_copied]
    clip_blocks: int = 0  # transformer blocks in the CLIP visual tower
    self_layers: int = 0  # self-attention layers in our encoder
    resampled: list[str] = field(default_factory=list)  # tensors whose shape had to change
    notes: list[str] = field(default_factory=list)  # known approximations and unused parts

    @property
    def tensors_copied(self) -> int:
        return len(self.copied)

    def summary(self) -> str:
        """A few lines for a terminal (the library never prints)."""
        lines = [
            f"initialised from {self.source}: {self.tensors_copied} tensors, "
            f"{self.blocks_copied} of {self.clip_blocks} CLIP blocks into {self.self_layers} self-attention layers"
        ]
        lines += [f"resampled: {item}" for item in self.resampled]
        lines += [f"note: {item}" for item in self.notes]
        return "\n".join(lines)


# ---------------------------------------------------------------------------- spec parsing


def parse_init_spec(spec: str) -> tuple[str, Path | None]:
    """`clip:MODEL:PATH` -> (MODEL, PATH); `clip:local-dir:/folder` -> ('local-dir:/folder', None).

    Only the first two colons split, so PATH may hold colons of its own.
    """
    parts = spec.split(":", 2)
    if len(parts) != 3 or parts[0] != "clip" or not parts[1].strip() or not parts[2].strip():
        raise ClipInitError(f"malformed init spec {spec!r}; expected {SPEC_FORM}")
    model_name, path = parts[1].strip(), parts[2].strip()
    if model_name == "local-dir":
        return LOCAL_DIR + path, None
    if model_name == "hf-hub":
        raise ClipInitError(f"init spec {spec!r}: hf-hub needs the network; download the weights and pass the file")
    return model_name, Path(path)


# ---------------------------------------------------------------------------- resampling


def _bicubic(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bicubic resize of (B, C, h, w); anti-aliased when shrinking so no grid row is skipped."""
    shrinking = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    return F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=shrinking)


def resample_patch_kernel(weight: Tensor, patch: int) -> Tensor:
    """Patch-embedding kernel (D, C, p, p) -> (D, C, patch, patch).

    A plain interpolation of the kernel changes its response (a 2x larger kernel sums ~4x
    as many pixels). Instead, as in FlexiViT, take the bicubic resize B of a p x p patch to
    patch x patch and solve for the kernel w' with <B x, w'> = <x, w>: w' = pinv(B^T) w. When
    growing the patch that is exact (a patch upsampled to our size gets CLIP's token), when
    shrinking it is the least-squares best.
    """
    d, c, old_h, old_w = weight.shape
    if (old_h, old_w) == (patch, patch):
        return weight.clone()
    basis = torch.eye(old_h * old_w, dtype=torch.float64).view(-1, 1, old_h, old_w)
    resize_t = _bicubic(basis, (patch, patch)).view(old_h * old_w, patch * patch)  # B^T: (p*p, P*P)
    flat = weight.detach().to("cpu", torch.float64).reshape(d * c, old_h * old_w)  # (D*C, p*p)
    # Minimum-norm least squares, i.e. pinv(B^T) w (gelsy: ~10x faster than an SVD pinv here).
    new = torch.linalg.lstsq(resize_t, flat.T, driver="gelsy").solution.T  # (D*C, P*P)
    return new.reshape(d, c, patch, patch).to(weight.device, weight.dtype)


def resample_positions(position: Tensor, grid: tuple[int, int], size: int) -> Tensor:
    """2-D patch positions (gh*gw, D) in row-major order -> (size*size, D), bicubic."""
    gh, gw = grid
    if (gh, gw) == (size, size):
        return position.clone()
    table = position.detach().float().reshape(gh, gw, -1).permute(2, 0, 1)[None]  # (1, D, gh, gw)
    table = _bicubic(table, (size, size))[0]  # (D, size, size)
    return table.permute(1, 2, 0).reshape(size * size, -1).to(position.dtype)


# ---------------------------------------------------------------------------- loading CLIP


def _build_clip(model_name: str, weights_path: str | Path | None) -> tuple[nn.Module, str]:
    """The open_clip model with its weights, from local files only; and a source label."""
    import open_clip

    if model_name.startswith("hf-hub:"):
        raise ClipInitError(f"{model_name}: hf-hub needs the network; download the weights and pass the file")
    if model_name.startswith(LOCAL_DIR):
        folder = Path(model_name[len(LOCAL_DIR) :])
        config_file = folder / "open_clip_config.json"
        if not config_file.is_file():
            raise ClipInitError(f"{config_file}: missing (a local-dir CLIP folder holds it and the weights)")
        if weights_path is None and not any(p.is_file() for g in _LOCAL_DIR_WEIGHTS for p in folder.glob(g)):
            # open_clip would only warn and hand back random weights.
            raise ClipInitError(f"{folder}: no CLIP weights (*.safetensors, *.bin or *.pth) beside {config_file.name}")
    elif weights_path is None:
        raise ClipInitError(f"{model_name}: a CLIP weights file is needed (only local files are read)")
    elif open_clip.get_model_config(model_name.replace("/", "-")) is None:
        raise ClipInitError(
            f"unknown open_clip model {model_name!r}; use a registered name (e.g. ViT-B-16) "
            f"or local-dir:/folder with open_clip_config.json"
        )
    if weights_path is not None and not Path(weights_path).is_file():
        raise ClipInitError(f"{weights_path}: CLIP weights file not found")

    source = model_name if weights_path is None else f"{model_name} ({weights_path})"
    try:
        if weights_path is None:  # local-dir: open_clip loads the folder's own weights
            clip = open_clip.create_model(model_name, device="cpu", precision="fp32")
        elif model_name.startswith(LOCAL_DIR):  # a local-dir architecture with weights kept elsewhere
            clip = open_clip.create_model(model_name, load_weights=False, device="cpu", precision="fp32")
            open_clip.load_checkpoint(clip, str(weights_path))
        else:
            clip = open_clip.create_model(model_name, pretrained=str(weights_path), device="cpu", precision="fp32")
    except ClipInitError:
        raise
    except Exception as exc:  # open_clip raises RuntimeError/ValueError/OSError/KeyError alike
        if "TorchScript" in str(exc):  # OpenAI's original .pt files; loading them would unpickle
            raise ClipInitError(
                f"{source}: a TorchScript archive (OpenAI's original .pt) is not read; use open_clip's "
                "state-dict weights (open_clip_model.safetensors / open_clip_pytorch_model.bin) instead"
            ) from exc
        raise ClipInitError(f"{source}: cannot load CLIP weights: {exc}") from exc
    return clip.eval(), source


# ---------------------------------------------------------------------------- copying


def init_from_clip(model: PerceiverVL, model_name: str, weights_path: str | Path | None = None) -> InitReport:
    """Copy a local CLIP ViT's visual tower into `model` (in place); everything else stays fresh.

    `model_name` is an open_clip architecture name with `weights_path` a .safetensors / .pt /
    .bin state dict, or `local-dir:/folder` (weights_path optional: the folder's weights by default).
    """
    clip, source = _build_clip(model_name, weights_path)
    return copy_clip_visual(model, clip, source=source)


def _visual_tower(clip: nn.Module) -> nn.Module:
    from open_clip.transformer import VisionTransformer

    visual = getattr(clip, "visual", None)
    if not isinstance(visual, VisionTransformer):
        kind = type(visual).__name__ if visual is not None else "no visual tower"
        raise ClipInitError(f"CLIP visual tower is {kind}; only open_clip ViT towers can initialise Perceiver-VL")
    return visual


def _check_block(block: nn.Module, index: int) -> None:
    """Refuse block features our SelfAttentionBlock cannot express (they would be silently lost)."""
    attn = block.attn
    if isinstance(attn, nn.MultiheadAttention) and not attn._qkv_same_embed_dim:
        raise ClipInitError(f"CLIP block {index}: separate q/k/v projections are not supported")
    extras = {
        "qk_norm": not isinstance(getattr(attn, "ln_q", nn.Identity()), nn.Identity),
        "scaled_cosine_attn": getattr(attn, "logit_scale", None) is not None,
        "scale_heads": getattr(attn, "head_scale", None) is not None,
        "scale_attn_inner": not isinstance(getattr(attn, "ln_inner", nn.Identity()), nn.Identity),
        "scale_attn": not isinstance(getattr(block, "ln_attn", nn.Identity()), nn.Identity),
        "scale_fc": not isinstance(getattr(block.mlp, "ln", nn.Identity()), nn.Identity),
        "attention without bias": getattr(attn, "in_proj_bias", None) is None,
    }
    used = [name for name, on in extras.items() if on]
    if used:
        raise ClipInitError(f"CLIP block {index} uses {', '.join(used)}; our self-attention layers have no such part")


def copy_clip_visual(model: PerceiverVL, clip: nn.Module, *, source: str = "CLIP") -> InitReport:
    """Copy an already built open_clip model's visual tower into `model` (in place).

    Patch kernel -> video_embed.patch_embed (bias zero: CLIP's has none), positions without the
    class-token row -> video_embed.position, block i -> encoder.layers[i] for the first
    min(#CLIP blocks, #our layers). Checks everything before changing anything.
    """
    visual = _visual_tower(clip)
    blocks = list(visual.transformer.resblocks)
    _check_compatible(model, visual, blocks, source)
    report = InitReport(source=source, clip_blocks=len(blocks), self_layers=len(model.encoder.layers))
    updates = _embedding_updates(model.config, visual, report)
    block_updates, folded = _block_updates(model, blocks, visual.conv1.out_channels, report)
    updates.update(block_updates)
    _copy_into(model, updates, source)
    report.copied = list(updates)
    report.notes += copy_notes(model, visual, blocks, report.blocks_copied, folded)
    return report


def _check_compatible(model: PerceiverVL, visual: nn.Module, blocks: list[nn.Module], source: str) -> None:
    """Refuse a CLIP tower whose width, heads, MLP, blocks or position table ours cannot hold."""
    config = model.config
    width, heads = visual.conv1.out_channels, blocks[0].attn.num_heads
    if (width, heads) != (config.hidden, config.heads):
        raise ClipInitError(
            f"{source}: CLIP width {width} with {heads} heads cannot initialise a model with "
            f"hidden {config.hidden} and {config.heads} heads; they must match"
        )
    mlp_clip, mlp_ours = blocks[0].mlp.c_fc.out_features, model.encoder.layers[0].mlp.fc1.out_features
    if mlp_clip != mlp_ours:
        raise ClipInitError(
            f"{source}: CLIP MLP width {mlp_clip} differs from ours {mlp_ours} "
            f"(mlp_ratio {config.mlp_ratio}); they must match"
        )
    for i, block in enumerate(blocks):
        _check_block(block, i)
    grid = tuple(visual.grid_size)
    if visual.positional_embedding.shape[0] != grid[0] * grid[1] + 1:
        raise ClipInitError(
            f"{source}: CLIP positional embedding has {visual.positional_embedding.shape[0]} rows, "
            f"expected {grid[0]} x {grid[1]} patches + 1 class token"
        )


def _embedding_updates(config: ModelConfig, visual: nn.Module, report: InitReport) -> dict[str, Tensor]:
    """Patch kernel, its bias and the patch positions, resampled to our patch and grid sizes."""
    updates: dict[str, Tensor] = {}
    width = visual.conv1.out_channels
    kernel = visual.conv1.weight.detach()  # (D, 3, p, p)
    if kernel.shape[-2:] != (config.patch, config.patch):
        report.resampled.append(
            f"patch kernel {kernel.shape[-2]}x{kernel.shape[-1]} -> {config.patch}x{config.patch} "
            "(pseudo-inverse of a bicubic resize, FlexiViT-style, so a resized patch keeps its token)"
        )
    updates["video_embed.patch_embed.weight"] = resample_patch_kernel(kernel, config.patch)
    bias = visual.conv1.bias
    updates["video_embed.patch_embed.bias"] = torch.zeros(width) if bias is None else bias.detach()

    grid = tuple(visual.grid_size)
    positions = visual.positional_embedding.detach()[1:]  # drop the class-token row
    if grid != (config.grid, config.grid):
        report.resampled.append(
            f"patch positions {grid[0]}x{grid[1]} -> {config.grid}x{config.grid} (bicubic, class-token row dropped)"
        )
    updates["video_embed.position"] = resample_positions(positions, grid, config.grid)
    return updates


def _block_updates(
    model: PerceiverVL, blocks: list[nn.Module], width: int, report: InitReport
) -> tuple[dict[str, Tensor], bool]:
    """CLIP block i as encoder.layers[i], for as many blocks as both have; and whether any
    LayerScale gamma was folded in."""
    updates: dict[str, Tensor] = {}
    report.blocks_copied = min(len(blocks), len(model.encoder.layers))
    folded = False
    for i in range(report.blocks_copied):
        tensors, gamma = block_tensors(blocks[i], width)
        folded |= gamma
        updates.update({f"encoder.layers.{i}.{name}": value for name, value in tensors.items()})
    return updates, folded


def _copy_into(model: PerceiverVL, updates: dict[str, Tensor], source: str) -> None:
    """Check every shape first, then copy: a mismatch leaves the model untouched."""
    params = dict(model.named_parameters())
    for name, value in updates.items():
        if params[name].shape != value.shape:  # a programming error, not a user one
            raise ClipInitError(
                f"{source}: {name} has shape {tuple(params[name].shape)}, CLIP gives {tuple(value.shape)}"
            )
    with torch.no_grad():
        for name, value in updates.items():
            params[name].copy_(value)


# ---------------------------------------------------------------------------- two-stage training


def clip_shaped_names(model: PerceiverVL) -> list[str]:
    """Our parameters a CLIP visual tower initialises when it has at least as many blocks."""
    return [name for name, _ in model.named_parameters() if CLIP_SHAPED.match(name)]


def trainable_parameters(
    model: PerceiverVL, only: str, *, copied: Collection[str] | InitReport | None = None
) -> list[nn.Parameter]:
    """Parameters to train in one stage of the paper's two-stage schedule after CLIP init.

    only='cross': everything NOT copied from CLIP. That is more than the cross-attention
    blocks: the cross-attentions, latents and their positions, modality, temporal and text
    embeddings, self-attention layers CLIP had no block for, the encoder's final norm, the
    decoder and all heads/projections/temperature. Freezing only the copied tensors (rather than
    training the cross-attentions alone) is deliberate: every other tensor is random, and a
    frozen random embedding or head would never become useful.
    only='all': every parameter (stage two).

    `copied` is the set of copied names (or the InitReport itself); by default the tensors a
    CLIP tower fills when it has enough blocks (`clip_shaped_names`), which is what a model
    resumed from a stage-one checkpoint needs. Pass the returned list to the optimiser.
    """
    named = list(model.named_parameters())
    if only == "all":
        return [p for _, p in named]
    if only != "cross":
        raise ValueError(f"only must be 'cross' or 'all'; got {only!r}")
    if isinstance(copied, InitReport):
        copied = copied.copied
    frozen = set(clip_shaped_names(model) if copied is None else copied)
    unknown = sorted(frozen - {name for name, _ in named})
    if unknown:
        raise ValueError(f"copied names {unknown[:3]} are not parameters of this model")
    return [p for name, p in named if name not in frozen]

