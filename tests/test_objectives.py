"""Training objectives reach every parameter, and a tiny model can overfit a few pairs."""

from __future__ import annotations

import torch

from pvl_search.model.config import preset
from pvl_search.model.perceiver import PerceiverVL
from pvl_search.training.losses import LossWeights, compute_losses, contrastive_loss, hard_negatives, mlm_mask

CONFIG = preset("tiny").replace(
    hidden=96, heads=4, latents=16, frame_size=32, patch=8, frames=4, token_dim=32, layerdrop=0.5
)
ALL_LOSSES = LossWeights(contrastive=1, mixed_vtm=1, mixed_nce=0.5, single_vtm=0.5, mlm=0.2)


def random_pairs(n: int = 8, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    frames = torch.randn(n, CONFIG.frames, 3, CONFIG.frame_size, CONFIG.frame_size, generator=g)
    ids = torch.randint(1, 49000, (n, CONFIG.text_length), generator=g)
    ids[:, 0], ids[:, 9], ids[:, 10:] = 49406, 49407, 0  # <start> 8 words <end> padding
    return frames, ids


def retrieval_accuracy(model: PerceiverVL, frames: torch.Tensor, ids: torch.Tensor) -> tuple[float, float]:
    """Share of captions whose own video scores highest: multi-stream, mixed-stream."""
    model.eval()
    with torch.no_grad():
        video, text = model.encode_video(frames), model.encode_text(ids)
        multi = text.embedding @ video.embedding.T
        mixed = model.mixed_scores(model.rerank_state(text.latents), model.rerank_state(video.latents))
    target = torch.arange(len(ids))
    return (multi.argmax(1) == target).float().mean().item(), (mixed.argmax(1) == target).float().mean().item()


def test_gradients_reach_every_parameter() -> None:
    torch.manual_seed(0)
    model = PerceiverVL(CONFIG.replace(layerdrop=0.0)).train()
    frames, ids = random_pairs()
    groups = torch.tensor([0, 0, 1, 1, 2, 3, 4, 5])  # two pairs of twins
    compute_losses(model, frames, None, ids, ALL_LOSSES, groups=groups).total.backward()
    dead = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert dead == []


def test_hard_negatives_follow_the_similarities_and_skip_the_positive() -> None:
    logits = torch.tensor([[9.0, 8.0, 1.0], [2.0, 9.0, 7.0], [9.5, 1.0, 3.0]]) * 2
    g = torch.Generator().manual_seed(0)
    draws = [hard_negatives(logits, g) for _ in range(200)]
    per_text = torch.stack([d[0] for d in draws])
    per_video = torch.stack([d[1] for d in draws])
    assert not (per_text == torch.arange(3)).any() and not (per_video == torch.arange(3)).any()
    # the most similar other is drawn most of the time, the others sometimes
    assert (per_text[:, 0] == 1).float().mean() > 0.9 and (per_text[:, 1] == 2).float().mean() > 0.9
    assert (per_video[:, 0] == 2).float().mean() > 0.9
    flat = torch.tensor([[0.0, 0.0, 0.0]] * 3)
    spread = torch.stack([hard_negatives(flat, g)[0] for _ in range(300)])
    assert (spread[:, 0] == 1).any() and (spread[:, 0] == 2).any()


def test_contrastive_loss_ignores_same_group_pairs_only() -> None:
    logits = torch.randn(4, 4, generator=torch.Generator().manual_seed(0))
    groups = torch.tensor([0, 0, 1, 2])
    same = groups[:, None] == groups[None, :]
    changed = logits.clone()
    changed[0, 1] = changed[1, 0] = 50.0  # a twin that would dominate the softmax
    assert contrastive_loss(changed, ignore=same) == contrastive_loss(logits, ignore=same)
    assert contrastive_loss(changed) > contrastive_loss(logits) + 10
    # the diagonal is never ignored, and other groups still count as negatives
    assert torch.isfinite(contrastive_loss(logits, ignore=torch.ones(4, 4, dtype=torch.bool)))
    changed[2, 3] = 50.0
    assert contrastive_loss(changed, ignore=same) > contrastive_loss(logits, ignore=same) + 10


def test_mlm_mask_only_hides_words() -> None:
    _, ids = random_pairs()
    masked = mlm_mask(ids, 0.5, torch.Generator().manual_seed(0))
    assert masked.any(1).all()  # at least one per caption
    assert not masked[:, 0].any() and not masked[:, 9:].any()  # never <start>, <end>, padding


def test_tiny_model_overfits_eight_pairs_with_both_scores() -> None:
    torch.manual_seed(0)
    model = PerceiverVL(CONFIG)
    frames, ids = random_pairs()
    assert retrieval_accuracy(model, frames, ids) != (1.0, 1.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    accuracy = (0.0, 0.0)
    for step in range(1, 401):
        model.train()
        loss = compute_losses(model, frames, None, ids, ALL_LOSSES).total
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 25 == 0:
            accuracy = retrieval_accuracy(model, frames, ids)
            if accuracy == (1.0, 1.0):
                break
    assert accuracy == (1.0, 1.0), f"after {step} steps: multi {accuracy[0]:.2f}, mixed {accuracy[1]:.2f}"
