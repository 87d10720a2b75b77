"""What `loop.train` sets up before its first step: the option checks, the parameters to train
(with the attribute heads the losses need) and the optimizer."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from pvl_search.data.pairs import PairSet
from pvl_search.data.scene_stream import SceneStream
from pvl_search.model.perceiver import PerceiverVL
from pvl_search.training.attribute_heads import AttributeHeads
from pvl_search.training.losses import FOCUSED_ATTRIBUTES

if TYPE_CHECKING:  # loop imports this module
    from pvl_search.training.loop import TrainConfig


def uses_attribute_heads(cfg: TrainConfig) -> bool:
    """Whether a loss reads the attribute heads on the embeddings (all labels, or a focus)."""
    return bool(cfg.losses.attributes or cfg.losses.video_shape_attributes
                or any(getattr(cfg.losses, name) for name in FOCUSED_ATTRIBUTES))


def check_options(
    model: PerceiverVL, train_data: PairSet | SceneStream, stream: SceneStream | None, cfg: TrainConfig
) -> None:
    """Refuse option combinations that cannot train, before anything is set up."""
    if len(train_data) < cfg.batch_size:
        raise ValueError(f"{len(train_data)} training videos is fewer than one batch of {cfg.batch_size}")
    if cfg.retrieval_from and not cfg.losses.in_first_phase().weighted():
        raise ValueError("a curriculum (retrieval from a later epoch) needs attribute losses to train before it")
    if cfg.losses.latent_nce and model.latent_reranker is None:
        raise ValueError("the latent reranker's loss needs a model with one (--latent-reranker)")
    if cfg.mined_negatives and not cfg.losses.mixed_nce:
        raise ValueError("mined negatives feed the listwise mixed-stream loss: give it a weight (--mixed-nce)")
    if stream is not None and (cfg.mined_negatives or cfg.rerank_only_groups):
        raise ValueError("mined negatives and --rerank-only-groups need a fixed training set, not a stream")
    if uses_attribute_heads(cfg) and stream is None and train_data.labels is None:
        raise ValueError("the attribute loss needs scene labels (a synthetic benchmark's captions file)")


def training_parameters(
    model: PerceiverVL, cfg: TrainConfig, trainable: list[torch.nn.Parameter] | None, device: torch.device
) -> tuple[list[torch.nn.Parameter], AttributeHeads | None]:
    """The parameters to train (freezing the rest of the model), and the attribute heads the
    attribute losses need, fresh and on `device` (their parameters are in the list too)."""
    params = trainable if trainable is not None else list(model.parameters())
    if trainable is not None:  # e.g. stage one of the paper's CLIP schedule: the rest is frozen
        keep = {id(p) for p in trainable}
        for p in model.parameters():
            p.requires_grad_(id(p) in keep)
    dense = bool(cfg.losses.token_attributes)
    video_only = bool(cfg.losses.video_shape_attributes)
    heads = (AttributeHeads(model.config.embed_dim, model.config.hidden if dense else None,
                            video_only=video_only).to(device)
             if uses_attribute_heads(cfg) or dense else None)
    if heads is not None:
        params = params + list(heads.parameters())
    return params, heads


def make_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only."""
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]  # norms, biases, single vectors
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr
    )
