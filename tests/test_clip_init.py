"""CLIP initialisation: a small random open_clip ViT written to real files, copied into Perceiver-VL."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from pvl_search.model.config import ModelConfig, preset
from pvl_search.model.perceiver import PerceiverVL
from pvl_search.training.clip_init import (
    ClipInitError,
    InitReport,
    clip_shaped_names,
    copy_clip_visual,
    init_from_clip,
    parse_init_spec,
    resample_patch_kernel,
    trainable_parameters,
)

CLIP_NAME = "pvl-test-micro-vit"  # registered from a JSON file in a tmp folder
VISION_CFG = {"image_size": 32, "layers": 4, "width": 64, "head_width": 16, "patch_size": 8, "mlp_ratio": 4.0}
TEXT_CFG = {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
CLIP_CFG = {"embed_dim": 32, "vision_cfg": VISION_CFG, "text_cfg": TEXT_CFG}
# Same width, heads, frame size and patch as the CLIP above; 2 blocks x 2 = 4 self-attention layers.
MATCHING = preset("tiny").replace(
    hidden=64, heads=4, latents=8, blocks=2, self_layers=2, frame_size=32, patch=8, frames=2, token_dim=16
)


@dataclass
class ClipFiles:
    clip: nn.Module  # the reference model whose weights were written
    safetensors: Path
    pt: Path
    local_dir: Path


def randomise(clip: nn.Module, seed: int) -> nn.Module:
    """Random values everywhere, so that zero biases and unit norms cannot hide a wrong copy."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in clip.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return clip.eval()


def build_clip(seed: int = 0, **vision: object) -> nn.Module:
    return randomise(open_clip.CLIP(embed_dim=32, vision_cfg={**VISION_CFG, **vision}, text_cfg=TEXT_CFG), seed)


@pytest.fixture(scope="module")
def clip_files(tmp_path_factory: pytest.TempPathFactory) -> ClipFiles:
    root = tmp_path_factory.mktemp("clip")
    (root / "configs").mkdir()
    (root / "configs" / f"{CLIP_NAME}.json").write_text(json.dumps(CLIP_CFG))
    open_clip.add_model_config(root / "configs")
    clip = randomise(open_clip.create_model(CLIP_NAME), seed=0)
    state = {k: v.contiguous() for k, v in clip.state_dict().items()}
    save_file(state, str(root / "clip.safetensors"))
    torch.save(state, root / "clip.pt")
    local = root / "local"
    local.mkdir()
    (local / "open_clip_config.json").write_text(json.dumps({"model_cfg": CLIP_CFG, "preprocess_cfg": {}}))
    save_file(state, str(local / "open_clip_model.safetensors"))
    return ClipFiles(clip, root / "clip.safetensors", root / "clip.pt", local)


def make_model(config: ModelConfig = MATCHING, seed: int = 1) -> PerceiverVL:
    torch.manual_seed(seed)
    return PerceiverVL(config).eval()


def assert_blocks_agree(model: PerceiverVL, clip: nn.Module, count: int) -> None:
    """Our layer i and CLIP's block i give the same output on the same input."""
    x = torch.randn(2, 7, clip.visual.conv1.out_channels, generator=torch.Generator().manual_seed(3))
    assert clip.visual.transformer.batch_first
    with torch.no_grad():
        for i in range(count):
            ours, theirs = model.encoder.layers[i](x), clip.visual.transformer.resblocks[i](x)
            torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5, msg=f"block {i}")


# ---------------------------------------------------------------------------- copying


@pytest.mark.parametrize("source", ["safetensors", "pt", "local-dir"])
def test_copies_visual_tower_from_file(clip_files: ClipFiles, source: str) -> None:
    model = make_model()
    if source == "local-dir":
        report = init_from_clip(model, f"local-dir:{clip_files.local_dir}")
    else:
        report = init_from_clip(model, CLIP_NAME, getattr(clip_files, source))
    visual = clip_files.clip.visual
    assert (report.blocks_copied, report.clip_blocks, report.self_layers) == (4, 4, 4)
    assert report.resampled == []
    assert report.tensors_copied == len(report.copied) == 3 + 4 * 14
    assert sorted(report.copied) == sorted(clip_shaped_names(model))
    embed = model.video_embed
    torch.testing.assert_close(embed.patch_embed.weight, visual.conv1.weight, atol=0, rtol=0)
    assert torch.count_nonzero(embed.patch_embed.bias) == 0
    torch.testing.assert_close(embed.position, visual.positional_embedding[1:], atol=0, rtol=0)
    layer, block = model.encoder.layers[2], visual.transformer.resblocks[2]
    torch.testing.assert_close(layer.attn.to_q.weight, block.attn.in_proj_weight[:64], atol=0, rtol=0)
    torch.testing.assert_close(layer.attn.to_kv.bias, block.attn.in_proj_bias[64:], atol=0, rtol=0)
    assert_blocks_agree(model, clip_files.clip, 4)


def test_patch_tokens_match_clip_layout(clip_files: ClipFiles) -> None:
    """Patch embedding + positions give CLIP's pre-class-token sequence, in CLIP's patch order."""
    model = make_model()
    init_from_clip(model, CLIP_NAME, clip_files.safetensors)
    visual = clip_files.clip.visual
    image = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        theirs = visual.conv1(image).flatten(2).transpose(1, 2) + visual.positional_embedding[1:]
        ours = model.video_embed.patch_embed(image).flatten(2).transpose(1, 2) + model.video_embed.position
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
        encoding = model.encode_video(image[:, None].expand(2, 2, 3, 32, 32))
    assert torch.isfinite(encoding.embedding).all()


def test_positions_resampled_to_a_larger_grid(clip_files: ClipFiles) -> None:
    model = make_model(MATCHING.replace(frame_size=48))  # grid 6 against CLIP's 4
    report = init_from_clip(model, CLIP_NAME, clip_files.safetensors)
    assert model.video_embed.position.shape == (36, 64)
    assert any("positions 4x4 -> 6x6" in item for item in report.resampled)
    torch.testing.assert_close(model.video_embed.patch_embed.weight, clip_files.clip.visual.conv1.weight)

    # Layout: CLIP positions that vary only down the rows must still vary only down the rows.
    clip = build_clip()
    rows = torch.arange(4.0).repeat_interleave(4)[:, None] * torch.linspace(1, 2, 64)  # (16, 64)
    with torch.no_grad():
        clip.visual.positional_embedding[1:] = rows
    copy_clip_visual(model, clip)
    grid = model.video_embed.position.detach().view(6, 6, 64)
    torch.testing.assert_close(grid, grid[:, :1].expand(6, 6, 64))
    assert (grid[1:, 0] > grid[:-1, 0]).all()
    torch.testing.assert_close(grid[0, 0], rows[0], atol=0.3, rtol=0)


@pytest.mark.parametrize("patch", [16, 4])
def test_patch_kernel_resampled(clip_files: ClipFiles, patch: int) -> None:
    model = make_model(MATCHING.replace(patch=patch))
    report = init_from_clip(model, CLIP_NAME, clip_files.pt)
    kernel = clip_files.clip.visual.conv1.weight
    ours = model.video_embed.patch_embed.weight
    assert ours.shape == (64, 3, patch, patch)
    assert torch.isfinite(ours).all()
    assert any(f"patch kernel 8x8 -> {patch}x{patch}" in item for item in report.resampled)
    assert any(f"positions 4x4 -> {32 // patch}x{32 // patch}" in item for item in report.resampled)
    if patch > 8:
        # Growing the patch is exact: an 8x8 patch upsampled to ours gets CLIP's token.
        small = torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(5))
        large = F.interpolate(small, size=(patch, patch), mode="bicubic", align_corners=False)
        with torch.no_grad():
            expected = F.conv2d(small, kernel, stride=8)
            torch.testing.assert_close(F.conv2d(large, ours, stride=patch), expected, atol=1e-4, rtol=1e-4)


def test_resample_patch_kernel_same_size_is_a_copy() -> None:
    kernel = torch.randn(4, 3, 8, 8)
    torch.testing.assert_close(resample_patch_kernel(kernel, 8), kernel, atol=0, rtol=0)


def test_fewer_and_more_layers_than_clip_blocks(clip_files: ClipFiles) -> None:
    fewer = make_model(MATCHING.replace(blocks=1))  # 2 layers, CLIP has 4 blocks
    report = init_from_clip(fewer, CLIP_NAME, clip_files.safetensors)
    assert report.blocks_copied == 2
    assert any("CLIP blocks 2..3 unused" in note for note in report.notes)
    assert_blocks_agree(fewer, clip_files.clip, 2)

    more = make_model(MATCHING.replace(blocks=3))  # 6 layers
    fresh = copy.deepcopy(more.encoder.layers[4].state_dict())
    report = init_from_clip(more, CLIP_NAME, clip_files.safetensors)
    assert report.blocks_copied == 4
    assert any("layers 4..5 start fresh" in note for note in report.notes)
    for name, value in more.encoder.layers[4].state_dict().items():
        torch.testing.assert_close(value, fresh[name], atol=0, rtol=0)


def test_layer_scale_folded_into_projections() -> None:
    clip = build_clip(seed=6, ls_init_value=0.5)  # randomise() makes every gamma different
    model = make_model()
    report = copy_clip_visual(model, clip)
    assert any("LayerScale" in note for note in report.notes)
    assert_blocks_agree(model, clip, 4)


def test_quick_gelu_is_reported() -> None:
    clip = open_clip.CLIP(embed_dim=32, vision_cfg=VISION_CFG, text_cfg=TEXT_CFG, quick_gelu=True)
    report = copy_clip_visual(make_model(), randomise(clip, seed=7))
    assert any("QuickGELU" in note for note in report.notes)
    exact = copy_clip_visual(make_model(), build_clip())
    assert not any("GELU" in note for note in exact.notes)


# ---------------------------------------------------------------------------- errors


def test_width_and_heads_mismatch_are_clear(clip_files: ClipFiles) -> None:
    with pytest.raises(ClipInitError, match=r"CLIP width 64 with 4 heads .* hidden 96 and 4 heads"):
        init_from_clip(make_model(MATCHING.replace(hidden=96)), CLIP_NAME, clip_files.safetensors)
    with pytest.raises(ClipInitError, match=r"CLIP width 64 with 4 heads .* hidden 64 and 8 heads"):
        copy_clip_visual(make_model(MATCHING.replace(heads=8)), clip_files.clip)
    with pytest.raises(ClipInitError, match=r"MLP width 256 differs from ours 128"):
        copy_clip_visual(make_model(MATCHING.replace(mlp_ratio=2.0)), clip_files.clip)


def test_bad_sources_are_clear(clip_files: ClipFiles, tmp_path: Path) -> None:
    model = make_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(ClipInitError, match="nope.safetensors: CLIP weights file not found"):
        init_from_clip(model, CLIP_NAME, missing)
    with pytest.raises(ClipInitError, match="a CLIP weights file is needed"):
        init_from_clip(model, CLIP_NAME)
    with pytest.raises(ClipInitError, match="unknown open_clip model 'no-such-vit'"):
        init_from_clip(model, "no-such-vit", clip_files.safetensors)
    with pytest.raises(ClipInitError, match="open_clip_config.json: missing"):
        init_from_clip(model, f"local-dir:{tmp_path}")
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": CLIP_CFG}))
    with pytest.raises(ClipInitError, match="no CLIP weights"):
        init_from_clip(model, f"local-dir:{tmp_path}")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    with pytest.raises(ClipInitError, match="garbage.safetensors.*cannot load CLIP weights"):
        init_from_clip(model, CLIP_NAME, garbage)
    other = tmp_path / "other.safetensors"
    save_file({"visual.conv1.weight": torch.zeros(64, 3, 8, 8)}, str(other))
    with pytest.raises(ClipInitError, match="other.safetensors.*cannot load CLIP weights"):
        init_from_clip(model, CLIP_NAME, other)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


@pytest.mark.filterwarnings("ignore:.*torch.jit:FutureWarning", "ignore:.*TorchScript archive:UserWarning")
def test_torchscript_archive_is_refused_with_a_hint(clip_files: ClipFiles, tmp_path: Path) -> None:
    scripted = tmp_path / "openai.pt"  # OpenAI's original weights are TorchScript archives
    torch.jit.save(torch.jit.script(nn.Linear(2, 2)), str(scripted))
    with pytest.raises(ClipInitError, match="openai.pt.*TorchScript archive .* use open_clip's state-dict weights"):
        init_from_clip(make_model(), CLIP_NAME, scripted)


def test_parse_init_spec() -> None:
    assert parse_init_spec("clip:ViT-B-16:/models/clip.safetensors") == ("ViT-B-16", Path("/models/clip.safetensors"))
    assert parse_init_spec("clip:ViT-B-16:C:/weights/a:b.pt") == ("ViT-B-16", Path("C:/weights/a:b.pt"))
    assert parse_init_spec("clip:local-dir:/models/my-vit") == ("local-dir:/models/my-vit", None)
    for bad in ["ViT-B-16:/x.pt", "clip:ViT-B-16", "clip::/x.pt", "clip:ViT-B-16:", "vit:ViT-B-16:/x.pt", ""]:
        with pytest.raises(ClipInitError, match="malformed init spec"):
            parse_init_spec(bad)
    with pytest.raises(ClipInitError, match="hf-hub needs the network"):
        parse_init_spec("clip:hf-hub:timm/vit")


# ---------------------------------------------------------------------------- two-stage training


def test_trainable_parameters_exclude_exactly_the_copied(clip_files: ClipFiles) -> None:
    model = make_model(MATCHING.replace(blocks=3))  # 6 layers, 4 filled from CLIP
    report = init_from_clip(model, CLIP_NAME, clip_files.safetensors)
    names = {id(p): n for n, p in model.named_parameters()}
    cross = {names[id(p)] for p in trainable_parameters(model, "cross", copied=report)}
    assert cross.isdisjoint(report.copied)
    assert cross | set(report.copied) == set(names.values())
    assert {"encoder.cross.0.attn.to_q.weight", "encoder.latents", "modality", "encoder.layers.4.norm1.weight"} <= cross
    assert "encoder.layers.3.mlp.fc1.weight" not in cross

    # Without a report (e.g. resuming stage one) every CLIP-shaped tensor counts as copied.
    default = {names[id(p)] for p in trainable_parameters(model, "cross")}
    assert default == cross - {n for n in cross if n.startswith("encoder.layers.")}
    assert len(trainable_parameters(model, "all")) == len(names)
    with pytest.raises(ValueError, match="only must be 'cross' or 'all'"):
        trainable_parameters(model, "self")
    with pytest.raises(ValueError, match="not parameters of this model"):
        trainable_parameters(model, "cross", copied=["visual.conv1.weight"])


def test_report_summary_names_the_source(clip_files: ClipFiles) -> None:
    report = init_from_clip(make_model(), CLIP_NAME, clip_files.safetensors)
    assert isinstance(report, InitReport)
    assert str(clip_files.safetensors) in report.summary()
    assert "4 of 4 CLIP blocks" in report.summary()
