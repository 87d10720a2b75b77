"""Training objectives, computed on one batch by `compute_losses`: video-text contrastive
(multi-stream), VTM with hard negatives (mixed-stream, and single-stream through the joint
encoder), the listwise mixed-stream loss (optionally with negatives mined from a bank), the
latent reranker's listwise loss, masked language modelling through the decoder, and the
attribute losses: attribute heads on both embeddings, the same heads focused on the order or
the shape and motion labels, and dense heads on the video input tokens.

Each loss and its weight is declared once, in loss_weights.py (LossWeights, LOSSES)."""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from pvl_search.data.scene_labels import ORDER_LABELS, SHAPE_LABELS, SHAPE_MOTION_LABELS
from pvl_search.model.config import CLIP_VOCAB_SIZE
from pvl_search.model.embeddings import PAD_ID
from pvl_search.model.perceiver import Encoding, PerceiverVL
from pvl_search.training.attribute_heads import AttributeHeads
from pvl_search.training.loss_weights import LossWeights
from pvl_search.training.negative_bank import NegativeBank

# Each focused attribute loss: the attribute heads again, on a subset of the labels.
FOCUSED_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "order_attributes": ORDER_LABELS,
    "shape_motion_attributes": SHAPE_MOTION_LABELS,
}


@dataclass
class LossOutput:
    total: Tensor
    parts: dict[str, float] = field(default_factory=dict)
    similarity: Tensor | None = None  # (B_text, B_video) multi-stream similarities


def contrastive_loss(logits: Tensor, ignore: Tensor | None = None) -> Tensor:
    """Symmetric InfoNCE over a (B, B) text-by-video logit matrix whose diagonal matches.

    `ignore` (B, B) bool marks off-diagonal pairs that are neither positive nor negative."""
    target = torch.arange(logits.shape[0], device=logits.device)
    if ignore is not None:
        logits = logits.masked_fill(ignore & ~torch.eye(len(target), dtype=torch.bool, device=logits.device),
                                    float("-inf"))
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def hard_negatives(logits: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """For each text a negative video, and for each video a negative text, drawn with
    probability softmax(contrastive logits) over the others (ALBEF's sampling): hard, but not
    always the hardest, which early in training is a near-copy of the positive and teaches
    the VTM head nothing."""
    weights = logits.detach().float().clone()
    weights.fill_diagonal_(float("-inf"))
    per_text = torch.multinomial(weights.softmax(dim=1), 1, generator=generator)[:, 0]
    per_video = torch.multinomial(weights.softmax(dim=0).T, 1, generator=generator)[:, 0]
    return per_text, per_video  # (B,) video per text, (B,) text per video


def vtm_pairs(batch: int, neg_video: Tensor, neg_text: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Indices (video, text) and labels: B positives, B (text, hard video), B (video, hard text)."""
    idx = torch.arange(batch, device=neg_video.device)
    videos = torch.cat([idx, neg_video, idx])
    texts = torch.cat([idx, idx, neg_text])
    labels = torch.cat([torch.ones(batch), torch.zeros(2 * batch)]).to(neg_video.device)
    return videos, texts, labels


def mlm_mask(token_ids: Tensor, probability: float, generator: torch.Generator | None = None) -> Tensor:
    """Positions to hide: real word tokens only (never <start>, <end> or padding); at least one."""
    # open_clip's <start> and <end> are the last two ids of its vocabulary.
    candidate = (token_ids != PAD_ID) & (token_ids < CLIP_VOCAB_SIZE - 2)
    chosen = (torch.rand(token_ids.shape, generator=generator) < probability).to(token_ids.device) & candidate
    first_word = candidate & (candidate.cumsum(1) == 1)
    return chosen | (first_word & ~chosen.any(1, keepdim=True))


def mixed_listwise_loss(
    model: PerceiverVL,
    video: Encoding,
    text: Encoding,
    video_states: Tensor,
    text_states: Tensor,
    bank: NegativeBank | None = None,
    rows: Tensor | None = None,
    mined: int = 0,
) -> Tensor:
    """Symmetric InfoNCE over the (B, B) mixed-stream logits of every in-batch pair (from the
    batch's rerank states); with a bank, each caption's `mined` closest banked videos are
    extra candidates (text -> video only), and the bank then takes this batch's videos."""
    all_pairs = model.mixed_scores(text_states, video_states)  # (B_text, B_video) logits
    if bank is None or rows is None or mined <= 0:
        return contrastive_loss(all_pairs)
    extra_states, valid = bank.mine(text.embedding, rows, mined)
    extra = model.mixed_scores(text_states, extra_states.to(text_states.device))  # (B, mined)
    extra = extra.masked_fill(~valid.to(extra.device), float("-inf"))
    target = torch.arange(all_pairs.shape[0], device=extra.device)
    with_mined = F.cross_entropy(torch.cat([all_pairs, extra], dim=1), target)
    bank.update(rows, video.embedding, video_states)
    return (with_mined + F.cross_entropy(all_pairs.T, target)) / 2


def compute_losses(
    model: PerceiverVL,
    frames: Tensor,
    frame_mask: Tensor | None,
    token_ids: Tensor,
    weights: LossWeights = LossWeights(),
    *,
    groups: Tensor | None = None,
    bank: NegativeBank | None = None,
    rows: Tensor | None = None,
    mined: int = 0,
    attribute_labels: Tensor | None = None,
    heads: AttributeHeads | None = None,
    token_labels: Tensor | None = None,
    gather: Callable[[Tensor], Tensor] | None = None,
) -> LossOutput:
    """All objectives on one batch of B matching (video, caption) pairs.

    `gather` (data-parallel training, pvl_search.training.collective): concatenates a tensor's
    rows from every worker, with gradients. The in-batch losses (contrastive, the listwise mixed
    loss, the latent reranker's) then run over every worker's pairs, as one process with the
    whole global batch would; the VTM pairs and the per-sample losses stay per worker.

    `groups` (B,) ints: videos of one group (e.g. hard-negative twins) are left out of each
    other's multi-stream contrastive loss and stay negatives for the VTM and mixed losses,
    so the first stage learns to find the group and the reranker to pick within it.

    `bank` (with the batch's training-set `rows`): the `mined` banked videos closest to each
    caption join its mixed-stream listwise loss as extra negatives; the bank is then updated
    with this batch.

    `attribute_labels` (B, len(scene_labels.LABELS)) with `heads`: the attribute loss, on the video
    and the caption embedding alike.

    A loss runs when `weights` gives it a weight (not 0); each part is named after its
    declared loss (loss_weights.py) and enters the total times that weight."""
    b = token_ids.shape[0]
    video = model.encode_video(frames, frame_mask, keep_inputs=bool(weights.token_attributes))
    text = model.encode_text(token_ids)
    similarity = text.embedding @ video.embedding.T  # (B, B)
    parts: dict[str, Tensor] = {}
    total = torch.zeros((), device=token_ids.device)
    logits = model.multi_stream_logits(video.embedding, text.embedding)  # temperature-scaled
    everyone = gather or (lambda t: t)
    if weights.contrastive:
        same_group = None if groups is None else groups[:, None] == groups[None, :]
        if gather is not None and groups is not None:
            raise ValueError("group-aware contrastive loss is per process; it does not combine with a gather")
        all_logits = logits if gather is None else model.multi_stream_logits(everyone(video.embedding),
                                                                              everyone(text.embedding))
        parts["contrastive"] = contrastive_loss(all_logits, ignore=same_group)
    neg_video, neg_text = hard_negatives(logits)
    pairs = vtm_pairs(b, neg_video, neg_text)
    parts |= _mixed_losses(model, video, text, pairs, weights, bank, rows, mined, everyone)
    if weights.latent_nce:
        parts["latent_nce"] = contrastive_loss(model.latent_scores(everyone(text.latents), everyone(video.latents)))
    if weights.single_vtm:
        parts["single_vtm"] = _single_vtm_loss(model, frames, frame_mask, token_ids, pairs)
    if weights.mlm:
        parts["mlm"] = _mlm_loss(model, token_ids, weights.mlm_probability)
    attribute_parts, sides = _attribute_losses(video, text, frame_mask, weights, attribute_labels, heads, token_labels)
    parts |= attribute_parts
    for name, value in parts.items():
        total = total + weights.weight(name) * value
    logged = {k: float(v.detach()) for k, v in parts.items()}
    logged |= {k: float(v.detach()) for k, v in sides.items()}  # which side is behind
    return LossOutput(total, logged, similarity.detach())


def _mixed_losses(
    model: PerceiverVL,
    video: Encoding,
    text: Encoding,
    pairs: tuple[Tensor, Tensor, Tensor],
    weights: LossWeights,
    bank: NegativeBank | None,
    rows: Tensor | None,
    mined: int,
    everyone: Callable[[Tensor], Tensor],
) -> dict[str, Tensor]:
    """The weighted mixed-stream losses: VTM on the `vtm_pairs` (this worker's), and the listwise
    loss (over `everyone`'s states: every worker's pairs)."""
    parts: dict[str, Tensor] = {}
    if weights.mixed_vtm or weights.mixed_nce:  # both mixed losses read the same states
        video_states, text_states = model.rerank_state(video.latents), model.rerank_state(text.latents)
    if weights.mixed_vtm:
        videos, texts, labels = pairs
        vtm = model.mixed_scores(text_states[texts], video_states[videos][:, None])[:, 0]  # (3B,)
        parts["mixed_vtm"] = F.binary_cross_entropy_with_logits(vtm, labels)
    if weights.mixed_nce:
        parts["mixed_nce"] = mixed_listwise_loss(model, video, text, everyone(video_states), everyone(text_states),
                                                 bank, rows, mined)
    return parts


def _single_vtm_loss(
    model: PerceiverVL, frames: Tensor, frame_mask: Tensor | None, token_ids: Tensor,
    pairs: tuple[Tensor, Tensor, Tensor],
) -> Tensor:
    """VTM through the single-stream joint encoder, on a random B of the 3B `vtm_pairs`."""
    videos, texts, labels = pairs
    b = token_ids.shape[0]
    # The joint encoder is the costly pass: use B of the 3B pairs, half of them positive.
    # Random rows, so that every video gets positive pairs whatever the batch order.
    half, quarter = b - b // 2, b // 4
    draws = [torch.randperm(b)[:n] for n in (half, quarter, b // 2 - quarter)]
    pick = torch.cat([draws[0], b + draws[1], 2 * b + draws[2]]).to(videos.device)
    v, t = videos[pick], texts[pick]
    mask = None if frame_mask is None else frame_mask[v]
    vtm = model.single_stream_scores(frames[v], mask, token_ids[t])
    return F.binary_cross_entropy_with_logits(vtm, labels[pick])


def _mlm_loss(model: PerceiverVL, token_ids: Tensor, probability: float) -> Tensor:
    """Masked language modelling through the decoder, on words hidden by `mlm_mask`."""
    masked = mlm_mask(token_ids, probability)
    latents = model.encode_text(token_ids, replace_mask=masked).latents
    vocab = model.mlm_logits(latents, masked)  # (B, L, V)
    return F.cross_entropy(vocab[masked].float(), token_ids[masked])


def _attribute_losses(
    video: Encoding, text: Encoding, frame_mask: Tensor | None, weights: LossWeights,
    attribute_labels: Tensor | None, heads: AttributeHeads | None, token_labels: Tensor | None,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The weighted attribute losses (all labels, each focus of FOCUSED_ATTRIBUTES, the dense
    patch heads), and the all-labels loss on each side alone, for the log."""
    parts: dict[str, Tensor] = {}
    sides: dict[str, Tensor] = {}
    if weights.attributes:
        sides = _attribute_sides(video, text, attribute_labels, heads)
        parts["attributes"] = (sides["attributes_video"] + sides["attributes_text"]) / 2
    for name, labels in FOCUSED_ATTRIBUTES.items():
        if weights.weight(name):
            focused = _attribute_sides(video, text, attribute_labels, heads, only=labels)
            parts[name] = (focused["attributes_video"] + focused["attributes_text"]) / 2
    if weights.token_attributes:
        parts["token_attributes"] = _token_attribute_loss(video, frame_mask, token_labels, heads)
    if weights.video_shape_attributes:
        if attribute_labels is None or heads is None:
            raise ValueError("the video shape loss needs scene labels and attribute heads")
        parts["video_shape_attributes"] = heads.video_loss(video.embedding, attribute_labels, only=SHAPE_LABELS)
    return parts, sides


def _attribute_sides(
    video: Encoding, text: Encoding, attribute_labels: Tensor | None, heads: AttributeHeads | None,
    only: Collection[str] | None = None,
) -> dict[str, Tensor]:
    """The attribute loss on the video and on the caption embedding, each on its own (over
    the labels named in `only`, or all)."""
    if attribute_labels is None or heads is None:
        raise ValueError("the attribute loss needs scene labels and attribute heads")
    return {
        "attributes_video": heads.loss(video.embedding, attribute_labels, only=only),
        "attributes_text": heads.loss(text.embedding, attribute_labels, text=True, only=only),
    }


def _token_attribute_loss(
    video: Encoding, frame_mask: Tensor | None, token_labels: Tensor | None, heads: AttributeHeads | None
) -> Tensor:
    """The dense heads' loss on the video input tokens (each patch's shape and motion)."""
    if token_labels is None or heads is None:
        raise ValueError("the token attribute loss needs dense scene labels and attribute heads")
    mask = frame_mask if frame_mask is not None else torch.ones(token_labels.shape[:2], dtype=torch.bool)
    return heads.token_loss(video.inputs, token_labels, mask.to(token_labels.device))
