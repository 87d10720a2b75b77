"""The shape readouts (pvl_search.experiments.shape_readout) on rendered synthetic scenes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pvl_search.data.pairs import FrameCache, PairSet
from pvl_search.data.scene_labels import TOKEN_BACKGROUND, label_maps
from pvl_search.data.synth import render_scene, sample_scene
from pvl_search.experiments.shape_readout import (
    SHAPE_LABELS,
    StemReadout,
    VideoTowerReadout,
    majority_baseline,
    shape_accuracy,
    token_shape_probe,
    train_readout,
)
from pvl_search.media.decoders import sample_positions
from pvl_search.model.config import preset
from pvl_search.model.perceiver import PerceiverVL
from pvl_search.model.tokenizer import Tokenizer

CONFIG = preset("tiny").replace(hidden=32, heads=4, latents=8, frame_size=32, patch=8, frames=4, token_dim=16,
                                embed_dim=16, layerdrop=0.0, conv_stem=8)


def rendered(n: int, seed: int) -> PairSet:
    """`n` synthetic scenes rendered at the model's size, with scene and patch labels."""
    scenes = {f"s{seed}-{i}": sample_scene(np.random.default_rng([seed, i]), 24) for i in range(n)}
    frames = np.stack([render_scene(s, CONFIG.frame_size)[sample_positions(24, CONFIG.frames)]
                       for s in scenes.values()])
    cache = FrameCache(frames, np.ones(frames.shape[:2], dtype=bool), list(scenes))
    labels, dense = label_maps({k: s.to_dict() for k, s in scenes.items()}, CONFIG.frames, CONFIG.frame_size,
                               CONFIG.patch)
    return PairSet(cache, {k: ["a caption"] for k in scenes}, Tokenizer(CONFIG.text_length),
                   labels=labels, token_labels=dense)


def test_shape_labels_are_per_actor_and_per_colour() -> None:
    assert SHAPE_LABELS[:2] == ("lead_shape", "other_shape") and "red_shape" in SHAPE_LABELS
    assert not any(name.startswith(("first", "second")) for name in SHAPE_LABELS)  # no event order needed


def test_token_probe_reads_every_object_covered_token() -> None:
    torch.manual_seed(0)
    train, test = rendered(12, 1), rendered(6, 2)
    result = token_shape_probe(PerceiverVL(CONFIG), train, test)
    covered = int((test.token_labels[..., 0] != TOKEN_BACKGROUND).sum())
    assert result["test_tokens"] == covered > 0
    shapes = test.token_labels[..., 0][test.token_labels[..., 0] != TOKEN_BACKGROUND]
    assert result["majority"] == pytest.approx(float(torch.bincount(shapes.long()).max()) / covered)
    assert 0 <= result["token"] <= 1 and 0 <= result["neighbourhood"] <= 1
    with pytest.raises(ValueError, match="patch labels"):
        token_shape_probe(PerceiverVL(CONFIG), PairSet(train.cache, {"s1-0": ["c"]}, Tokenizer(24)), test)


@pytest.mark.parametrize("kind", ["stem", "tower"])
def test_readouts_learn_the_shapes_they_are_trained_on(kind: str) -> None:
    """Scored on their own training videos, both readouts must get well past always answering
    the most frequent shape: the loss, the labels and the readout agree."""
    torch.manual_seed(0)
    data = rendered(16, 3)
    readout = StemReadout(CONFIG) if kind == "stem" else VideoTowerReadout(PerceiverVL(CONFIG))
    before = shape_accuracy(readout, data)
    curve = train_readout(readout, data, data, steps=300, lr=3e-3, batch_size=8, every=100)
    assert [point["step"] for point in curve] == [100, 200, 300]
    chance = majority_baseline(data)
    assert curve[-1]["actor_shape"] >= max(before["actor_shape"], chance["actor_shape"]) + 0.3
    assert curve[-1]["colour_shape"] > chance["colour_shape"]
