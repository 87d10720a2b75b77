"""Thumbnails at index time: one JPEG per live segment, taken from the decoded frames, kept in
step with the segments through re-indexing, removals, failures and crash leftovers, counted
by `status`, off with --no-thumbnails, and made for an older index on its next `index` run.

Real video files (pvl_search/media/sample_files.py), a real (tiny, random) model, real worker processes.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from index_helpers import CONFIG
from PIL import Image
from typer.testing import CliRunner

from cli import app
from indexer.encoding import ModelRunner
from indexer.ingest.pipeline import IndexOptions, build_index
from indexer.store.index_reader import IndexReader
from indexer.store.index_store import IndexStore
from indexer.store.records import THUMBNAILS_DIR
from pvl_search.media.sample_files import write_image, write_video
from pvl_search.media.thumbnails import THUMBNAIL_WIDTH, clip_thumbnail, encode_jpeg, keyframe

OPTIONS = dict(window_s=1.0, stride_s=0.5, workers=1)  # a 2 s video is 3 segments

RED, GREEN, BLUE = (220, 30, 30), (30, 200, 40), (20, 40, 230)


def flat(rgb: tuple[int, int, int]):  # noqa: ANN201 - a media.FrameFn
    return lambda i, w, h: np.broadcast_to(np.array(rgb, np.uint8), (h, w, 3)).copy()


def index(folder: Path, media: Path, runner: ModelRunner, db_url: str | None = None, **overrides: object):  # noqa: ANN201
    with IndexStore(folder, db_url) as store:
        return build_index([media], store, runner, IndexOptions(**{**OPTIONS, **overrides}))


def live_segments(folder: Path, db_url: str | None = None) -> dict[int, str]:
    """Live segment id -> its video's path."""
    with IndexReader(folder, db_url) as store:
        return {i: seg.path for i, seg in store.segments(store.segment_ids()).items()}


def thumbnail_ids(folder: Path) -> set[int]:
    return {int(p.stem) for p in (folder / THUMBNAILS_DIR).rglob("*") if p.is_file()}


def colour(folder: Path, segment_id: int) -> np.ndarray:
    with IndexReader(folder) as store:
        data = store.thumbnails.path(segment_id).read_bytes()
    image = Image.open(io.BytesIO(data))
    assert image.format == "JPEG"
    return np.asarray(image.convert("RGB"), np.float32).reshape(-1, 3).mean(0)


def test_encoding_keeps_small_frames_and_scales_large_ones_down() -> None:
    frames = np.zeros((4, 32, 32, 3), np.uint8)
    frames[1] = 200  # the middle real frame of a clip whose last frame is padding
    mask = np.array([True, True, True, False])
    assert keyframe(frames, mask).mean() == 200
    assert keyframe(frames, np.zeros(4, bool)) is None
    assert clip_thumbnail(frames, np.zeros(4, bool)) is None
    small = Image.open(io.BytesIO(clip_thumbnail(frames, mask)))
    assert small.size == (32, 32)  # no upscaling: the page scales it
    big = Image.open(io.BytesIO(encode_jpeg(np.zeros((384, 384, 3), np.uint8))))
    assert big.size == (THUMBNAIL_WIDTH, THUMBNAIL_WIDTH)


def test_thumbnails_follow_segments_through_reruns_and_removals(
    db_url: str, tmp_path: Path, runner: ModelRunner
) -> None:
    media, folder = tmp_path / "media", tmp_path / "idx"
    media.mkdir()
    red = write_video(media / "red.mp4", frame_fn=flat(RED), seconds=2.0)
    green = write_video(media / "green.mp4", frame_fn=flat(GREEN), seconds=1.0)
    write_image(media / "blue.png", np.broadcast_to(np.array(BLUE, np.uint8), (30, 40, 3)).copy())

    first = index(folder, media, runner, db_url)
    assert first.indexed == 3 and first.thumbnails_added == 0
    before = live_segments(folder, db_url)
    assert thumbnail_ids(folder) == set(before) and len(before) == first.segments == 5
    with IndexReader(folder, db_url) as store:
        for segment_id, path in before.items():
            image = Image.open(store.thumbnails.path(segment_id))
            assert image.format == "JPEG" and image.size == (CONFIG.frame_size, CONFIG.frame_size)
            rgb = np.asarray(image.convert("RGB"), np.float32).reshape(-1, 3).mean(0)
            want = {"red.mp4": RED, "green.mp4": GREEN, "blue.png": BLUE}[Path(path).name]
            np.testing.assert_allclose(rgb, want, atol=12)  # the video's own frames
        stats = store.stats()
    files = [p for p in (folder / THUMBNAILS_DIR).rglob("*") if p.is_file()]
    assert stats.thumbnails == 5 and stats.bytes[THUMBNAILS_DIR] == sum(p.stat().st_size for p in files) > 0

    # Changed content and length: new segments, new thumbnails; the old ones are gone.
    write_video(red, frame_fn=flat(GREEN), seconds=1.0)
    green.unlink()  # removed
    second = index(folder, media, runner, db_url)
    assert (second.indexed, second.removed, second.unchanged) == (1, 1, 1)
    after = live_segments(folder, db_url)
    assert thumbnail_ids(folder) == set(after) and len(after) == 2
    old_red = {i for i, p in before.items() if p == str(red)}
    assert old_red.isdisjoint(after) and not any(p == str(green) for p in after.values())
    with IndexReader(folder, db_url) as store:
        (new_red,) = [i for i, p in after.items() if p == str(red)]
        rgb = np.asarray(Image.open(store.thumbnails.path(new_red)).convert("RGB"), np.float32)
        np.testing.assert_allclose(rgb.reshape(-1, 3).mean(0), GREEN, atol=12)

    # A file that stops decoding fails: its segments, and so its thumbnails, go.
    red.write_bytes(b"\x00not a video any more" * 40)
    third = index(folder, media, runner, db_url)
    assert list(third.failed) == [str(red)]
    assert thumbnail_ids(folder) == set(live_segments(folder, db_url)) and len(thumbnail_ids(folder)) == 1


def test_crash_leftovers_are_pruned_before_anything_is_added(tmp_path: Path, runner: ModelRunner) -> None:
    media, folder = tmp_path / "media", tmp_path / "idx"
    media.mkdir()
    write_video(media / "red.mp4", frame_fn=flat(RED), seconds=1.0)
    index(folder, media, runner)
    (kept,) = thumbnail_ids(folder)
    # What a SIGKILL leaves: a thumbnail written for a row that never committed (its id is
    # the next one an add gets), a half-written temporary file, one of a removed segment.
    shard = folder / THUMBNAILS_DIR / "0"
    (shard / f"{kept + 1}.jpg").write_bytes(b"an uncommitted thumbnail")
    (shard / f"{kept + 1}.jpg.tmp").write_bytes(b"half")
    (folder / THUMBNAILS_DIR / "7").mkdir()
    (folder / THUMBNAILS_DIR / "7" / "7001.jpg").write_bytes(b"far beyond the committed rows")
    write_video(media / "green.mp4", frame_fn=flat(GREEN), seconds=1.0)
    summary = index(folder, media, runner)
    assert summary.indexed == 1
    live = live_segments(folder)
    assert thumbnail_ids(folder) == set(live) and not list(shard.glob("*.tmp"))
    (green_id,) = [i for i, p in live.items() if p.endswith("green.mp4")]
    assert green_id == kept + 1  # the reused id shows the new video, not the leftover
    np.testing.assert_allclose(colour(folder, green_id), GREEN, atol=12)


def test_no_thumbnails_then_the_next_run_makes_them(tmp_path: Path, model_dir: Path, runner: ModelRunner) -> None:
    media, folder, fresh = tmp_path / "media", tmp_path / "idx", tmp_path / "fresh"
    media.mkdir()
    write_video(media / "red.mp4", frame_fn=flat(RED), seconds=2.0)
    write_video(media / "blue.mp4", frame_fn=flat(BLUE), seconds=1.5)
    write_image(media / "green.jpg", np.broadcast_to(np.array(GREEN, np.uint8), (24, 32, 3)).copy())
    cli = CliRunner()
    common = ["--index", str(folder), "--model", str(model_dir), "--workers", "1", "--window", "1",
              "--stride", "0.5", "--json"]

    off = cli.invoke(app, ["index", str(media), "--no-thumbnails", *common])
    assert off.exit_code == 0, off.output
    assert json.loads(off.stdout)["thumbnails_added"] == 0 and thumbnail_ids(folder) == set()
    status = json.loads(cli.invoke(app, ["status", "--index", str(folder), "--json"]).stdout)
    assert status["thumbnails"] == 0 and status["bytes"][THUMBNAILS_DIR] == 0

    # The next run (thumbnails on by default) makes them for the segments already indexed,
    # without indexing anything again.
    on = cli.invoke(app, ["index", str(media), *common])
    assert on.exit_code == 0, on.output
    summary = json.loads(on.stdout)
    segments = live_segments(folder)
    assert summary["indexed"] == 0 and summary["unchanged"] == 3
    assert summary["thumbnails_added"] == len(segments) == len(thumbnail_ids(folder)) == 6
    status = json.loads(cli.invoke(app, ["status", "--index", str(folder), "--json"]).stdout)
    assert status["thumbnails"] == 6 and status["bytes"][THUMBNAILS_DIR] > 0

    # They are the very thumbnails indexing would have made: the same frames.
    index(fresh, media, runner)
    with IndexReader(folder) as old, IndexReader(fresh) as new:
        made = {(s.path, s.start_s): old.thumbnails.path(i).read_bytes()
                for i, s in old.segments(old.segment_ids()).items()}
        indexed = {(s.path, s.start_s): new.thumbnails.path(i).read_bytes()
                   for i, s in new.segments(new.segment_ids()).items()}
    assert made == indexed

    again = cli.invoke(app, ["index", str(media), *common])
    assert json.loads(again.stdout)["thumbnails_added"] == 0  # nothing left to make
