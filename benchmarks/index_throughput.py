"""Indexing throughput: end to end (build_index) against decoding alone and encoding alone.

All three on the same files in one run, with the shipped model size (a randomly initialised
`tiny` preset: the weights do not change the cost):

- decode alone: the `DecodePool` (2 single-thread workers, as build_index uses it) cutting
  each file into windows and sampling the model's frames, results consumed and dropped;
- encode alone: `ModelRunner.encode_clips` on the clips decoded above, batch 8;
- end to end: `build_index` into a fresh index (SQLite, stores fsynced per video), which
  decodes in the workers while the model encodes in this process.

Goal (issue 4): end to end >= 80% of the slower of the two alone, i.e. decoding and encoding
overlap. The files are made here: by default short clips (128x128, 3 s, 30 fps, libx264, a
moving texture plus noise, as in benchmarks/decode.py). A warm-up build first starts the
forkserver; the decode row then leaves worker start-up out (one warm-up job), the end-to-end
row keeps it in, as build_index starts its own pool. Each row is the median of `--repeats`
runs, interleaved.

    python benchmarks/index_throughput.py [--clips 80] [--repeats 3] [--size 128 --seconds 3 --fps 30]
                                          [--workers 2] [--device cpu|cuda] [--torch-threads N]
                                          [--config tiny|base] [--dtype auto|float32|bfloat16]

Prints a markdown table and where the end-to-end time went (start-up until the first batch
is encoded, encoder calls, index writes, the rest: waiting for decoded videos).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

# Only what the decode workers preload anyway (torch, PyAV, decord): each worker re-imports
# this file as __mp_main__ when it starts, and SQLAlchemy + Alembic + FAISS there would add
# ~1 s to the end-to-end row that the CLI (whose __main__ imports typer and rich) never pays.
import numpy as np  # noqa: E402
import torch  # noqa: E402

from pvl_search.media.decode_pool import DecodePool  # noqa: E402
from pvl_search.media.sample_files import write_video
from pvl_search.model.checkpoint import save_model  # noqa: E402
from pvl_search.model.config import preset  # noqa: E402
from pvl_search.model.perceiver import PerceiverVL  # noqa: E402

if TYPE_CHECKING:
    from indexer.encoding import ModelRunner
    from indexer.ingest.pipeline import IndexOptions

BATCH = 8


def textured(index: int, width: int, height: int, seed: int = 0) -> np.ndarray:
    """A texture drifting by 2 pixels a frame, plus noise: costs a decoder real work."""
    y, x = np.mgrid[0:height, 0:width]
    base = 128 + 60 * np.sin((x + 2 * index + seed) / 7.0) * np.cos((y - index) / 11.0)
    noise = np.random.default_rng(index + 1000 * seed).normal(0, 8, (height, width))
    grey = np.clip(base + noise, 0, 255).astype(np.uint8)
    return np.stack([grey, np.roll(grey, 5, axis=1), 255 - grey], axis=-1)


def make_clips(folder: Path, count: int, size: int, seconds: float, fps: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return [
        write_video(folder / f"clip{i:03d}.mp4", width=size, height=size, fps=fps, seconds=seconds,
                    frame_fn=lambda j, w, h, i=i: textured(j, w, h, seed=i))
        for i in range(count)
    ]  # fmt: skip


def decode_alone(files: list[Path], runner: ModelRunner, options: IndexOptions) -> tuple[float, list]:
    """(seconds, decoded videos) through the pool, as build_index submits the jobs."""
    config = runner.config
    from indexer.ingest.window_choice import choose_windows

    # The windows build_index would choose for a new index with this model (options may leave them open).
    windows = choose_windows(options.window_s, options.stride_s, recorded=None, holds_videos=False,
                             clip_s=runner.clip_s, reindex=False)
    with DecodePool(options.workers, options.timeout_s, options.backend) as pool:
        list(pool.imap([(0, str(files[0]), windows, config.frames, config.frame_size)] * options.workers))
        start = time.perf_counter()
        out = [r for _, r in pool.imap((str(p), str(p), windows, config.frames, config.frame_size) for p in files)]
        elapsed = time.perf_counter() - start
    assert not any(isinstance(r, Exception) for r in out), [r for r in out if isinstance(r, Exception)]
    return elapsed, out


def encode_alone(decoded: list, runner: ModelRunner, batch_size: int) -> float:
    clips = [clip for video in decoded for clip in video.clips]
    frames, masks = np.stack([c.frames for c in clips]), np.stack([c.mask for c in clips])
    start = time.perf_counter()
    for lo in range(0, len(clips), batch_size):
        runner.encode_clips(frames[lo : lo + batch_size], masks[lo : lo + batch_size])
    return time.perf_counter() - start


class Timed:
    """Wraps a bound method and adds up the seconds spent in it."""

    def __init__(self, method) -> None:  # noqa: ANN001
        self.method, self.seconds, self.first = method, 0.0, None

    def __call__(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN204
        start = time.perf_counter()
        self.first = self.first or start
        try:
            return self.method(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start


def end_to_end(files: list[Path], runner: ModelRunner, options: IndexOptions, folder: Path) -> tuple[float, dict]:
    """(seconds, breakdown) of build_index into a fresh index folder."""
    from indexer.ingest.pipeline import build_index
    from indexer.store.index_store import IndexStore

    encode = Timed(runner.encode_clips)
    runner.encode_clips = encode  # instance attribute: shadows the method for this run
    try:
        with IndexStore(folder) as store:
            write = Timed(store.add_video)
            store.add_video = write
            began = time.perf_counter()
            summary = build_index(files, store, runner, options)
    finally:
        del runner.encode_clips
    assert summary.indexed == len(files) and not summary.failed, summary
    start_up = encode.first - began
    return summary.seconds, {
        "start-up (scan, pool start, first batch decoded)": start_up,
        "encoding": encode.seconds,
        "writing (fsync + SQL commit + FAISS add per video)": write.seconds,
        "waiting for decoded videos + other": summary.seconds - start_up - encode.seconds - write.seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=80)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", type=int, default=128, help="clip width and height")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--fps", type=int, default=30)
    parser.add_argument("--workers", type=int, default=2, help="decoder processes")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--torch-threads", type=int, default=None, help="torch threads in this process")
    parser.add_argument("--config", default="tiny", help="model preset (random weights)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    args = parser.parse_args()
    from indexer.encoding import ModelRunner
    from indexer.ingest.pipeline import IndexOptions

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    options = IndexOptions(batch_size=BATCH, workers=args.workers)
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        files = make_clips(tmp_path / "clips", args.clips, args.size, args.seconds, args.fps)
        torch.manual_seed(0)
        save_model(PerceiverVL(preset(args.config)), tmp_path / "model")
        runner = ModelRunner.from_folder(tmp_path / "model", device=args.device, dtype=args.dtype)
        end_to_end(files[:4], runner, options, tmp_path / "warm-up")  # forkserver, first calls

        times: dict[str, list[float]] = {"decode": [], "encode": [], "end": []}
        breakdowns = []
        for repeat in range(args.repeats):
            seconds, decoded = decode_alone(files, runner, options)
            times["decode"].append(seconds)
            times["encode"].append(encode_alone(decoded, runner, options.batch_size))
            seconds, breakdown = end_to_end(files, runner, options, tmp_path / f"index{repeat}")
            times["end"].append(seconds)
            breakdowns.append(breakdown)
            del decoded

    rate = {k: len(files) / statistics.median(v) for k, v in times.items()}
    slower = min(rate["decode"], rate["encode"])
    print(f"{len(files)} clips {args.size}x{args.size} {args.seconds:g} s {args.fps} fps -> {options.workers} "
          f"decode workers, model `tiny` ({runner.config.frames} frames {runner.config.frame_size}px), batch "
          f"{options.batch_size}, torch threads {torch.get_num_threads()}, {runner.device}, median of {args.repeats}\n")
    print("| what | videos/s | runs (s) |")
    print("|---|---:|---|")
    for name, key in (("decode alone (DecodePool)", "decode"), ("encode alone (encode_clips)", "encode"),
                      ("end to end (build_index)", "end")):
        print(f"| {name} | {rate[key]:.1f} | {', '.join(f'{t:.2f}' for t in times[key])} |")
    sequential = 1 / (1 / rate["decode"] + 1 / rate["encode"])
    print(f"\nend to end / slower alone = {rate['end'] / slower:.0%} (goal >= 80%); "
          f"no overlap at all would give {sequential:.1f} videos/s ({sequential / slower:.0%})")
    median = {k: statistics.median(b[k] for b in breakdowns) for k in breakdowns[0]}
    total = statistics.median(times["end"])
    print("end-to-end time: " + ", ".join(f"{k} {v:.2f} s ({v / total:.0%})" for k, v in median.items()))
    load = os.getloadavg()
    print(f"load average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
