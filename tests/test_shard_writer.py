"""Issue #26 (shards): `write_shards` and `pvl-search shards` on real encoded videos.

One small synthetic corpus (train and val), plus a file of garbage bytes and a path to no file,
is written once into reference shards; every other way of writing it (killed and rerun, on
Ray, from the CLI) must give the same bytes, and the samples must hold exactly the frames the
training frame cache decodes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from typer.testing import CliRunner

import cli
from pvl_search.data.captions import CaptionRecord, load_captions, write_captions
from pvl_search.data.pairs import build_frame_cache
from pvl_search.data.synth import generate_corpus
from pvl_search.shards.format import MANIFEST, Manifest, file_sha256, read_samples, sample_key
from pvl_search.shards.writer import SIDECAR, ShardReport, write_shards

REPO = Path(__file__).resolve().parents[1]
FRAMES, SIZE, PER_SHARD = 8, 64, 4
# The train split's third video is garbage bytes, the val split's sixth a file that is not there.
CORRUPT_AT, ABSENT_AT = 2, 5


@pytest.fixture(scope="module")
def captions(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("corpus")
    generate_corpus(folder, 12, seed=3, size=SIZE, fps=8, seconds=1.5, workers=1, splits=(0.5, 0.5, 0.0))
    records = load_captions(folder / "captions.json")
    (folder / "videos" / "corrupt.mp4").write_bytes(np.random.default_rng(0).bytes(4096))
    train = [r for r in records if r.split == "train"]
    val = [r for r in records if r.split == "val"]
    train.insert(CORRUPT_AT, CaptionRecord("corrupt", folder / "videos" / "corrupt.mp4", "train", ["noise"], {}))
    val.insert(ABSENT_AT, CaptionRecord("absent", folder / "videos" / "absent.mp4", "val", ["nothing"], {"k": 1}))
    path = folder / "shard-captions.json"
    write_captions(path, train + val)
    return path


@pytest.fixture(scope="module")
def reference(captions: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ShardReport]:
    """The shards of an uninterrupted local run."""
    out = tmp_path_factory.mktemp("reference")
    seen: list[tuple[int, int]] = []
    report = write_shards(captions, out, frames=FRAMES, size=SIZE, samples_per_shard=PER_SHARD,
                          progress=lambda done, total: seen.append((done, total)))
    assert seen[0] == (0, 14) and seen[-1] == (14, 14)  # every video, failed ones included
    return out, report


def tars(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.tar"))}


def assert_same_shards(folder: Path, reference: Path) -> None:
    assert tars(folder) == tars(reference)
    assert Manifest.read(folder).sha256 == Manifest.read(reference).sha256
    assert not [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


def shards_cli(*args: str, out: Path) -> subprocess.Popen:
    """`pvl-search shards` as its own process (this checkout's code, whatever is installed)."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    return subprocess.Popen([sys.executable, "-m", "cli", "shards", *args, "--out", str(out)], cwd=out.parent,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_samples_hold_the_frame_cache_frames_and_the_captions(captions: Path, reference: tuple[Path, ShardReport],
                                                               tmp_path: Path) -> None:
    out, report = reference
    manifest = Manifest.read(out)
    assert (manifest.frames, manifest.size, manifest.samples_per_shard) == (FRAMES, SIZE, PER_SHARD)
    assert manifest.sampling["clips_per_video"] == 1 and manifest.sampling["fit"] == "crop"
    assert manifest.source == str(captions)
    assert [e.samples for e in manifest.splits["train"].shards] == [3, 1]  # 5 videos, one corrupt
    assert [e.samples for e in manifest.splits["val"].shards] == [4, 3, 1]  # 9 videos, one absent
    assert (report.written_now, report.already_there, report.samples, report.failed) == (5, 0, 12, 2)
    assert report.manifest_sha256 == manifest.sha256
    for split in ("train", "val"):
        for entry in manifest.splits[split].shards:
            assert file_sha256(out / entry.name) == entry.sha256

    records = [r for r in load_captions(captions) if r.video_id not in ("corrupt", "absent")]
    cache, failed = build_frame_cache([(r.video_id, str(r.path)) for r in records], tmp_path / "cache",
                                      frames=FRAMES, size=SIZE)
    assert not failed
    row = {key: i for i, key in enumerate(cache.keys)}
    by_id = {r.video_id: r for r in records}
    for split in ("train", "val"):
        ids = [r.video_id for r in load_captions(captions) if r.split == split]
        samples = [s for e in manifest.splits[split].shards for s in read_samples(out / e.name)]
        assert [s.key for s in samples] == [sample_key(split, i) for i, v in enumerate(ids) if v in by_id]
        for s in samples:
            assert np.array_equal(s.frames, cache.frames[row[s.video_id]])
            assert np.array_equal(s.mask, cache.masks[row[s.video_id]])
            assert (s.captions, s.meta) == (by_id[s.video_id].captions, by_id[s.video_id].meta)

    # WebDataset reads a shard as it is (key = member name up to its first dot).
    first = manifest.splits["val"].shards[0].name
    read = list(wds.WebDataset(str(out / first), shardshuffle=False).decode())
    assert [r["__key__"] for r in read] == [sample_key("val", i) for i in range(4)]
    assert read[0]["frames.npy"].shape == (FRAMES, SIZE, SIZE, 3) and read[0]["frames.npy"].dtype == np.uint8
    val_ids = [r.video_id for r in load_captions(captions) if r.split == "val"]
    assert read[0]["mask.npy"].dtype == bool and read[0]["json"]["video_id"] == val_ids[0]
    assert read[0]["json"]["captions"] == by_id[val_ids[0]].captions


def test_undecodable_videos_are_recorded_not_fatal(reference: tuple[Path, ShardReport]) -> None:
    out, report = reference
    manifest = Manifest.read(out)
    corrupt, absent = manifest.splits["train"].failed["corrupt"], manifest.splits["val"].failed["absent"]
    assert "corrupt.mp4" in corrupt and "\n" not in corrupt
    assert absent.endswith("absent.mp4: no such file")
    assert report.splits["train"].failed == {"corrupt": corrupt}
    sidecar = json.loads((out / ("train-000000.tar" + SIDECAR)).read_text())
    assert sidecar["failed"] == {"corrupt": corrupt} and sidecar["samples"] == 3
    assert json.loads((out / ("val-000001.tar" + SIDECAR)).read_text())["failed"] == {"absent": absent}
    keys = [s.key for s in read_samples(out / "train-000000.tar")]
    assert keys == [sample_key("train", i) for i in (0, 1, 3)]  # the corrupt one's key is left out


@pytest.mark.slow
def test_killed_and_rerun_gives_the_same_bytes(captions: Path, reference: tuple[Path, ShardReport],
                                               tmp_path: Path) -> None:
    out = tmp_path / "killed"
    args = (str(captions), "--samples-per-shard", str(PER_SHARD), "--workers", "2")
    proc = shards_cli(*args, out=out)
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob("*.tar")):  # the first shard renamed into place
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.communicate()
    assert not (out / MANIFEST).exists()  # it really was stopped part-way
    # What a kill at other moments leaves: half-written temporaries, a tar cut short.
    (out / "val-000002.tar.tmp").write_bytes(b"half a shard")
    (out / (MANIFEST + ".tmp")).write_text("{")
    kept = out / "train-000000.tar"
    kept.write_bytes(kept.read_bytes()[:1000])

    rerun = shards_cli(*args, "--json", out=out)
    stdout, stderr = rerun.communicate(timeout=120)
    assert rerun.returncode == 0 and stderr == "", stderr
    report = json.loads(stdout)
    assert report["written_now"] >= 1 and report["written_now"] + report["already_there"] == 5
    assert_same_shards(out, reference[0])


def test_rerun_is_a_no_op_and_other_settings_are_refused(captions: Path,
                                                          reference: tuple[Path, ShardReport]) -> None:
    out, first = reference
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = write_shards(captions, out, frames=FRAMES, size=SIZE, samples_per_shard=PER_SHARD)
    assert (again.written_now, again.already_there) == (0, 5)
    assert again.manifest_sha256 == first.manifest_sha256 and again.splits == first.splits
    result = CliRunner().invoke(cli.app, ["shards", str(captions), "--out", str(out), "--frames", "4",
                                          "--size", str(SIZE), "--samples-per-shard", str(PER_SHARD)])
    assert result.exit_code == 1
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: {out}: holds shards written with frames=8; this run asks for frames=4")
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # nothing touched


@pytest.mark.slow
def test_ray_tasks_write_the_same_shards(captions: Path, reference: tuple[Path, ShardReport], tmp_path: Path) -> None:
    import ray

    try:
        report = write_shards(captions, tmp_path / "ray", frames=FRAMES, size=SIZE, samples_per_shard=PER_SHARD,
                              workers=2, ray_address="local")
    finally:
        ray.shutdown()
    assert report.written_now == 5 and report.splits == reference[1].splits
    assert_same_shards(tmp_path / "ray", reference[0])


def test_cli_json_reports_the_counts(captions: Path, tmp_path: Path) -> None:
    out = tmp_path / "val-only"
    result = CliRunner().invoke(cli.app, ["shards", str(captions), "--out", str(out), "--config", "tiny",
                                          "--split", "val", "--samples-per-shard", "8", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert (report["frames"], report["size"], report["samples_per_shard"]) == (FRAMES, SIZE, 8)  # the tiny preset's
    assert list(report["splits"]) == ["val"] and report["splits"]["val"]["shards"] == 2
    assert (report["samples"], report["failed"], report["written_now"]) == (8, 1, 2)
    assert list(report["splits"]["val"]["failed"]) == ["absent"]
    assert report["manifest_sha256"] == Manifest.read(out).sha256
