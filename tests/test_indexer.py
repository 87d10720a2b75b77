"""The indexing pipeline end to end: real video files (pvl_search/media/sample_files.py), a real
model, a real SQLite file and a real PostgreSQL server (`db_url`), real worker processes, and a
real `pvl-search index` process SIGKILLed half-way through.

Every check reads back what a searcher would: SQL rows, the stored embeddings / rerank
states / latents, and the FAISS ids, and compares the stored rows with a fresh encode of the
same clips (float16 storage: compared within float16 tolerance).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from index_helpers import CONFIG, assert_invariant, disk_rows, pattern, pvl_search, run_and_sigkill, video
from sqlalchemy import create_engine, select
from typer.testing import CliRunner

from cli import app
from indexer.encoding import ModelRunner
from indexer.errors import IndexStoreError, ModelMismatchError
from indexer.ingest.pipeline import IndexOptions, IndexSummary, build_index
from indexer.store.index_reader import IndexReader
from indexer.store.index_store import IndexStore
from indexer.store.records import EMBEDDINGS_FILE, LATENTS_FILE, RERANK_FILE
from indexer.store.schema import Segment, Video
from pvl_search.media.decode_pool import DecodePool
from pvl_search.media.sample_files import truncate, write_image
from pvl_search.media.windows import Windows
from pvl_search.model.checkpoint import save_model, weights_fingerprint
from pvl_search.model.perceiver import PerceiverVL

F16_TOL = {"rtol": 2e-3, "atol": 2e-3}  # stored as float16: ~3 significant digits


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(1)  # same config, other weights: another model all the same
    return save_model(PerceiverVL(CONFIG), tmp_path_factory.mktemp("other-model"))


def options(**changes: object) -> IndexOptions:
    base = IndexOptions(window_s=10.0, stride_s=5.0, batch_size=4, workers=1, timeout_s=30.0)
    for key, value in changes.items():
        setattr(base, key, value)
    return base


def index(folder: Path, db_url: str, paths: list[Path], runner: ModelRunner, **changes: object) -> IndexSummary:
    with IndexStore(folder, db_url) as store:
        return build_index(paths, store, runner, options(**changes))


# -- reading an index back ------------------------------------------------------------


def fresh_encode(runner: ModelRunner, paths: list[Path], opts: IndexOptions) -> dict[str, tuple[list, object]]:
    """path -> (spans, EncodedClips) decoded by the worker pool and encoded here, one video
    per encoder call: what the index should hold, computed independently of the pipeline."""
    out = {}
    jobs = [(str(p), str(p), Windows(opts.window_s, opts.stride_s), CONFIG.frames, CONFIG.frame_size) for p in paths]
    with DecodePool(1, 30.0) as pool:
        for key, clips in pool.imap(jobs):
            assert not isinstance(clips, Exception), clips
            frames, masks = np.stack([c.frames for c in clips.clips]), np.stack([c.mask for c in clips.clips])
            out[key] = (clips.spans, runner.encode_clips(frames, masks, keep_latents=True))
    return out


def assert_rows_match_fresh_encode(folder: Path, db_url: str, runner: ModelRunner, opts: IndexOptions) -> None:
    with IndexReader(folder, db_url) as store:
        segments = store.segments(store.segment_ids())
        paths = sorted({s.path for s in segments.values()})
        expected = fresh_encode(runner, [Path(p) for p in paths], opts)
        for path in paths:
            mine = sorted((s for s in segments.values() if s.path == path), key=lambda s: s.start_s)
            ids = [s.id for s in mine]
            spans, encoded = expected[path]
            if spans is not None:  # images have no spans: one segment over the whole file
                assert [(s.start_s, s.end_s) for s in mine] == pytest.approx(spans)
            np.testing.assert_allclose(store.embeddings(ids), encoded.embeddings, **F16_TOL)
            np.testing.assert_allclose(store.rerank_states(ids), encoded.rerank_states, **F16_TOL)
            if opts.store_latents:
                latents = store.latents(ids)
                assert latents.shape == (len(ids), CONFIG.latents, CONFIG.hidden)
                np.testing.assert_allclose(latents.reshape(len(ids), -1), encoded.latents, **F16_TOL)


# -- the update cycle -------------------------------------------------------------------


def test_index_then_add_change_delete(db_url: str, tmp_path: Path, runner: ModelRunner) -> None:
    media, folder = tmp_path / "media", tmp_path / "idx"
    a = video(media / "a.mp4", seed=1)
    b = video(media / "sub" / "deeper" / "b.mp4", seed=2)
    pic = write_image(media / "sub" / "pic.png", pattern(3)(0, 40, 30))
    video(media / ".hidden" / "h.mp4", seed=4)  # hidden folder: skipped
    video(media / ".h.mp4", seed=5)  # hidden file: skipped
    (media / "notes.txt").write_text("not media")
    opts = options(workers=2, store_latents=True)

    with IndexStore(folder, db_url) as store:
        first = build_index([media], store, runner, opts)
    assert (first.scanned, first.indexed, first.unchanged, first.removed) == (3, 3, 0, 0)
    assert first.failed == {} and first.segments == 3
    stats, before = assert_invariant(folder, db_url)
    assert sorted(before) == sorted(str(p) for p in (a, b, pic))
    assert stats.videos == {"indexed": 3, "failed": 0, "removed": 0}
    assert (stats.segments, stats.removed_segments, stats.rows) == (3, 0, 3)
    assert_rows_match_fresh_encode(folder, db_url, runner, opts)

    c = video(media / "sub" / "c.mp4", seed=6)  # added
    video(a, seed=7, seconds=3.0)  # changed: other content, other length
    b.unlink()  # deleted
    os.utime(pic, (time.time() + 5, time.time() + 5))  # touched, same bytes: not redone
    with IndexStore(folder, db_url) as store:
        second = build_index([media], store, runner, opts)
    assert (second.scanned, second.indexed, second.unchanged, second.removed) == (3, 2, 1, 1)
    assert second.failed == {} and second.segments == 2
    stats, after = assert_invariant(folder, db_url)
    assert sorted(after) == sorted(str(p) for p in (a, c, pic))
    assert stats.videos == {"indexed": 3, "failed": 0, "removed": 1}
    assert (stats.segments, stats.removed_segments, stats.rows, stats.vectors) == (3, 2, 5, 3)
    assert after[str(pic)] == before[str(pic)]
    # The changed file's segments were replaced: old ids flagged removed and out of FAISS,
    # new ids appended after every row that existed before.
    old_a, new_a = before[str(a)], after[str(a)]
    assert set(old_a).isdisjoint(new_a) and min(new_a) >= 3
    with IndexReader(folder, db_url) as store:
        gone = store.segments(old_a + before[str(b)])
        assert all(s.removed for s in gone.values()) and len(gone) == 2
        assert set(store.vectors.ids().tolist()).isdisjoint(old_a + before[str(b)])
        assert store.known_videos()[str(b)].status == "removed"
        assert store.latents(store.segment_ids()).shape == (3, CONFIG.latents, CONFIG.hidden)
    assert disk_rows(folder, LATENTS_FILE, CONFIG.latents * CONFIG.hidden) == 5
    assert_rows_match_fresh_encode(folder, db_url, runner, opts)  # the new content, not the old


def test_long_video_is_cut_into_windows(db_url: str, tmp_path: Path, runner: ModelRunner) -> None:
    long = video(tmp_path / "media" / "long.mp4", seed=1, seconds=25.0)
    short = video(tmp_path / "media" / "short.mp4", seed=2, seconds=2.0)
    summary = index(tmp_path / "idx", db_url, [tmp_path / "media"], runner)
    assert summary.indexed == 2 and summary.segments == 5
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                select(Video.path, Segment.start_s, Segment.end_s, Video.duration, Video.fps, Video.width)
                .join(Video, Segment.video_id == Video.id)
                .order_by(Video.path, Segment.start_s)
            ).all()
    finally:
        engine.dispose()
    spans = {p: [(r.start_s, r.end_s) for r in rows if r.path == p] for p in (str(long), str(short))}
    # ceil((25 - 10) / 5) + 1 = 4 windows of 10 s, 5 s apart, the last ending at the end.
    assert spans[str(long)] == pytest.approx([(0, 10), (5, 15), (10, 20), (15, 25)], abs=0.3)
    assert spans[str(short)] == pytest.approx([(0, 2)], abs=0.3)
    first = next(r for r in rows if r.path == str(long))
    assert first.duration == pytest.approx(25, abs=0.3) and first.fps == pytest.approx(4) and first.width == 64
    assert_invariant(tmp_path / "idx", db_url)


# -- bad files --------------------------------------------------------------------------


def test_corrupt_files_fail_alone_and_are_retried_on_request(
    db_url: str, tmp_path: Path, runner: ModelRunner
) -> None:
    media, folder = tmp_path / "media", tmp_path / "idx"
    good = video(media / "good.mp4", seed=1)
    empty = media / "empty.mp4"
    empty.write_bytes(b"")
    noise = media / "noise.mp4"
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    cut = truncate(video(media / "cut.mp4", seed=2, seconds=3.0), keep=0.5)  # moov atom lost
    bad = sorted(str(p) for p in (empty, noise, cut))

    first = index(folder, db_url, [media], runner)
    assert first.indexed == 1 and first.segments == 1
    assert sorted(first.failed) == bad and all(reason.strip() for reason in first.failed.values())
    stats, live = assert_invariant(folder, db_url)
    assert list(live) == [str(good)]
    assert stats.videos == {"indexed": 1, "failed": 3, "removed": 0}
    assert dict(stats.recent_failures) == first.failed  # the reasons are in the index

    again = index(folder, db_url, [media], runner)  # unchanged failures are not retried
    assert (again.indexed, again.unchanged, again.failed) == (0, 4, {})

    retried = index(folder, db_url, [media], runner, retry_failed=True)
    assert sorted(retried.failed) == bad and (retried.indexed, retried.unchanged) == (0, 1)

    video(empty, seed=3)  # a failed file that changed is tried again without asking
    fixed = index(folder, db_url, [media], runner)
    assert (fixed.indexed, fixed.unchanged, fixed.failed) == (1, 3, {})
    stats, live = assert_invariant(folder, db_url)
    assert sorted(live) == sorted([str(good), str(empty)])
    assert stats.videos == {"indexed": 2, "failed": 2, "removed": 0}


def test_a_failed_write_stops_the_run_and_keeps_what_was_committed(
    db_url: str, tmp_path: Path, runner: ModelRunner
) -> None:
    media, folder = tmp_path / "media", tmp_path / "idx"
    paths = [video(media / f"v{i}.mp4", seed=i) for i in range(4)]
    with IndexStore(folder, db_url) as store:
        add_video, calls = store.add_video, []

        def failing_add_video(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            calls.append(args[0])
            if len(calls) == 2:
                raise OSError("disk full (simulated)")
            return add_video(*args, **kwargs)

        store.add_video = failing_add_video  # the writer thread's store call fails
        with pytest.raises(OSError, match="disk full"):
            build_index([media], store, runner, options(batch_size=1))
    assert calls == [str(paths[0]), str(paths[1])]  # nothing written after the failure
    stats, live = assert_invariant(folder, db_url)
    assert list(live) == [str(paths[0])] and stats.rows == 1
    rerun = index(folder, db_url, [media], runner)
    assert (rerun.indexed, rerun.unchanged) == (3, 1)
    assert len(assert_invariant(folder, db_url)[1]) == 4


# -- model identity ----------------------------------------------------------------------


def test_another_model_is_refused(db_url: str, tmp_path: Path, runner: ModelRunner, model_dir: Path,
                                  other_model_dir: Path) -> None:
    media, folder = tmp_path / "media", tmp_path / "idx"
    video(media / "a.mp4", seed=1)
    index(folder, db_url, [media], runner)
    video(media / "b.mp4", seed=2)
    other = ModelRunner.from_folder(other_model_dir, device="cpu")
    with IndexStore(folder, db_url) as store, pytest.raises(ModelMismatchError):
        build_index([media], store, other, options())
    with IndexStore(folder, db_url) as store, pytest.raises(IndexStoreError, match="latents"):
        build_index([media], store, runner, options(store_latents=True))  # layout is fixed too

    result = CliRunner().invoke(
        app, ["index", str(media), "--index", str(folder), "--db", db_url, "--model", str(other_model_dir)]
    )
    assert result.exit_code == 1, result.output
    # One error line, and it is the last thing printed. (Without --json a progress bar line
    # may precede it: the bar is drawn before the model check runs.)
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert errors == [result.stderr.splitlines()[-1]] and errors[0].startswith("error: index ")
    assert "different model" in errors[0] and result.stdout == ""
    stats, live = assert_invariant(folder, db_url)
    assert list(live) == [str(media / "a.mp4")] and stats.videos["indexed"] == 1  # nothing written


def test_cli_index_and_status(db_url: str, tmp_path: Path, model_dir: Path) -> None:
    media, folder = tmp_path / "media", tmp_path / "idx"
    video(media / "a.mp4", seed=1)
    video(media / "sub" / "b.mp4", seed=2)
    cli = CliRunner()
    common = ["--index", str(folder), "--db", db_url, "--model", str(model_dir), "--workers", "1", "--json"]

    ok = cli.invoke(app, ["index", str(media), *common])
    assert ok.exit_code == 0, ok.output
    summary = json.loads(ok.stdout)
    assert (summary["scanned"], summary["indexed"], summary["segments"], summary["failed"]) == (2, 2, 2, {})

    (media / "broken.mp4").write_bytes(b"\x00not a video" * 50)
    partial = cli.invoke(app, ["index", str(media), *common])
    assert partial.exit_code == 2, partial.output
    summary = json.loads(partial.stdout)
    assert list(summary["failed"]) == [str(media / "broken.mp4")] and summary["unchanged"] == 2

    status = cli.invoke(app, ["status", "--index", str(folder), "--db", db_url, "--json"])
    assert status.exit_code == 0, status.output
    data = json.loads(status.stdout)
    assert data["videos"] == {"indexed": 2, "failed": 1, "removed": 0}
    assert data["segments"] == data["vectors"] == 2 and data["faiss"] == "Flat"
    assert data["model"]["fingerprint"] == weights_fingerprint(model_dir)
    assert data["model"]["config"]["hidden"] == CONFIG.hidden
    assert [f["path"] for f in data["recent_failures"]] == [str(media / "broken.mp4")]

    missing = cli.invoke(app, ["status", "--index", str(tmp_path / "nothing"), "--json"])
    assert missing.exit_code == 1 and missing.stderr.startswith("error: ")


# -- crash safety: the installed command, SIGKILLed mid-run -----------------------------

CRASH_VIDEOS = 24


def committed_videos(folder: Path, db_url: str, reader: list) -> int:
    """Videos a reader sees indexed now (0 while there is no index yet)."""
    try:
        if not reader:
            reader.append(IndexReader(folder, db_url))
        reader[0].refresh()
        return reader[0].stats().videos["indexed"]
    except IndexStoreError:  # the writer has not created the index yet
        return 0


@pytest.mark.slow
def test_sigkill_mid_run_loses_nothing_committed(db_url: str, tmp_path: Path, model_dir: Path) -> None:
    media, folder = tmp_path / "media", tmp_path / "idx"
    for i in range(CRASH_VIDEOS):
        video(media / f"part{i // 8}" / f"v{i:02d}.mp4", seed=100 + i)
    command = [pvl_search(), "index", str(media), "--index", str(folder), "--db", db_url,
               "--model", str(model_dir), "--workers", "1", "--batch-size", "2", "--json"]
    reader: list[IndexStore] = []
    try:
        run_and_sigkill(command, ready=lambda: committed_videos(folder, db_url, reader) >= 3,
                        log=tmp_path / "killed.log", waiting_for="video committed", cwd=tmp_path)
    finally:
        for store in reader:
            store.close()

    stats, committed = assert_invariant(folder, db_url)
    print(f"killed after {len(committed)} of {CRASH_VIDEOS} videos")
    assert 3 <= len(committed) < CRASH_VIDEOS, "the kill did not land mid-run"
    assert stats.videos["indexed"] == len(committed) == stats.segments == stats.rows
    with IndexReader(folder, db_url) as store:
        ids = [i for v in committed.values() for i in v]
        kept = store.embeddings(ids), store.rerank_states(ids)

    rerun = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    summary = json.loads(rerun.stdout.strip().splitlines()[-1])
    assert summary["unchanged"] == len(committed)  # committed videos were not redone
    assert summary["indexed"] == CRASH_VIDEOS - len(committed) and summary["failed"] == {}

    stats, final = assert_invariant(folder, db_url)
    assert len(final) == CRASH_VIDEOS and stats.videos == {"indexed": CRASH_VIDEOS, "failed": 0, "removed": 0}
    # Each video encoded once: one row per segment, none removed, none appended twice.
    assert (stats.rows, stats.segments, stats.removed_segments) == (CRASH_VIDEOS, CRASH_VIDEOS, 0)
    assert disk_rows(folder, EMBEDDINGS_FILE, CONFIG.embed_dim) == CRASH_VIDEOS  # orphans dropped
    assert disk_rows(folder, RERANK_FILE, CONFIG.rerank_state_width) == CRASH_VIDEOS
    assert {p: final[p] for p in committed} == committed  # same ids: the same rows as before
    with IndexReader(folder, db_url) as store:
        np.testing.assert_array_equal(store.embeddings(ids), kept[0])
        np.testing.assert_array_equal(store.rerank_states(ids), kept[1])


def test_the_encoder_takes_every_core_only_when_it_is_the_bottleneck(runner: ModelRunner) -> None:
    """The rule of local_producer._EncoderThreads, fed measured seconds directly: waiting for
    decoded videos under a tenth of the encoding time over the first batches gives torch every
    core; more waiting (decode-bound) leaves the count build_index set."""
    from indexer.ingest.local_producer import _EncoderThreads

    cores, before = os.cpu_count() or 1, torch.get_num_threads()  # 2 on the project's machines
    try:
        for waited, expected in ((0.5, 1), (0.05, cores)):
            torch.set_num_threads(1)  # what build_index sets on 2 cores with 2 decoder workers
            threads = _EncoderThreads(runner)
            threads.waited = waited
            for _ in range(_EncoderThreads.BATCHES):
                threads.encoded(1.0)
            assert torch.get_num_threads() == expected, (waited, torch.get_num_threads())
            threads.encoded(100.0)  # decided once: later batches change nothing
            assert torch.get_num_threads() == expected
    finally:
        torch.set_num_threads(before)
