"""Model configuration: one typed dataclass, named presets, JSON beside the weights."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# open_clip's BPE vocabulary (49,152 merges + byte tokens + <start>/<end>); id 0 pads.
CLIP_VOCAB_SIZE = 49408


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a Perceiver-VL model (paper section 3, Fig. 1)."""

    hidden: int = 768  # D: width of inputs, latents and decoder
    heads: int = 12  # attention heads in every attention layer
    mlp_ratio: float = 4.0  # MLP hidden = mlp_ratio * D
    latents: int = 128  # N: size of the latent array
    blocks: int = 3  # k: encoder blocks, each one cross-attention + `self_layers`
    self_layers: int = 4  # l: self-attention layers per block
    frame_size: int = 384  # frames are square, frame_size x frame_size pixels
    patch: int = 32  # P: non-overlapping P x P pixel patches
    frames: int = 8  # frames sampled per video (or per segment)
    max_frames: int = 64  # temporal embedding table; longer inputs interpolate it
    text_length: int = 40  # tokens per text, <start> and <end> included
    vocab_size: int = CLIP_VOCAB_SIZE
    token_dim: int | None = None  # factorised token embedding width (None = hidden)
    embed_dim: int = 256  # d: multi-stream embedding stored in the vector index
    layerdrop: float = 0.5  # p_LD: chance to skip each cross-attention but the first
    # Additions to the paper's input embedding, off in its configuration (0). The latents
    # see inputs only through cross-attention, a weighted sum: a word cannot be bound to its
    # neighbour ("blue cross" vs "blue ... cross") nor a patch to the same patch a frame
    # earlier (motion, event order). These give the inputs that local context first.
    text_mixer_layers: int = 0  # self-attention layers over the text tokens
    temporal_kernel: int = 0  # depthwise convolution over frames at each patch position (odd)
    # Channels of a small convolutional stem before the patch projection (0 = the paper's
    # linear patch embedding). A linear patch token cannot tell a ring from a disc when an
    # object spans two or three patches; two 3x3 convolutions give it nonlinear local shape.
    conv_stem: int = 0
    # A second reranker beside the paper's [CLS] decoder: the query's text latents attend over
    # a candidate's stored video latents (token by token), so it can check what the pooled
    # embeddings blur. Costs N x D stored floats per segment.
    latent_reranker: bool = False

    def __post_init__(self) -> None:
        import math
        import numbers

        # Field by field first, before anything divides by a field or sizes a tensor with it:
        # a hand-edited config.json with heads 0 or vocab_size 1e9 must be one clear error,
        # not a ZeroDivisionError or a 256 GB allocation. Bounds are generous sanity limits.
        whole = {
            "hidden": (1, 16384), "heads": (1, 1024), "latents": (1, 65536), "blocks": (1, 256),
            "self_layers": (0, 256), "frame_size": (1, 8192), "patch": (1, 8192), "frames": (1, 4096),
            "max_frames": (1, 65536), "text_length": (3, 4096), "vocab_size": (1, 1 << 20),
            "token_dim": (1, 16384), "embed_dim": (1, 16384), "text_mixer_layers": (0, 64),
            "temporal_kernel": (0, 255), "conv_stem": (0, 4096),
        }  # fmt: skip
        for name, (low, high) in whole.items():
            value = getattr(self, name)
            if value is None and name == "token_dim":
                continue  # None: the token embedding is `hidden` wide
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise ValueError(f"model config: {name} must be a whole number, got {value!r}")
            if not low <= value <= high:
                raise ValueError(f"model config: {name}={value} is out of range [{low}, {high}]")
        for name, (low, high) in {"mlp_ratio": (1e-3, 64.0), "layerdrop": (0.0, 1.0)}.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise ValueError(f"model config: {name} must be a finite number, got {value!r}")
            if not low <= value <= high:
                raise ValueError(f"model config: {name}={value} is out of range [{low}, {high}]")
        if not isinstance(self.latent_reranker, bool):
            raise ValueError(f"model config: latent_reranker must be true or false, got {self.latent_reranker!r}")
        # Each field may be sane and the whole still absurd: bound the parameter count too
        # (token table, position tables, every attention/MLP layer), 4 bytes each in float32.
        layers = self.blocks * (self.self_layers + 1) + self.text_mixer_layers + 2
        positions = (self.frame_size // self.patch) ** 2 + self.max_frames + self.latents + self.text_length
        params = (self.vocab_size * (self.token_dim or self.hidden) + positions * self.hidden
                  + layers * (4 + 2 * self.mlp_ratio) * self.hidden**2)
        if params > 4e9:
            raise ValueError(f"model config describes about {params / 1e9:.0f} billion parameters; "
                             "at most 4 billion are allowed")
        if self.hidden % self.heads:
            raise ValueError(f"hidden={self.hidden} is not divisible by heads={self.heads}")
        if self.frame_size % self.patch:
            raise ValueError(f"frame_size={self.frame_size} is not divisible by patch={self.patch}")
        if self.temporal_kernel and self.temporal_kernel % 2 == 0:
            raise ValueError(f"temporal_kernel={self.temporal_kernel} must be odd (0 = off)")
        if self.conv_stem and self.patch % 2:
            raise ValueError(f"conv_stem needs an even patch size; got patch={self.patch}")
        if self.text_length < 3:
            raise ValueError("text_length must leave room for <start>, one token and <end>")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def grid(self) -> int:
        """Patches along one side of a frame."""
        return self.frame_size // self.patch

    @property
    def patch_tokens(self) -> int:
        """Video input tokens per clip (F x g x g): what the patch reranker reads per candidate."""
        return self.frames * self.grid * self.grid

    @property
    def rerank_state_width(self) -> int:
        """Floats per segment in the factorised mixed-stream state: D means + H log-normalisers."""
        return self.hidden + self.heads

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown model config field(s): {', '.join(unknown)}")
        return cls(**data)

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: cannot read model config: {exc}") from exc
        return cls.from_dict(data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")


PRESETS: dict[str, ModelConfig] = {
    # The paper's configuration: ViT-B sized, 12 self-attention layers with a
    # cross-attention before layers 1, 5 and 9.
    "base": ModelConfig(),
    # Trainable on 2 CPU cores in minutes. The factorised token embedding keeps the
    # 49k-row table small (49408 x 64) so the shipped weights stay a few MB.
    "tiny": ModelConfig(
        hidden=192,
        heads=4,
        latents=32,
        blocks=2,
        self_layers=2,
        frame_size=64,
        patch=8,
        frames=8,
        max_frames=32,
        text_length=24,
        token_dim=64,
        embed_dim=128,
    ),
}


def preset(name: str) -> ModelConfig:
    """A named configuration; a clear error lists the known names."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown config {name!r}; choose one of: {', '.join(PRESETS)}") from None

