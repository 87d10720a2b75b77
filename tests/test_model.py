"""The Perceiver-VL model: shapes, masks, LayerDrop, scoring streams, FLOPs, checkpoints."""

from __future__ import annotations

import pytest
import torch

from pvl_search.model.checkpoint import CheckpointError, load_model, save_model, weights_fingerprint
from pvl_search.model.config import ModelConfig, preset
from pvl_search.model.perceiver import PerceiverVL
from pvl_search.model.profiling import count_flops, profile_model
from pvl_search.model.tokenizer import Tokenizer

# Smaller than `tiny` so that each test runs in well under a second on 2 cores.
MICRO = preset("tiny").replace(hidden=64, heads=4, latents=8, frame_size=32, patch=8, frames=4, token_dim=16)
CONFIGS = {"micro": MICRO, "tiny": preset("tiny")}


def make_model(config: ModelConfig = MICRO, seed: int = 0) -> PerceiverVL:
    torch.manual_seed(seed)
    return PerceiverVL(config).eval()


def random_video(config: ModelConfig, batch: int = 2, frames: int | None = None, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    s = config.frame_size
    return torch.randn(batch, frames or config.frames, 3, s, s, generator=g)


def random_text(config: ModelConfig, batch: int = 2, length: int | None = None, seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 49000, (batch, config.text_length), generator=g)
    if length is not None:
        ids[:, length:] = 0
    return ids


@pytest.mark.parametrize("name", list(CONFIGS))
def test_shapes_and_finite(name: str) -> None:
    config = CONFIGS[name]
    model = make_model(config)
    with torch.no_grad():
        video = model.encode_video(random_video(config))
        text = model.encode_text(random_text(config, length=5))
        pair = model.single_stream_scores(random_video(config), None, random_text(config))
    assert video.latents.shape == (2, config.latents, config.hidden)
    assert text.latents.shape == (2, config.latents, config.hidden)
    assert video.embedding.shape == text.embedding.shape == (2, config.embed_dim)
    assert torch.allclose(video.embedding.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert pair.shape == (2,)
    for t in (video.latents, text.latents, pair):
        assert torch.isfinite(t).all()


def test_text_padding_does_not_change_real_tokens() -> None:
    model = make_model()
    ids = random_text(MICRO, batch=1, length=6)
    with torch.no_grad():
        padded = model.encode_text(ids).latents
        short = model.encode_text(ids[:, :6]).latents  # the same tokens with no padding at all
    assert torch.allclose(padded, short, atol=1e-5)


def test_missing_frames_do_not_change_real_frames() -> None:
    model = make_model()
    frames = random_video(MICRO, batch=1)
    mask = torch.tensor([[True, True, False, False]])
    other = frames.clone()
    other[:, 2:] = torch.randn_like(other[:, 2:]) * 5  # garbage where the frames are missing
    with torch.no_grad():
        a = model.encode_video(frames, mask).latents
        b = model.encode_video(other, mask).latents
        c = model.encode_video(frames[:, :2]).latents  # a 2-frame video
        unmasked = model.encode_video(other).latents
    assert torch.allclose(a, b, atol=1e-5)
    assert torch.allclose(a, c, atol=1e-5)
    assert not torch.allclose(a, unmasked, atol=1e-3)  # the mask is what made them equal


# The two input-context options, with the temporal convolution moved off its zero start.
MIXED = MICRO.replace(text_mixer_layers=1, temporal_kernel=3)


def make_mixed_model(seed: int = 0) -> PerceiverVL:
    model = make_model(MIXED, seed)
    with torch.no_grad():
        model.video_embed.temporal_mix.weight.normal_(0, 0.5)
    return model


def test_padding_and_missing_frames_stay_invisible_with_input_mixers() -> None:
    model = make_mixed_model()
    ids = random_text(MIXED, batch=1, length=6)
    frames = random_video(MIXED, batch=1)
    other = frames.clone()
    other[:, 2:] = torch.randn_like(other[:, 2:]) * 5
    mask = torch.tensor([[True, True, False, False]])
    with torch.no_grad():
        assert torch.allclose(model.encode_text(ids).latents, model.encode_text(ids[:, :6]).latents, atol=1e-5)
        a = model.encode_video(frames, mask).latents
        assert torch.allclose(a, model.encode_video(other, mask).latents, atol=1e-5)
        assert torch.allclose(a, model.encode_video(frames[:, :2]).latents, atol=1e-5)


def test_text_mixer_gives_each_word_its_neighbours() -> None:
    ids = random_text(MICRO, batch=1, length=6)
    changed = ids.clone()
    changed[0, 3] += 1  # another word right after position 2
    for config, depends in ((MICRO, False), (MIXED, True)):
        model = make_model(config)
        with torch.no_grad():
            a, _ = model.text_inputs(ids)
            b, _ = model.text_inputs(changed)
        assert torch.allclose(a[0, 2], b[0, 2]) is not depends


def test_temporal_kernel_sees_the_same_patch_in_the_previous_frame() -> None:
    frames = random_video(MIXED, batch=1)
    moved = frames.clone()
    moved[:, 1, :, :8, :8] += 1.0  # frame 1, first patch
    patches = MIXED.grid**2
    for model, depends in ((make_model(MICRO), False), (make_mixed_model(), True)):
        with torch.no_grad():
            a, _ = model.video_inputs(frames)
            b, _ = model.video_inputs(moved)
        assert torch.allclose(a[0, 2 * patches], b[0, 2 * patches]) is not depends  # frame 2, first patch
        assert torch.allclose(a[0, 2 * patches + 1], b[0, 2 * patches + 1])  # frame 2, another patch


def test_temporal_kernel_starts_as_the_papers_embedding() -> None:
    plain, mixed = make_model(MICRO), make_model(MICRO.replace(temporal_kernel=3))
    mixed.load_state_dict(plain.state_dict(), strict=False)
    frames = random_video(MICRO)
    with torch.no_grad():
        assert torch.allclose(plain.encode_video(frames).latents, mixed.encode_video(frames).latents, atol=1e-6)


def test_even_temporal_kernel_is_refused() -> None:
    with pytest.raises(ValueError, match="temporal_kernel"):
        MICRO.replace(temporal_kernel=2)


def test_image_is_a_one_frame_video() -> None:
    model = make_model()
    with torch.no_grad():
        out = model.encode_video(random_video(MICRO, frames=1))
    assert out.latents.shape == (2, MICRO.latents, MICRO.hidden)


def test_layerdrop_only_in_training_and_never_on_first() -> None:
    model = make_model(MICRO.replace(blocks=3, self_layers=1, layerdrop=0.5))
    assert all(model.encoder.active_cross_layers(None) for _ in range(20))  # eval: all kept
    assert model.encoder.active_cross_layers(2) == [True, True, False]
    model.train()
    torch.manual_seed(0)
    draws = [model.encoder.active_cross_layers(None) for _ in range(200)]
    assert all(d[0] for d in draws)
    assert any(not d[1] for d in draws) and any(d[1] for d in draws)
    assert any(not d[2] for d in draws) and any(d[2] for d in draws)


def test_layerdrop_one_equals_first_cross_layer_only() -> None:
    config = MICRO.replace(blocks=3, self_layers=1, layerdrop=1.0)
    model = make_model(config)
    frames = random_video(config)
    with torch.no_grad():
        first_only = model.encode_video(frames, cross_layers=1).latents
        full = model.encode_video(frames).latents
        model.train()
        dropped = model.encode_video(frames).latents
    assert torch.allclose(dropped, first_only, atol=1e-6)
    assert not torch.allclose(full, first_only, atol=1e-4)


def test_fewer_cross_layers_fewer_flops() -> None:
    config = MICRO.replace(blocks=3, self_layers=1)
    model = make_model(config).requires_grad_(False)
    frames = random_video(config, batch=1)
    flops = [count_flops(lambda c=c: model.encode_video(frames, cross_layers=c)) for c in (1, 2, 3)]
    assert flops[0] < flops[1] < flops[2]
    with pytest.raises(ValueError, match="cross_layers"):
        model.encode_video(frames, cross_layers=4)


def test_video_encoder_cost_is_linear_in_frames() -> None:
    config = preset("tiny").replace(max_frames=64)
    model = make_model(config).requires_grad_(False)
    flops = {f: count_flops(lambda f=f: model.encode_video(random_video(config, 1, frames=f))) for f in (8, 64)}
    assert flops[64] / flops[8] <= 8.5


def test_base_single_stream_matches_paper_gflops() -> None:
    rows = {row.name: row for row in profile_model(preset("base"), repeats=1, candidates=8)}
    assert rows["single-stream pair"].gflops == pytest.approx(43.9, rel=0.2)
    # The factorised reranker: >= 50x fewer FLOPs per candidate than the plain decoder.
    assert rows["mixed decoder, plain"].gflops / rows["mixed decoder, factorised"].gflops >= 50


@pytest.mark.parametrize("name", list(CONFIGS))
def test_factorised_mixed_stream_equals_plain_decoder(name: str) -> None:
    config = CONFIGS[name]
    model = make_model(config)
    # Make the decoder's attention peaked so that the test is not trivially flat.
    with torch.no_grad():
        model.decoder.block.attn.to_kv.weight.mul_(4)
        model.vtm_query.mul_(20)
        videos = model.encode_video(random_video(config, batch=5)).latents
        texts = model.encode_text(random_text(config, batch=3, length=7)).latents
        states_v = model.rerank_state(videos)
        states_t = model.rerank_state(texts)
        factorised = model.mixed_scores(states_t, states_v)  # (3, 5) in one call
        for q in range(3):
            plain = model.mixed_scores_plain(videos, texts[q : q + 1])
            assert torch.allclose(factorised[q], plain, atol=1e-4), (factorised[q], plain)
            assert torch.allclose(model.mixed_scores(states_t[q], states_v), plain, atol=1e-4)
    assert states_v.shape == (5, config.hidden + config.heads)


def test_factorised_state_honours_latent_mask() -> None:
    model = make_model()
    with torch.no_grad():
        videos = model.encode_video(random_video(MICRO, batch=2)).latents
        text = model.encode_text(random_text(MICRO, batch=1)).latents
        mask = torch.ones(2, MICRO.latents, dtype=torch.bool)
        mask[:, -3:] = False
        garbage = videos.clone()
        garbage[:, -3:] = 100.0
        state = model.rerank_state(garbage, mask)
        context = torch.cat([garbage, text.expand(2, -1, -1)], 1)
        context_mask = torch.cat([mask, torch.ones(2, MICRO.latents, dtype=torch.bool)], 1)
        plain = model.vtm_logits(context, context_mask)
        factorised = model.mixed_scores(model.rerank_state(text)[0], state)
    assert torch.allclose(factorised, plain, atol=1e-4)


def test_mixed_scoring_runs_no_encoder_pass_per_candidate() -> None:
    model = make_model()
    calls = []
    model.encoder.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        states = model.rerank_state(model.encode_video(random_video(MICRO, batch=16)).latents)
        calls.clear()
        query = model.rerank_state(model.encode_text(random_text(MICRO, batch=1)).latents)[0]
        scores = model.mixed_scores(query, states)
    assert scores.shape == (16,)
    assert len(calls) == 1  # the query's own encoding, nothing per candidate


def test_same_seed_same_outputs() -> None:
    a, b = make_model(seed=3), make_model(seed=3)
    frames = random_video(MICRO)
    with torch.no_grad():
        assert torch.equal(a.encode_video(frames).latents, b.encode_video(frames).latents)
        assert not torch.equal(a.encode_video(frames).latents, make_model(seed=4).encode_video(frames).latents)


def test_save_load_identical(tmp_path) -> None:
    model = make_model()
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    frames, ids = random_video(MICRO), random_text(MICRO, length=4)
    with torch.no_grad():
        assert torch.equal(model.encode_video(frames).latents, loaded.encode_video(frames).latents)
        pair = model.single_stream_scores(frames, None, ids)
        assert torch.equal(pair, loaded.single_stream_scores(frames, None, ids))
    assert loaded.config == MICRO
    assert len(weights_fingerprint(tmp_path / "m")) == 64


def test_float16_checkpoint_loads_close(tmp_path) -> None:
    model = make_model()
    save_model(model, tmp_path / "m16", dtype=torch.float16)
    loaded = load_model(tmp_path / "m16")
    frames = random_video(MICRO)
    with torch.no_grad():
        a, b = model.encode_video(frames).embedding, loaded.encode_video(frames).embedding
    assert torch.nn.functional.cosine_similarity(a, b).min() > 0.999


def test_truncated_weights_file_is_a_clear_error(tmp_path) -> None:
    save_model(make_model(), tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(tmp_path / "m")


def test_mismatched_config_names_the_tensor(tmp_path) -> None:
    save_model(make_model(), tmp_path / "m")
    MICRO.replace(latents=16).save(tmp_path / "m" / "config.json")
    wrong = r"tensor .encoder\.latent.*has shape \(8, 64\), the config needs \(16, 64\)"
    with pytest.raises(CheckpointError, match=wrong):
        load_model(tmp_path / "m")


def test_missing_folder_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="missing"):
        load_model(tmp_path / "nowhere")


def test_bfloat16_embeddings_agree_with_float32() -> None:
    model = make_model(preset("tiny"))
    frames = random_video(preset("tiny"))
    with torch.no_grad():
        full = model.encode_video(frames).embedding
        half = model.to(torch.bfloat16).encode_video(frames).embedding
    assert torch.nn.functional.cosine_similarity(full, half).min() > 0.99


def test_tokenizer_pads_and_truncates() -> None:
    tok = Tokenizer(8)
    ids = tok(["a red circle moves left then a blue square grows", "hi"])
    assert ids.shape == (2, 8)
    assert ids[0, 0] == tok.start_id and ids[0, -1] == tok.end_id
    assert ids[1, 2] == tok.end_id and (ids[1, 3:] == 0).all()
    assert tok.is_truncated("a red circle moves left then a blue square grows")
    assert not tok.is_truncated("hi")
