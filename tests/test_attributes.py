"""Scene labels, attribute heads, linear probes and the latent reranker."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pvl_search.data.pairs import FrameCache, PairSet
from pvl_search.data.scene_labels import (
    LABEL_NAMES,
    LABELS,
    ORDER_LABELS,
    SHAPE_MOTION_LABELS,
    TEXT_LABELS,
    scene_labels,
)
from pvl_search.data.synth import binding_swapped, group_variants, order_swapped, sample_scene
from pvl_search.model.config import preset
from pvl_search.model.perceiver import PerceiverVL
from pvl_search.model.tokenizer import Tokenizer
from pvl_search.training.attribute_heads import AttributeHeads
from pvl_search.training.losses import LossWeights, compute_losses
from pvl_search.training.probes import fit_probe, probe_features, run_probes

CONFIG = preset("tiny").replace(hidden=64, heads=4, latents=8, frame_size=32, patch=8, frames=4, token_dim=16,
                                layerdrop=0.0, embed_dim=32)


def label(scene, name: str) -> int:
    return int(scene_labels(scene)[LABEL_NAMES.index(name)])


def test_labels_follow_time_and_tell_every_twin_apart() -> None:
    rng = np.random.default_rng(3)
    for _ in range(20):
        base = sample_scene(rng, 24)
        variants = group_variants(base)
        rows = {name: tuple(scene_labels(scene)) for name, scene in variants.items()}
        assert len(set(rows.values())) == 4  # slot labels alone separate the four twins
        swapped = order_swapped(base)
        # The first slot of the order twin is the second slot of the base scene.
        for attr in ("colour", "shape", "size", "motion"):
            assert label(swapped, f"first_{attr}") == label(base, f"second_{attr}")
        assert label(swapped, "order") != label(base, "order")
        assert label(swapped, "binding") == label(base, "binding")
        assert label(binding_swapped(base), "binding") != label(base, "binding")
        assert label(binding_swapped(base), "order") != label(base, "order")  # the lead colour swaps actor


def test_attribute_heads_ignore_size_for_text() -> None:
    heads = AttributeHeads(16)
    embedding = torch.nn.functional.normalize(torch.randn(5, 16), dim=-1)
    labels = torch.stack([torch.as_tensor(scene_labels(sample_scene(np.random.default_rng(i), 24)))
                          for i in range(5)])
    assert [t.shape[1] for t in heads(embedding)] == [spec.classes for spec in LABELS]
    # Changing only the size labels changes the video loss, never the text loss.
    other = labels.clone()
    for i, name in enumerate(LABEL_NAMES):
        if name.endswith("_size"):
            other[:, i] = 1 - other[:, i]
    assert heads.loss(embedding, labels, text=True) == heads.loss(embedding, other, text=True)
    assert heads.loss(embedding, labels) != heads.loss(embedding, other)
    assert "first_size" not in TEXT_LABELS and "first_shape" in TEXT_LABELS
    # The order loss reads the time-slot labels and `order` only: changing anything else
    # (here every colour-keyed label) leaves it unchanged.
    assert set(ORDER_LABELS) == {f"{slot}_{a}" for slot in ("first", "second")
                                 for a in ("colour", "shape", "size", "motion")} | {"order"}
    keyed = labels.clone()
    for i, name in enumerate(LABEL_NAMES):
        if name not in ORDER_LABELS:
            keyed[:, i] = 0
    assert heads.loss(embedding, labels, only=ORDER_LABELS) == heads.loss(embedding, keyed, only=ORDER_LABELS)
    assert heads.loss(embedding, labels) != heads.loss(embedding, keyed)
    # The shape-and-motion loss reads exactly the shape and motion labels.
    assert set(SHAPE_MOTION_LABELS) == {n for n in LABEL_NAMES if n.endswith(("_shape", "_motion"))}
    looks = labels.clone()
    for i, name in enumerate(LABEL_NAMES):
        if name not in SHAPE_MOTION_LABELS:
            looks[:, i] = 0
    assert (heads.loss(embedding, labels, only=SHAPE_MOTION_LABELS)
            == heads.loss(embedding, looks, only=SHAPE_MOTION_LABELS))
    assert heads.loss(embedding, labels) != heads.loss(embedding, looks)


def labelled_pairs(n: int = 16) -> PairSet:
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 255, (n, CONFIG.frames, 32, 32, 3), dtype=np.uint8)
    keys = [f"v{i}" for i in range(n)]
    cache = FrameCache(frames, np.ones((n, CONFIG.frames), dtype=bool), keys)
    scenes = [sample_scene(np.random.default_rng(i), 24) for i in range(n)]
    captions = {k: [f"caption {i}", f"other caption {i}"] for i, k in enumerate(keys)}
    return PairSet(cache, captions, Tokenizer(CONFIG.text_length),
                   labels={k: scene_labels(s) for k, s in zip(keys, scenes)})


def test_attribute_loss_trains_both_towers() -> None:
    torch.manual_seed(0)
    model, pairs = PerceiverVL(CONFIG), labelled_pairs(8)
    heads = AttributeHeads(CONFIG.embed_dim)
    frames, masks, ids = pairs.batch(range(8), torch.Generator().manual_seed(0))
    out = compute_losses(model, frames, masks, ids, LossWeights(contrastive=0, mixed_vtm=0, attributes=1),
                         attribute_labels=pairs.labels_of(range(8)), heads=heads)
    out.total.backward()
    assert set(out.parts) == {"attributes", "attributes_video", "attributes_text"}
    assert model.video_embed.position.grad.abs().sum() > 0 and model.text_embed.position.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="scene labels"):
        compute_losses(model, frames, masks, ids, LossWeights(attributes=1))
    model.zero_grad()
    out = compute_losses(model, frames, masks, ids, LossWeights(contrastive=0, mixed_vtm=0, order_attributes=1),
                         attribute_labels=pairs.labels_of(range(8)), heads=heads)
    out.total.backward()
    assert "order_attributes" in out.parts and model.text_embed.position.grad.abs().sum() > 0
    model.zero_grad()
    out = compute_losses(model, frames, masks, ids,
                         LossWeights(contrastive=0, mixed_vtm=0, shape_motion_attributes=1),
                         attribute_labels=pairs.labels_of(range(8)), heads=heads)
    out.total.backward()
    assert "shape_motion_attributes" in out.parts and model.video_embed.position.grad.abs().sum() > 0
    # The video-only shape objective: its own classifier, the video tower alone.
    model.zero_grad()
    own = AttributeHeads(CONFIG.embed_dim, video_only=True)
    out = compute_losses(model, frames, masks, ids, LossWeights(contrastive=0, mixed_vtm=0, video_shape_attributes=1),
                         attribute_labels=pairs.labels_of(range(8)), heads=own)
    out.total.backward()
    assert set(out.parts) == {"video_shape_attributes"} and own.video_linear.weight.grad.abs().sum() > 0
    assert own.linear.weight.grad is None and model.text_embed.position.grad is None
    assert model.video_embed.position.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="video-only"):
        heads.video_loss(torch.zeros(2, CONFIG.embed_dim), pairs.labels_of(range(2)), only=("lead_shape",))


def test_probe_recovers_a_linear_label_and_not_noise() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 8))
    y = (x[:, 0] + 0.3 * x[:, 1] > 0).astype(np.int64)
    assert fit_probe(x[:300], y[:300], x[300:], y[300:], 2) > 0.95
    noise = rng.integers(0, 5, 400)
    assert fit_probe(x[:300], noise[:300], x[300:], noise[300:], 5) < 0.4


def test_probes_run_on_a_tiny_model() -> None:
    torch.manual_seed(0)
    model = PerceiverVL(CONFIG)
    pairs = labelled_pairs(16)
    features = probe_features(model, pairs)
    assert features.features["video_embedding"].shape == (16, CONFIG.embed_dim)
    assert features.features["text_latents"].shape == (32, CONFIG.hidden)  # two captions a video
    report = run_probes(features, features)
    assert set(report) == {"video_embedding", "video_latents", "text_embedding", "text_latents", "chance"}
    for row in list(report.values())[:4]:
        assert set(LABEL_NAMES) <= set(row) and {"colour", "shape", "size", "motion"} <= set(row)
        assert all(0.0 <= v <= 1.0 for v in row.values())


def test_latent_reranker_batched_scores_equal_one_at_a_time() -> None:
    torch.manual_seed(0)
    model = PerceiverVL(CONFIG.replace(latent_reranker=True)).eval()
    text, video = torch.randn(3, 8, 64), torch.randn(5, 8, 64)
    batched = model.latent_scores(text, video)
    single = torch.tensor([[float(model.latent_scores(text[i : i + 1], video[j : j + 1])) for j in range(5)]
                           for i in range(3)])
    assert batched.shape == (3, 5)
    assert torch.allclose(batched, single, atol=1e-5)
    with pytest.raises(ValueError, match="no latent reranker"):
        PerceiverVL(CONFIG).latent_scores(text, video)


# ---------------------------------------------------------------------------- scene stream

from pvl_search.data.scene_stream import SceneStream, StreamSpec, group_scenes, read_chunk, write_chunk  # noqa: E402
from pvl_search.data.synth import heldout_combinations  # noqa: E402

SPEC = StreamSpec(seed=3, heldout_seed=0, groups_per_chunk=2, size=48, fps=8, seconds=1.5, model_frames=4,
                  model_size=32)


def test_stream_never_repeats_and_keeps_heldout_triples_out() -> None:
    spec = StreamSpec(seed=3, heldout_seed=0)
    heldout = heldout_combinations(0)
    seen = set()
    for g in range(300):
        for scene in group_scenes(spec, g).values():
            assert not scene.triples() & heldout
            key = repr(scene.to_dict())
            assert key not in seen
            seen.add(key)
    assert len(seen) == 1200


def test_stream_chunks_are_deterministic_real_videos(tmp_path) -> None:
    a = read_chunk(write_chunk(tmp_path / "a", SPEC, 1).parent, SPEC, 1, Tokenizer(CONFIG.text_length))
    b = read_chunk(write_chunk(tmp_path / "b", SPEC, 1).parent, SPEC, 1, Tokenizer(CONFIG.text_length))
    assert len(a) == 8 and a.keys == b.keys and a.captions == b.captions
    assert np.array_equal(np.asarray(a.cache.frames), np.asarray(b.cache.frames))
    assert torch.equal(a.labels, b.labels)
    assert a.keys[0] == "stream00000002_base" and len(set(a.groups)) == 2
    # Decoded frames show the scene: not a flat image, and all frames real.
    assert np.asarray(a.cache.frames).std() > 10 and a.cache.masks.all()
    other = StreamSpec(**{**SPEC.__dict__, "seed": 4})
    with pytest.raises(ValueError, match="another stream"):
        read_chunk(tmp_path / "a", other, 1, Tokenizer(CONFIG.text_length))


def test_stream_must_not_share_the_evaluation_seed(tmp_path) -> None:
    with pytest.raises(ValueError, match="differ"):
        SceneStream(tmp_path, StreamSpec(seed=0, heldout_seed=0), 24)


def test_training_on_a_stream_resumes_exactly(tmp_path) -> None:
    from pvl_search.training.loop import TrainConfig, train

    class Interrupted(Exception):
        pass

    def stop_at_step_6(event: dict) -> None:
        if event["kind"] == "step" and event["step"] == 6:
            raise Interrupted

    def run(out, resume: bool = False, progress=None) -> PerceiverVL:
        torch.manual_seed(0)
        model = PerceiverVL(CONFIG)
        stream = SceneStream(tmp_path / "stream", SPEC, CONFIG.text_length, passes=2, keep=100)
        cfg = TrainConfig(epochs=4, batch_size=4, warmup_steps=2, lr=1e-3, checkpoint_every=5,
                          losses=LossWeights(mixed_nce=1, attributes=1))
        train(model, stream, labelled_pairs(8), cfg, out, resume=resume, progress=progress)
        return model

    straight = run(tmp_path / "straight")  # 2 steps an epoch; chunks 0, 0, 1, 1
    assert sorted(p.name for p in (tmp_path / "stream").glob("chunk-*")) == ["chunk-000000", "chunk-000001"]
    with pytest.raises(Interrupted):  # killed in epoch 3 (chunk 1), after the step-5 checkpoint
        run(tmp_path / "split", progress=stop_at_step_6)
    resumed = run(tmp_path / "split", resume=True)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name
    assert (tmp_path / "split" / "last" / "attribute_heads.safetensors").exists()


def test_token_labels_mark_the_patches_each_object_covers() -> None:
    from pvl_search.data.scene_labels import TOKEN_BACKGROUND, TOKEN_STATIC, token_labels
    from pvl_search.data.synth import MOTIONS, SHAPES, object_state
    from pvl_search.media.decoders import sample_positions

    scene = sample_scene(np.random.default_rng(1), 24)
    labels = token_labels(scene, 8, 64, 8)  # (frames, 64 patches, 2)
    assert labels.shape == (8, 64, 2)
    for f, t in enumerate(sample_positions(24, 8)):
        for i, obj in enumerate(scene.objects):
            st = object_state(scene, i, int(t))
            if not st.visible:
                continue
            # The patch under the object's centre shows its shape (a ring's hole may not).
            cell = int(st.y * 8) * 8 + int(st.x * 8)
            if obj.shape != "ring":
                assert labels[f, cell, 0] == SHAPES.index(obj.shape)
            event = next((e for e in scene.events if e.obj == i), None)
            acting = event is not None and event.start <= t <= event.end
            if labels[f, cell, 0] != TOKEN_BACKGROUND:
                assert labels[f, cell, 1] == (MOTIONS.index(event.motion) if acting else TOKEN_STATIC)
    assert (labels[..., 0] == TOKEN_BACKGROUND).mean() > 0.5  # most of the frame is background
    assert (labels[..., 1] != TOKEN_STATIC).any()  # some patch is seen mid-event


def test_stream_writer_exits_when_its_trainer_is_killed(tmp_path) -> None:
    """A trainer killed by a signal runs no clean-up: its writer must notice and stop."""
    import os
    import signal
    import subprocess
    import sys
    import time

    script = (
        "import sys, time\n"
        "from pvl_search.data.scene_stream import SceneStream, StreamSpec\n"
        f"spec = StreamSpec(seed=3, heldout_seed=0, groups_per_chunk=64, size=48, fps=8, seconds=1.5,"
        f" model_frames=4, model_size=32)\n"
        f"stream = SceneStream({str(tmp_path)!r}, spec, 24)\n"
        "stream.start(0, 100)\n"
        "print(stream._writer.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    trainer = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    writer = int(trainer.stdout.readline())
    os.kill(trainer.pid, signal.SIGKILL)
    trainer.wait()
    for _ in range(900):  # it checks between scene groups (after starting up)
        try:
            os.kill(writer, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.kill(writer, signal.SIGKILL)
        pytest.fail("the stream writer outlived its trainer")
    assert not list(tmp_path.glob("chunk-*"))  # the chunk it was writing is dropped, not half-made


def test_curriculum_trains_attributes_alone_first(tmp_path) -> None:
    import json

    from pvl_search.training.loop import TrainConfig, train

    torch.manual_seed(0)
    pairs = labelled_pairs(8)
    cfg = TrainConfig(epochs=2, batch_size=4, warmup_steps=1, retrieval_from=1,
                      losses=LossWeights(mixed_nce=1, attributes=1))
    train(PerceiverVL(CONFIG), pairs, pairs, cfg, tmp_path / "run")
    steps = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "step"]
    assert [("contrastive" in s, "attributes" in s) for s in steps] == [(False, True)] * 2 + [(True, True)] * 2
    assert "mixed_nce" in steps[-1] and "mixed_nce" not in steps[0]
    with pytest.raises(ValueError, match="curriculum"):
        train(PerceiverVL(CONFIG), pairs, pairs, TrainConfig(epochs=1, batch_size=4, retrieval_from=1), tmp_path / "x")
