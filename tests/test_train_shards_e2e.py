"""Training on your own captioned videos, end to end as a user runs it (issue #26): an MSR-VTT
style captions file of a few real synthetic MP4 clips -> `pvl-search shards` -> a 2-worker
`train` on a real local Ray Train -> `index` -> `search` -> `eval`. And CLIP initialisation
in the data-parallel path, from a local open_clip folder written by the test."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import open_clip
import pytest
import torch
from index_helpers import cli
from safetensors.torch import save_file

from pvl_search.data.captions import load_captions
from pvl_search.data.synth import generate_corpus
from pvl_search.model.checkpoint import load_model
from pvl_search.model.perceiver import PerceiverVL
from pvl_search.shards.writer import write_shards
from pvl_search.training.loop import TrainConfig
from pvl_search.training.ray_train import RayTrainOptions
from pvl_search.training.shard_loop import ShardTrainOptions
from pvl_search.training.shard_recipe import train_from_shards

pytest.importorskip("ray.train.torch")

MSRVTT_SPLITS = {"train": "train", "val": "validate", "test": "test"}


def msrvtt_corpus(root: Path) -> Path:
    """Synthetic clips laid out as an MSR-VTT download: video/<id>.mp4 and one JSON of
    videos (with MSR-VTT's split names) and sentences."""
    generate_corpus(root / "synth", 24, seed=12, size=64, fps=8, seconds=1.5, workers=1, splits=(0.5, 0.17, 0.33))
    records = load_captions(root / "synth" / "captions.json")
    (root / "msrvtt" / "video").mkdir(parents=True)
    videos, sentences = [], []
    for i, record in enumerate(records):
        video_id = f"video{i}"
        shutil.copy(record.path, root / "msrvtt" / "video" / f"{video_id}.mp4")
        videos.append({"video_id": video_id, "split": MSRVTT_SPLITS[record.split], "category": 0})
        sentences += [{"video_id": video_id, "caption": text} for text in record.captions]
    path = root / "msrvtt" / "train_val_test.json"
    path.write_text(json.dumps({"videos": videos, "sentences": sentences}))
    return path


def test_msrvtt_captions_to_shards_to_two_workers_to_search(tmp_path: Path) -> None:
    captions = msrvtt_corpus(tmp_path)
    shards, run, index = tmp_path / "shards", tmp_path / "run", tmp_path / "index"

    made = cli("shards", str(captions), "--out", str(shards), "--samples-per-shard", "4", "--json")
    assert made.returncode == 0, made.stderr
    report = json.loads(made.stdout)
    assert report["splits"]["train"]["samples"] == 12 and report["splits"]["val"]["samples"] == 4

    trained = cli("train", "--shards", str(shards), "--out", str(run), "--workers", "2", "--epochs", "2",
                  "--batch-size", "3", "--loader-workers", "1", "--json")
    assert trained.returncode == 0, trained.stderr
    summary = json.loads(trained.stdout.strip().splitlines()[-1])
    assert (summary["train_videos"], summary["val_videos"], summary["steps"]) == (12, 4, 4)  # 6 per worker / 3
    assert 0 <= summary["best_val_r1"] <= 100 and (run / "best" / "model.safetensors").is_file()
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert {r["workers"] for r in log if r["kind"] == "step"} == {2}

    videos = captions.parent / "video"
    indexed = cli("index", str(videos), "--index", str(index), "--model", str(run / "best"), "--json")
    assert indexed.returncode == 0, indexed.stderr
    query = load_captions(captions)[0].captions[0]
    found = cli("search", query, "--index", str(index), "--model", str(run / "best"), "-k", "3", "--json")
    assert found.returncode == 0, found.stderr
    hits = [json.loads(line) for line in found.stdout.splitlines() if line.strip()]
    assert len(hits) == 3 and all(Path(h["path"]).parent == videos for h in hits)
    scored = cli("eval", "--captions", str(captions), "--index", str(index), "--model", str(run / "best"),
                 "--split", "test", "--rerank-k", "4", "--no-single", "--json")
    assert scored.returncode == 0, scored.stderr
    assert '"r1"' in scored.stdout


# A small CLIP ViT and a Perceiver-VL whose self-attention stack has its shape (as test_clip_init.py).
VISION_CFG = {"image_size": 32, "layers": 4, "width": 64, "head_width": 16, "patch_size": 8, "mlp_ratio": 4.0}
TEXT_CFG = {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
CLIP_CFG = {"embed_dim": 32, "vision_cfg": VISION_CFG, "text_cfg": TEXT_CFG}


def test_clip_initialisation_reaches_every_worker(tmp_path: Path) -> None:
    """With a zero learning rate the trained weights are the initial ones: every CLIP-shaped
    tensor of rank 0's checkpoint equals the CLIP folder's, copied on each worker."""
    from pvl_search.model.config import preset
    from pvl_search.training.clip_init import init_from_clip

    clip = open_clip.CLIP(embed_dim=32, vision_cfg=VISION_CFG, text_cfg=TEXT_CFG)
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in clip.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    local = tmp_path / "clip"
    local.mkdir()
    (local / "open_clip_config.json").write_text(json.dumps({"model_cfg": CLIP_CFG, "preprocess_cfg": {}}))
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(local / "open_clip_model.safetensors"))
    config = preset("tiny").replace(hidden=64, heads=4, latents=8, blocks=2, self_layers=2, frame_size=32, patch=8,
                                    frames=2, token_dim=16)
    captions = tmp_path / "captions.json"
    generate_corpus(tmp_path / "synth", 8, seed=2, size=64, fps=8, seconds=1.5, workers=1, splits=(1.0, 0.0, 0.0))
    os.replace(tmp_path / "synth" / "captions.json", captions)
    shutil.move(str(tmp_path / "synth" / "videos"), tmp_path / "videos")
    write_shards(captions, tmp_path / "shards", frames=2, size=32, samples_per_shard=4, workers=1)

    init = f"clip:local-dir:{local}"
    cfg = TrainConfig(epochs=1, batch_size=2, lr=0.0, warmup_steps=1, checkpoint_every=100)
    summary = train_from_shards(tmp_path / "shards", tmp_path / "run", config, cfg,
                                ShardTrainOptions(loader_workers=0, precision="float32"), init=init,
                                ray=RayTrainOptions(workers=2))
    assert summary.steps == 2
    expected = PerceiverVL(config)
    report = init_from_clip(expected, f"local-dir:{local}")
    trained = load_model(tmp_path / "run" / "last").state_dict()
    for name in report.copied:
        torch.testing.assert_close(trained[name], expected.state_dict()[name], atol=0, rtol=0, msg=name)
