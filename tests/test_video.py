"""Video decoding and the decode pool, on real files encoded by the tests themselves.

Frame i of every test video is a flat grey whose level encodes i (see media.py), so each test
can tell exactly which frames came back. Worker crashes and hangs are real: a worker process
is stopped (SIGSTOP, a true hang) or killed (SIGKILL) by pid, never simulated.
"""

from __future__ import annotations

import os
import pickle
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pvl_search.media.decode_pool import DecodePool
from pvl_search.media.sample_files import CODEC_CONTAINERS, frame_index_of, truncate, write_image, write_video
from pvl_search.media.video import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGE_EXTENSIONS,
    VIDEO_EXTENSIONS,
    VideoDecodeError,
    probe,
    read_clip,
    read_clips,
    to_model_input,
)
from pvl_search.media.windows import Windows, segment_spans

SIZE = 16  # decoded frame side: small keeps the tests fast


def indices(clip) -> list[int]:
    """Frame indices of the real (unmasked) frames of a clip."""
    return [frame_index_of(frame) for frame, real in zip(clip.frames, clip.mask) if real]


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("media")


@pytest.fixture(scope="module")
def clip_mp4(media_dir: Path) -> Path:
    """8 frames, 4 fps, 2 s."""
    return write_video(media_dir / "clip.mp4")


@pytest.fixture(scope="module")
def long_mp4(media_dir: Path) -> Path:
    """25 s at 2 fps (50 frames), a keyframe every 10 frames so that segments really seek."""
    return write_video(media_dir / "long.mp4", fps=2, seconds=25, gop=10)


# --- every codec and container ----------------------------------------------------------


@pytest.mark.parametrize("backend", ["decord", "pyav"])
@pytest.mark.parametrize(("codec", "ext"), CODEC_CONTAINERS, ids=[f"{c}-{e}" for c, e in CODEC_CONTAINERS])
def test_decodes_every_codec_and_container(media_dir: Path, codec: str, ext: str, backend: str) -> None:
    path = media_dir / f"{codec}.{ext}"
    if not path.exists():
        write_video(path, codec=codec)
    clip = read_clip(path, num_frames=4, size=SIZE, backend=backend)
    assert clip.frames.shape == (4, SIZE, SIZE, 3) and clip.frames.dtype == np.uint8
    assert clip.mask.dtype == bool and clip.mask.all()
    # 8 frames, 4 samples: the middle frame of each run of two.
    assert indices(clip) == [1, 3, 5, 7]


def test_codec_table_covers_every_codec_and_container() -> None:
    codecs = {codec for codec, _ in CODEC_CONTAINERS}
    containers = {ext for _, ext in CODEC_CONTAINERS}
    assert codecs == {"libx264", "libx265", "libvpx-vp9", "mpeg4", "mjpeg"}
    assert containers == {"mp4", "mkv", "webm", "avi", "mov"}
    assert {f".{ext}" for ext in containers} <= set(VIDEO_EXTENSIONS)


def test_fewer_frames_than_requested_are_padded_and_masked(clip_mp4: Path) -> None:
    for backend in ("decord", "pyav"):
        clip = read_clip(clip_mp4, num_frames=12, size=SIZE, backend=backend)
        assert clip.mask.tolist() == [True] * 8 + [False] * 4
        assert indices(clip) == list(range(8))
        assert not clip.frames[8:].any()  # padding is black


def test_probe_reads_the_header(media_dir: Path, clip_mp4: Path) -> None:
    info = probe(clip_mp4)
    assert (info.width, info.height, info.num_frames) == (64, 48, 8)
    assert info.fps == pytest.approx(4.0) and info.duration == pytest.approx(2.0)
    mkv = write_video(media_dir / "probe.mkv", codec="libx264", fps=5, seconds=3)  # no frame count
    info = probe(mkv)
    assert info.num_frames == 15 and info.duration == pytest.approx(3.0, abs=0.05)


# --- segments -------------------------------------------------------------------------------


def test_segment_spans() -> None:
    assert segment_spans(3.0) == [(0.0, 3.0)]
    assert segment_spans(10.0) == [(0.0, 10.0)]
    assert segment_spans(25.0) == [(0.0, 10.0), (5.0, 15.0), (10.0, 20.0), (15.0, 25.0)]
    spans = segment_spans(3600.0 + 2.5)  # an hour of film
    assert spans[0][0] == 0.0 and spans[-1][1] == pytest.approx(3602.5)
    assert all(end - start == pytest.approx(10.0) for start, end in spans)
    steps = np.diff([start for start, _ in spans])
    assert steps.max() <= 5.0 + 1e-9 and steps.min() == pytest.approx(steps.max())
    with pytest.raises(ValueError):
        segment_spans(30.0, window_s=0.0)


@pytest.mark.parametrize("backend", ["decord", "pyav"])
def test_segment_frames_come_from_inside_the_segment(long_mp4: Path, backend: str) -> None:
    info = probe(long_mp4)
    spans = segment_spans(info.duration)
    clips = read_clips(long_mp4, spans, num_frames=8, size=SIZE, backend=backend)
    assert len(clips) == len(spans) == 4
    for (start, end), clip in zip(spans, clips):
        got = indices(clip)
        assert clip.mask.all()
        assert all(start <= i / info.fps < end for i in got), (start, end, got)
        # 20 frames per window, 8 samples: the middle of each of 8 equal runs.
        first = round(start * info.fps)
        assert got == [first + k for k in (1, 3, 6, 8, 11, 13, 16, 18)]


def test_span_shorter_than_a_frame_gets_the_frame_on_screen(long_mp4: Path) -> None:
    clip = read_clip(long_mp4, (10.1, 10.3), num_frames=4, size=SIZE)
    assert clip.mask.tolist() == [True, False, False, False]
    assert indices(clip) == [20]  # frame 20 is on screen from 10.0 s to 10.5 s


# --- images and geometry ----------------------------------------------------------------------


def three_bars(width: int, height: int) -> np.ndarray:
    """Red | green | blue vertical bars, the outer ones a quarter of the width each."""
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    quarter = width // 4
    pixels[:, :quarter] = (255, 0, 0)
    pixels[:, quarter : width - quarter] = (0, 255, 0)
    pixels[:, width - quarter :] = (0, 0, 255)
    return pixels


@pytest.mark.parametrize("ext", IMAGE_EXTENSIONS)
def test_images_are_one_frame_videos(media_dir: Path, ext: str) -> None:
    path = write_image(media_dir / f"image{ext}", np.full((30, 40, 3), (200, 100, 50), np.uint8))
    clip = read_clip(path, num_frames=4, size=SIZE)
    assert clip.mask.tolist() == [True, False, False, False]
    assert np.abs(clip.frames[0].reshape(-1, 3).mean(0) - (200, 100, 50)).max() < 3
    assert not clip.frames[1:].any()
    assert probe(path).num_frames == 1


def assert_cropped_to_the_green_middle(frame: np.ndarray) -> None:
    inner = frame[:, 2:-2].astype(int)  # yuv420 video blurs colour across the bar edges
    assert (np.abs(inner - (0, 255, 0)).max(axis=-1) < 40).all()


def assert_padded_with_black_rows(frame: np.ndarray) -> None:
    """A 2:1 picture in a 16x16 square: 16x8, centred, 4 black rows above and below."""
    assert not frame[:4].any() and not frame[-4:].any()
    middle = frame[5:11].astype(int)
    assert (middle[:, 0, 0] > 180).all() and (middle[:, 8, 1] > 180).all() and (middle[:, -1, 2] > 180).all()


def test_crop_keeps_the_centre_and_pad_keeps_everything(media_dir: Path) -> None:
    path = write_image(media_dir / "bars.png", three_bars(64, 32))
    assert_cropped_to_the_green_middle(read_clip(path, num_frames=1, size=SIZE, fit="crop").frames[0])
    assert_padded_with_black_rows(read_clip(path, num_frames=1, size=SIZE, fit="pad").frames[0])


@pytest.mark.parametrize("backend", ["decord", "pyav"])
def test_video_crop_and_pad(media_dir: Path, backend: str) -> None:
    path = media_dir / "bars.mp4"
    if not path.exists():
        write_video(path, width=64, height=32, frame_fn=lambda i, w, h: three_bars(w, h))
    for size in (SIZE, 64):  # 16 wide goes through decord's small-width workaround, 64 does not
        frames = read_clip(path, num_frames=2, size=size, fit="crop", backend=backend).frames
        assert_cropped_to_the_green_middle(frames[0, :: size // SIZE, :: size // SIZE])
    frames = read_clip(path, num_frames=2, size=SIZE, fit="pad", backend=backend).frames
    assert_padded_with_black_rows(frames[1])


def test_to_model_input() -> None:
    frames = np.zeros((2, 3, 4, 4, 3), dtype=np.uint8)  # batch of 2 clips of 3 frames
    frames[..., 0] = 255
    mask = np.array([[True, True, False], [True, False, False]])
    pixels, keep = to_model_input(frames, mask)
    assert pixels.shape == (2, 3, 3, 4, 4) and pixels.dtype == torch.float32
    assert keep.dtype == torch.bool and keep.tolist() == mask.tolist()
    red = (1.0 - CLIP_MEAN[0]) / CLIP_STD[0]
    green = (0.0 - CLIP_MEAN[1]) / CLIP_STD[1]
    assert pixels[0, 0, 0].allclose(torch.full((4, 4), red))
    assert pixels[0, 1, 1].allclose(torch.full((4, 4), green))
    assert not pixels[0, 2].any() and not pixels[1, 1:].any()  # padding frames are zeros


def test_to_model_input_in_bfloat16_is_the_float32_result_rounded_once() -> None:
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (2, 3, 8, 8, 3), dtype=np.uint8)
    mask = np.array([[True, True, False], [True, True, True]])
    exact, _ = to_model_input(frames, mask)
    fast, keep = to_model_input(frames, mask, torch.bfloat16)
    assert fast.dtype == torch.bfloat16 and keep.tolist() == mask.tolist()
    assert torch.equal(fast, exact.to(torch.bfloat16))
    one, _ = to_model_input(frames[1], mask[1])  # one clip (F, S, S, 3) as its row of the batch
    assert torch.equal(one, exact[1])
    # the CLIP normalisation, per channel, from the uint8 values
    expect = (torch.from_numpy(frames).float() / 255 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert exact[1].allclose(expect[1].movedim(-1, -3), atol=1e-6)


# --- bad input ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_files(media_dir: Path, clip_mp4: Path) -> dict[str, tuple[Path, str]]:
    """name -> (path, a word the reason must contain)."""
    bad = media_dir / "bad"
    bad.mkdir()
    (bad / "empty.mp4").touch()
    (bad / "random.mp4").write_bytes(np.random.default_rng(0).bytes(5000))
    (bad / "text.mp4").write_text("not a video\n" * 100)
    (bad / "notes.txt").write_text("not a video\n" * 100)
    truncated = bad / "truncated.mp4"
    truncated.write_bytes(clip_mp4.read_bytes())
    truncate(truncated)  # the index (moov) at the end is gone
    cut = write_video(bad / "cut.mp4", fps=10, seconds=5, faststart=True)
    truncate(cut)  # index kept, the second half of the frames gone
    (bad / "folder.mp4").mkdir()
    (bad / "dangling.mp4").symlink_to(bad / "gone.mp4")
    return {
        "empty": (bad / "empty.mp4", "empty"),
        "random bytes": (bad / "random.mp4", "not a readable video"),
        "text as mp4": (bad / "text.mp4", "not a readable video"),
        "text file": (bad / "notes.txt", "unsupported file type"),
        "truncated": (truncated, "not a readable video"),
        "truncated, index kept": (cut, "Invalid data"),
        "missing": (bad / "missing.mp4", "no such file"),
        "directory": (bad / "folder.mp4", "is a directory"),
        "unreadable (dangling symlink)": (bad / "dangling.mp4", "dangling symlink"),
    }


def test_every_bad_file_raises_video_decode_error(bad_files: dict[str, tuple[Path, str]]) -> None:
    for name, (path, word) in bad_files.items():
        with pytest.raises(VideoDecodeError) as caught:
            read_clip(path, num_frames=4, size=SIZE)
        error = caught.value
        assert word in error.reason, name
        assert str(error) == f"{path}: {error.reason}" and error.path == str(path)
        if name not in ("truncated, index kept",):  # opens fine; only decoding fails
            with pytest.raises(VideoDecodeError):
                probe(path)


def test_video_decode_error_pickles() -> None:
    error = pickle.loads(pickle.dumps(VideoDecodeError("a.mp4", "decoder crashed (signal 11)")))
    assert str(error) == "a.mp4: decoder crashed (signal 11)" and error.reason.startswith("decoder")


# --- the pool ------------------------------------------------------------------------------------


def alive(pid: int) -> bool:
    """Running or stopped, not gone and not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def wait_for(condition, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_pool_decodes_good_and_bad_files_in_order(
    bad_files: dict[str, tuple[Path, str]], clip_mp4: Path, long_mp4: Path
) -> None:
    spans = segment_spans(25.0)
    jobs = [("clip", clip_mp4, None, 4, SIZE), ("long", long_mp4, spans, 8, SIZE)]
    jobs += [(name, path, None, 4, SIZE) for name, (path, _) in bad_files.items()]
    with DecodePool(workers=2, timeout_s=30, backend="auto") as pool:
        results = list(pool.imap(jobs))
    assert [key for key, _ in results] == [key for key, *_ in jobs]
    (_, clip), (_, segments), *bad = results
    assert len(clip.clips) == 1 and indices(clip.clips[0]) == [1, 3, 5, 7]
    expected = read_clips(long_mp4, spans, 8, SIZE)
    assert len(segments.clips) == 4
    assert all(np.array_equal(a.frames, b.frames) for a, b in zip(segments.clips, expected))
    for key, result in bad:
        assert isinstance(result, VideoDecodeError), key
        assert bad_files[key][1] in result.reason, (key, result)


def test_pool_cuts_windows_in_the_worker(clip_mp4: Path, long_mp4: Path, bad_files) -> None:
    """A Windows job is probed and segmented by the worker: the parent never opens the file."""
    empty, _ = bad_files["empty"]
    jobs = [("long", long_mp4, Windows(10.0, 5.0), 8, SIZE), ("clip", clip_mp4, Windows(), 4, SIZE),
            ("empty", empty, Windows(), 4, SIZE)]
    with DecodePool(workers=2, timeout_s=30) as pool:
        results = dict(pool.imap(jobs))
    long = results["long"]
    assert long.spans == segment_spans(25.0, 10.0, 5.0) and long.info.duration == pytest.approx(25.0)
    expected = read_clips(long_mp4, long.spans, 8, SIZE)
    assert all(np.array_equal(a.frames, b.frames) for a, b in zip(long.clips, expected))
    clip = results["clip"]  # short: one span over all of it
    assert clip.spans == [(0.0, clip.info.duration)] and len(clip.clips) == 1
    assert isinstance(results["empty"], VideoDecodeError)


def test_pool_replaces_a_worker_killed_mid_job(clip_mp4: Path) -> None:
    with DecodePool(workers=1, timeout_s=30, backend="decord") as pool:
        assert [k for k, _ in pool.imap([("warm-up", clip_mp4, None, 2, SIZE)])] == ["warm-up"]
        (victim,) = pool.worker_pids
        os.kill(victim, signal.SIGSTOP)  # hold it still, so it is surely mid-job when killed
        results = pool.imap([("a", clip_mp4, None, 4, SIZE), ("b", clip_mp4, None, 4, SIZE)])
        wait_for(lambda: pool.in_flight() == {"a": victim})
        os.kill(victim, signal.SIGKILL)
        key, result = next(results)
        assert key == "a" and isinstance(result, VideoDecodeError)
        assert "decoder crashed (signal 9" in result.reason
        key, result = next(results)
        assert key == "b" and indices(result.clips[0]) == [1, 3, 5, 7]
        assert victim not in pool.worker_pids
        wait_for(lambda: not alive(victim))


def test_pool_kills_a_hung_worker_and_goes_on(clip_mp4: Path) -> None:
    with DecodePool(workers=1, timeout_s=1.0, backend="decord") as pool:
        list(pool.imap([("warm-up", clip_mp4, None, 2, SIZE)]))
        (victim,) = pool.worker_pids
        os.kill(victim, signal.SIGSTOP)  # a real hang: the process makes no progress at all
        results = list(pool.imap([("hung", clip_mp4, None, 4, SIZE), ("next", clip_mp4, None, 4, SIZE)]))
        (_, hung), (_, good) = results
        assert isinstance(hung, VideoDecodeError) and hung.reason == "timed out after 1 s"
        assert indices(good.clips[0]) == [1, 3, 5, 7]
        wait_for(lambda: not alive(victim))


def test_auto_backend_retries_a_crashed_file_with_pyav(clip_mp4: Path) -> None:
    with DecodePool(workers=1, timeout_s=30, backend="auto") as pool:
        list(pool.imap([("warm-up", clip_mp4, None, 2, SIZE)]))
        (victim,) = pool.worker_pids
        os.kill(victim, signal.SIGSTOP)
        results = pool.imap([("a", clip_mp4, None, 4, SIZE)])
        wait_for(lambda: pool.in_flight() == {"a": victim})
        os.kill(victim, signal.SIGKILL)
        key, result = next(results)
        assert key == "a" and indices(result.clips[0]) == [1, 3, 5, 7]


def test_pool_runs_ahead_of_the_consumer_but_boundedly(clip_mp4: Path) -> None:
    jobs = [(i, clip_mp4, None, 2, SIZE) for i in range(10)]
    with DecodePool(workers=2, prefetch=3) as pool:
        results = pool.imap(jobs)
        key, _ = next(results)
        assert key == 0
        wait_for(lambda: pool.buffered() == 3 and not pool.in_flight())  # decoded while we idle
        time.sleep(0.2)
        assert pool.buffered() == 3  # and no further
        assert [key for key, _ in results] == list(range(1, 10))


def test_pool_shuts_down_cleanly_when_the_consumer_stops_early(clip_mp4: Path) -> None:
    jobs = [(i, clip_mp4, None, 2, SIZE) for i in range(20)]
    with DecodePool(workers=2) as pool:
        results = pool.imap(jobs)  # kept referenced: the consumer stops after the first video
        key, _ = next(results)
        pids = pool.worker_pids
    assert key == 0 and len(pids) == 2
    wait_for(lambda: not any(alive(pid) for pid in pids), timeout_s=10)
    assert not [t for t in threading.enumerate() if t.name == "pvl-decode-dispatch"]
