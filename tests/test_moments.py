"""Moments inside long videos (issue #23): windows that follow the model, moments and the
timeline on every hit, "more like this moment", the long-video benchmark and its metrics.

The end-to-end tests index real long MP4s (`synth --long`) with the shipped model, the one
whose clip length (3 s) decides the default windows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from indexer.encoding import ModelRunner
from indexer.errors import NotFoundError
from indexer.evaluate.moments import iou, moment_queries
from indexer.ingest.options import IndexOptions
from indexer.ingest.pipeline import build_index
from indexer.ingest.window_choice import choose_windows, reindex_hint
from indexer.search.moments import find_moments, timeline
from indexer.search.request import SearchFilters
from indexer.search.searcher import Searcher
from indexer.store.index_reader import IndexReader
from indexer.store.index_store import IndexStore
from indexer.store.records import VideoSegments
from indexer.store.windows_record import WINDOWS_FILE
from pvl_search.data.captions import load_captions
from pvl_search.data.long_synth import generate_long_corpus, plan_long_corpus
from pvl_search.data.synth import generate_corpus
from pvl_search.media.shots import detect_cuts, shot_spans, with_shots
from pvl_search.media.video import probe
from pvl_search.media.windows import LEGACY_STRIDE_S, LEGACY_WINDOW_S, Windows, model_windows, segment_spans
from pvl_search.model.checkpoint import CheckpointError, load_clip_seconds, save_clip_seconds
from pvl_search.model.defaults import DEFAULT_MODEL_DIR
from tests.index_helpers import assert_one_error_line, cli

SHIPPED = model_windows(3.0)


# ------------------------------------------------------------------ moments from scores


def _segments(n: int, window: float = 3.0, stride: float = 1.5) -> VideoSegments:
    starts = np.arange(n) * stride
    return VideoSegments(np.arange(100, 100 + n), starts, starts + window)


def test_the_best_moment_grows_over_neighbours_that_score_alike() -> None:
    segments = _segments(8)
    scores = np.array([0.1, 0.2, 0.55, 0.6, 0.58, 0.2, 0.1, 0.1])
    moments = find_moments(segments, scores, best_id=103, merge_margin=0.05)
    assert (moments[0].start_s, moments[0].end_s, moments[0].segment_id) == (3.0, 9.0, 103)
    assert find_moments(segments, scores, best_id=103, merge_margin=0.0)[0].end_s == 7.5  # alone


def test_other_strong_peaks_are_moments_of_their_own_without_overlap() -> None:
    segments = _segments(10)
    scores = np.array([0.7, 0.3, 0.2, 0.2, 0.65, 0.3, 0.1, 0.2, 0.4, 0.1])
    moments = find_moments(segments, scores, best_id=100, merge_margin=0.05, other_margin=0.1)
    assert [(m.segment_id, m.score) for m in moments] == [(100, 0.7), (104, 0.65)]  # 0.4 is too weak
    # The ranking's choice comes first even when another segment scores higher by retrieval.
    assert find_moments(segments, scores, best_id=104)[0].segment_id == 104
    spans = [(m.start_s, m.end_s) for m in find_moments(segments, scores, best_id=104, other_margin=1.0,
                                                        merge_margin=0.3)]
    for i, a in enumerate(spans):  # moments never share a second
        for b in spans[i + 1:]:
            assert a[1] <= b[0] or b[1] <= a[0]
    # A peak whose window overlaps the best moment's is not another place.
    near = np.array([0.1, 0.7, 0.2, 0.68, 0.1, 0.1])
    assert len(find_moments(_segments(6, stride=1.0), near, best_id=101, merge_margin=0.0, other_margin=0.1)) == 1


def test_the_timeline_covers_the_video_on_an_even_grid() -> None:
    segments = _segments(3, window=3.0, stride=3.0)  # 0-3, 3-6, 6-9 s of a 12 s video
    line = timeline(segments, np.array([0.1, 0.9, 0.3]), duration=12.0, points=12)
    assert line.step_s == 1.0 and len(line.scores) == 12
    assert line.scores[4] == 0.9 and line.scores[0] == 0.1 and line.scores[7] == 0.3
    assert line.scores[10] == 0.1  # past the last segment: the video's lowest score


# ------------------------------------------------------------------ windows


def test_windows_follow_the_model_the_index_and_the_user() -> None:
    model = dict(clip_s=3.0, reindex=False)
    assert choose_windows(None, None, recorded=None, holds_videos=False, **model) == SHIPPED
    assert choose_windows(None, None, recorded=None, holds_videos=False, clip_s=None, reindex=False) == Windows(
        LEGACY_WINDOW_S, LEGACY_STRIDE_S)
    # An index keeps its windows; one made before they were recorded keeps the old defaults.
    assert choose_windows(None, None, recorded=Windows(6, 2), holds_videos=True, **model) == Windows(6, 2)
    assert choose_windows(None, None, recorded=None, holds_videos=True, **model) == Windows(10, 5)
    assert choose_windows(8.0, None, recorded=None, holds_videos=False, **model) == Windows(8.0, 5.333, shots=True)
    assert choose_windows(None, None, recorded=None, holds_videos=False, shots=False, **model) == Windows(3.0, 2.0)
    # An index cut before shot windows existed keeps its cutting; shot windows for new videos need --reindex.
    assert choose_windows(None, None, recorded=Windows(3.0, 1.29), holds_videos=True, **model) == Windows(3.0, 1.29)
    with pytest.raises(ValueError, match="one per shot"):
        choose_windows(None, None, recorded=Windows(3.0, 2.0), holds_videos=True, shots=True, **model)
    assert reindex_hint(Windows(3.0, 2.0), 3.0) and "one per shot" in reindex_hint(Windows(3.0, 2.0), 3.0)
    with pytest.raises(ValueError, match="--reindex"):
        choose_windows(8.0, None, recorded=SHIPPED, holds_videos=True, **model)
    assert choose_windows(None, None, recorded=Windows(10, 5), holds_videos=True, clip_s=3.0,
                          reindex=True) == SHIPPED
    assert reindex_hint(Windows(10, 5), 3.0) and reindex_hint(SHIPPED, 3.0) is None
    assert reindex_hint(Windows(10, 5), None) is None  # the model says nothing better
    with pytest.raises(ValueError, match="positive"):
        choose_windows(0.0, None, recorded=None, holds_videos=False, **model)


def test_the_model_folder_records_its_clip_length(tmp_path: Path) -> None:
    assert load_clip_seconds(DEFAULT_MODEL_DIR) == 3.0
    assert load_clip_seconds(tmp_path) is None
    save_clip_seconds(tmp_path, 2.5, "test")
    assert load_clip_seconds(tmp_path) == 2.5
    for bad in ('{"clip_s": -1}', '{"clip_s": true}', "[", '{"clip_s": "3"}'):
        (tmp_path / "clip.json").write_text(bad)
        with pytest.raises(CheckpointError, match="clip.json"):
            load_clip_seconds(tmp_path)


# ------------------------------------------------------------------ the benchmark


def test_long_videos_record_each_event_span(tmp_path: Path) -> None:
    plans = plan_long_corpus(2, 5, seed=4, long_events=7)
    assert [len(p.spans) for p in plans] == [5, 5, 7]
    for plan in plans:
        ends = [end for _, end in plan.spans]
        assert plan.spans[0][0] == 0.0 and all(a[1] == b[0] for a, b in zip(plan.spans, plan.spans[1:]))
        assert all(3.0 <= end - start <= 4.5 for start, end in plan.spans) and ends == sorted(ends)
    assert plan_long_corpus(2, 5, seed=4, long_events=7)[2].captions == plans[2].captions  # deterministic
    summary = generate_long_corpus(tmp_path / "long", 1, 5, seed=4)
    record = load_captions(summary.captions_path)[0]
    info = probe(record.path)
    assert info.duration == pytest.approx(record.meta["moments"][-1][1], abs=0.2)
    assert len(moment_queries([record], "test")) == 5 and not moment_queries([record], "val")
    assert iou((0.0, 2.0), (1.0, 3.0)) == pytest.approx(1 / 3) and iou((0, 1), (2, 3)) == 0.0


@pytest.fixture(scope="module")
def long_index(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """Three 18+ s videos of 5 events each, indexed with the shipped model and its windows."""
    root = tmp_path_factory.mktemp("moments")
    summary = generate_long_corpus(root / "corpus", 3, 5, seed=123)
    folder = root / "index"
    runner = ModelRunner.from_folder(DEFAULT_MODEL_DIR, device="cpu")
    with IndexStore(folder) as store:
        result = build_index([root / "corpus" / "videos"], store, runner, IndexOptions(workers=1))
    assert result.indexed == 3 and result.windows == {"window_s": 3.0, "stride_s": 2.0, "shots": True}
    return folder, Path(summary.captions_path), root / "corpus" / "videos"


def test_the_default_index_cuts_long_videos_into_the_models_windows_and_shots(long_index) -> None:
    """The model's grid (3 s every 2 s) and one window per shot, cut exactly where the video
    cuts: the events' own spans."""
    folder, captions, _ = long_index
    assert json.loads((folder / WINDOWS_FILE).read_text()) == {"window_s": 3.0, "stride_s": 2.0, "shots": True}
    with IndexReader(folder) as reader:
        segments = reader.video_segments(range(1, 4))
        cut = sorted((tuple(np.round(s.starts, 3)), tuple(np.round(s.ends, 3))) for s in segments.values())
    expected = []
    for record in load_captions(captions):
        events = record.meta["moments"]
        duration = probe(record.path).duration
        spans = with_shots(segment_spans(duration, 3.0, 2.0), shot_spans([e[0] for e in events[1:]], duration, 3.0))
        expected.append((tuple(np.round([a for a, _ in spans], 3)), tuple(np.round([b for _, b in spans], 3))))
        assert all(tuple(e) in spans for e in events)  # each event is a segment of its own
    assert cut == sorted(expected)
    status = json.loads(cli("status", "--index", str(folder), "--json").stdout)
    assert status["windows"] == {"window_s": 3.0, "stride_s": 2.0, "shots": True}


def test_cuts_are_found_where_a_video_cuts_and_nowhere_else(tmp_path: Path) -> None:
    summary = generate_long_corpus(tmp_path / "long", 1, 6, seed=9)
    record = load_captions(summary.captions_path)[0]
    starts = [start for start, _ in record.meta["moments"][1:]]
    assert detect_cuts(record.path) == pytest.approx(starts, abs=1 / 8)  # within a frame at 8 fps
    generate_corpus(tmp_path / "clips", 2, seed=3, size=64, fps=8, seconds=3.0, workers=1)
    for clip in load_captions(tmp_path / "clips" / "captions.json"):
        assert detect_cuts(clip.path) == []  # one scene, objects moving: no cut


def test_shot_windows_cover_each_shot_once() -> None:
    cuts = [3.5, 8.0, 8.6, 20.0]
    assert shot_spans(cuts, 24.0, 3.0) == [(0.0, 3.5), (3.5, 8.0), (8.6, 11.6), (17.0, 20.0), (20.0, 24.0)]
    assert shot_spans([], 24.0, 3.0) == [] and shot_spans([0.0, 24.0], 24.0, 3.0) == []  # no cut inside
    grid = [(0.0, 3.0), (2.0, 5.0)]
    assert with_shots(grid, [(0.01, 3.02), (3.5, 8.0), (1.0, 2.0)]) == [(0.0, 3.0), (1.0, 2.0), (2.0, 5.0), (3.5, 8.0)]


def test_search_finds_the_moment_of_each_event(long_index) -> None:
    folder, captions, _ = long_index
    queries = moment_queries(load_captions(captions), "test")
    with Searcher(folder, model_dir=DEFAULT_MODEL_DIR) as searcher:
        right = 0
        for q in queries:
            hit = searcher.search(q.caption, k=3).hits[0]
            assert hit.moments and hit.moments[0].start_s <= hit.best.start_s  # grown from the ranking's segment
            assert len(hit.timeline.scores) == 120 and hit.timeline.step_s * 120 >= hit.duration - 1e-6
            right += Path(hit.path).resolve() == Path(q.path) and iou(
                (hit.moments[0].start_s, hit.moments[0].end_s), (q.start_s, q.end_s)) >= 0.5
    # The shipped model on three unseen long videos: most events are found where they happen.
    assert right >= 0.6 * len(queries), (right, len(queries))


def test_more_like_a_moment_finds_its_own_video_and_keeps_filters(long_index) -> None:
    folder, _, videos = long_index
    with Searcher(folder, model_dir=DEFAULT_MODEL_DIR) as searcher:
        per_video = searcher.store.video_segments(range(1, 4))
        for video_id, segments in per_video.items():
            segment = int(segments.ids[len(segments.ids) // 2])
            result = searcher.more_like(segment, k=3)
            assert result.hits[0].video_id == video_id and result.hits[0].best.segment_id == segment
            own = Path(result.hits[0].path).name
            other = next(p.name for p in sorted(videos.iterdir()) if p.name != own)
            filtered = searcher.more_like(segment, k=3, filters=SearchFilters(path_glob=f"*/{other}"))
            assert [Path(h.path).name for h in filtered.hits] == [other]
        with pytest.raises(NotFoundError):
            searcher.more_like(10**6)


def test_other_windows_need_reindex_and_an_old_index_still_searches(long_index, tmp_path: Path) -> None:
    _, captions, videos = long_index
    folder = tmp_path / "old"
    # An index as made before windows followed the model: 10 s windows, no windows record.
    done = cli("index", str(videos), "--index", str(folder), "--window", "10", "--stride", "5", "--no-shots",
               "--json")
    assert done.returncode == 0, done.stderr
    (folder / WINDOWS_FILE).unlink()
    query = load_captions(captions)[0].captions[0]
    found = cli("search", query, "--index", str(folder), "--json", "-k", "1")
    assert found.returncode == 0 and json.loads(found.stdout.splitlines()[0])["windows"] is None
    rerun = cli("index", str(videos), "--index", str(folder))
    assert rerun.returncode == 0 and "--reindex" in rerun.stderr  # offered, not forced
    assert "indexed 0" in rerun.stdout and "10 s windows every 5 s" in rerun.stdout
    moved = cli("index", str(videos), "--index", str(folder), "--reindex", "--json")
    assert moved.returncode == 0 and json.loads(moved.stdout)["indexed"] == 3
    # Now recorded: other windows for new videos would mix two cuttings.
    assert_one_error_line(cli("index", str(videos), "--index", str(folder), "--window", "10"), "--reindex")
    with IndexReader(folder) as reader:
        assert reader.windows() == SHIPPED and reader.counts()[0] == 3
        lengths = {round(float(e - s), 2) for seg in reader.video_segments(range(1, 7)).values()
                   for s, e in zip(seg.starts, seg.ends)}
    assert max(lengths) <= 4.5  # every video cut again (grid and shots); the 10 s segments are gone


def test_an_interrupted_reindex_goes_on_at_the_next_run(long_index, tmp_path: Path) -> None:
    """A `--reindex` killed after its first video (a real SIGKILL, while the process is stopped
    right after that video's SQL commit) leaves the index cut two ways; the next plain run
    finishes the re-cut by itself, and says so."""
    import os
    import signal
    import subprocess

    from tests.index_helpers import cli_env, pvl_search, wait_until_stopped

    _, _, videos = long_index
    folder = tmp_path / "idx"
    done = cli("index", str(videos), "--index", str(folder), "--window", "10", "--stride", "5", "--no-shots")
    assert done.returncode == 0, done.stderr
    log = tmp_path / "reindex.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen([pvl_search(), "index", str(videos), "--index", str(folder), "--reindex"],
                                env={**cli_env(), "PVL_TEST_PAUSE_AT": "sql_committed"},
                                stdout=subprocess.DEVNULL, stderr=err)
    wait_until_stopped(proc, log, "sql_committed")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    record = json.loads((folder / WINDOWS_FILE).read_text())
    assert record == {"window_s": 3.0, "stride_s": 2.0, "shots": True, "reindex_pending": True}

    def lengths() -> set[float]:
        with IndexReader(folder) as reader:
            return {round(float(e - s), 2) for seg in reader.video_segments(range(1, 10)).values()
                    for s, e in zip(seg.starts, seg.ends)}

    assert max(lengths()) == 10.0  # not every video is cut anew yet
    rerun = cli("index", str(videos), "--index", str(folder))
    assert rerun.returncode == 0 and "interrupted" in rerun.stderr, rerun.stderr
    assert max(lengths()) <= 4.5
    assert json.loads((folder / WINDOWS_FILE).read_text()) == {"window_s": 3.0, "stride_s": 2.0, "shots": True}
    again = cli("index", str(videos), "--index", str(folder))
    assert again.returncode == 0 and "interrupted" not in again.stderr and "indexed 0" in again.stdout
