"""Decoding throughput: videos/s for 8 frames sampled uniformly per video, all ratios from one run.

Compares, on the same files: decord through `pvl_search.media.video` (the default backend), our PyAV
backend, a plain PyAV seek-and-decode loop (what one would write without decord), and the
`DecodePool` with 2 single-thread workers against 1 in-process decoder with 1 and 2 threads.
The files are made here in a temporary folder: short clips (128x128, 3 s, 30 fps) and long
videos (384x384, 30 s, 30 fps), libx264 with its default keyframe interval (250 frames), a
moving texture plus noise so that frames are not trivially compressible.

    python benchmarks/decode.py [--clips 40] [--long 3] [--size 384]

Prints a markdown table. Pool timings exclude worker start-up (one warm-up job first).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import av  # noqa: E402
import numpy as np  # noqa: E402

from pvl_search.media.decode_pool import DecodePool  # noqa: E402
from pvl_search.media.decoders import scaled_size, square_crop  # noqa: E402
from pvl_search.media.sample_files import write_video
from pvl_search.media.video import probe, read_clip  # noqa: E402

FRAMES = 8


def textured(index: int, width: int, height: int) -> np.ndarray:
    """A texture drifting by 2 pixels a frame, plus noise: costs a decoder real work."""
    y, x = np.mgrid[0:height, 0:width]
    base = 128 + 60 * np.sin((x + 2 * index) / 7.0) * np.cos((y - index) / 11.0)
    noise = np.random.default_rng(index).normal(0, 8, (height, width))
    grey = np.clip(base + noise, 0, 255).astype(np.uint8)
    return np.stack([grey, np.roll(grey, 5, axis=1), 255 - grey], axis=-1)


def make_files(folder: Path, clips: int, long: int) -> dict[str, list[Path]]:
    short = [write_video(folder / f"clip{i}.mp4", width=128, height=128, fps=30, seconds=3,
                         frame_fn=lambda j, w, h, i=i: textured(j + 7 * i, w, h)) for i in range(clips)]  # fmt: skip
    films = [write_video(folder / f"long{i}.mp4", width=384, height=384, fps=30, seconds=30,
                         frame_fn=textured) for i in range(long)]  # fmt: skip
    return {"clips": short, "long": films}


def plain_pyav(path: Path, size: int) -> np.ndarray:
    """The baseline: for each of 8 uniform times, seek to the keyframe before it, decode on."""
    frames = []
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_count = 1
        duration = float(stream.duration * stream.time_base)
        width, height = scaled_size(stream.width, stream.height, size, "crop")
        for i in range(FRAMES):
            target = (i + 0.5) * duration / FRAMES
            container.seek(int(target / stream.time_base), stream=stream, backward=True)
            for frame in container.decode(stream):
                if frame.time >= target - 0.5 / float(stream.average_rate):
                    frames.append(square_crop(frame.to_ndarray(width=width, height=height, format="rgb24"), size))
                    break
    return np.stack(frames)


def rate(files: list[Path], decode: Callable[[Path], object]) -> float:
    start = time.perf_counter()
    for path in files:
        decode(path)
    return len(files) / (time.perf_counter() - start)


def pool_rate(files: list[Path], size: int, workers: int) -> float:
    with DecodePool(workers=workers, timeout_s=120, backend="decord") as pool:
        list(pool.imap([(i, files[0], None, FRAMES, size) for i in range(workers)]))  # warm-up
        start = time.perf_counter()
        results = list(pool.imap([(p, p, None, FRAMES, size) for p in files]))
        elapsed = time.perf_counter() - start
    assert all(not isinstance(r, Exception) for _, r in results)
    return len(files) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=40)
    parser.add_argument("--long", type=int, default=3)
    parser.add_argument("--size", type=int, default=384)
    args = parser.parse_args()
    size = args.size
    with tempfile.TemporaryDirectory() as tmp:
        files = make_files(Path(tmp), args.clips, args.long)
        rows: dict[str, dict[str, float]] = {}
        for name, group in files.items():
            info = probe(group[0])
            label = f"{name} ({len(group)} x {info.width}x{info.height}, {info.duration:g} s)"
            for row, decode in [
                ("decord, 1 thread (pvl_search.media.video)", lambda p: read_clip(p, None, FRAMES, size, backend="decord")),
                ("decord, 2 threads", lambda p: read_clip(p, None, FRAMES, size, backend="decord", threads=2)),
                ("PyAV backend, 1 thread (pvl_search.media.video)", lambda p: read_clip(p, None, FRAMES, size, backend="pyav")),
                ("plain PyAV seek-and-decode loop, 1 thread", lambda p: plain_pyav(p, size)),
            ]:  # fmt: skip
                rows.setdefault(row, {})[label] = rate(group, decode)
            rows.setdefault("DecodePool, 1 single-thread worker", {})[label] = pool_rate(group, size, 1)
            rows.setdefault("DecodePool, 2 single-thread workers", {})[label] = pool_rate(group, size, 2)
        labels = list(next(iter(rows.values())))
        print(f"8 frames per video, output {size}x{size}, videos/s (higher is better)\n")
        print("| decoder | " + " | ".join(labels) + " |")
        print("|---|" + "---:|" * len(labels))
        for row, values in rows.items():
            print(f"| {row} | " + " | ".join(f"{values[label]:.1f}" for label in labels) + " |")


if __name__ == "__main__":
    main()
