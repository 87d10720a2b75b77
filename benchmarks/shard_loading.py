"""Shard loading (issue 26): training samples/s read from shards against decoding the same
videos on the fly, one process, as a ratio measured in one run. Goal: shards >= 5x.

Both sides produce what a training step takes from a sample: uint8 frames (F, S, S, 3), the
frame mask and the token ids of the epoch's caption (`caption_choice`, tokenised with the
model's text length):

- on the fly: `read_clip(path, None, F, S, backend="auto", fit="crop", threads=1)`, the call a
  `DecodePool` worker makes for the frame cache (one clip over the whole video, decord, one
  thread), here in-process, then the tokeniser;
- shards: the same frames written with `format.write_samples` (16 samples per shard), read
  back through `ShardStream` (loader_workers=0: everything a training worker does before
  batching), with its default shuffle buffer of 256 and with none (buffer 0). With fewer
  videos than the buffer holds, the buffered run keeps the whole epoch in memory, so every
  sample's frames land in freshly allocated pages (a page fault per 4 KiB): the worst case.

Per config (its preset's frames and frame size), the videos are decoded once to write the
shards (untimed), then both sides run `--repeats` times alternately; the median samples/s of
each and the ratio of the medians are reported. Files come from the page cache on both sides.
The videos are synthetic (`pvl_search.data.synth.generate_corpus`: 3 s at 8 fps, rendered at
the config's frame size, libx264) unless `--videos-from` names a captions file.

    python benchmarks/shard_loading.py [--configs tiny,base] [--videos 64] [--repeats 3]
        [--videos-from captions.json] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pvl_search.data.captions import CaptionRecord, load_captions  # noqa: E402
from pvl_search.data.synth import generate_corpus  # noqa: E402
from pvl_search.media.video import read_clip  # noqa: E402
from pvl_search.model.config import preset  # noqa: E402
from pvl_search.model.tokenizer import Tokenizer  # noqa: E402
from pvl_search.precision import describe_cpu  # noqa: E402
from pvl_search.shards.format import (  # noqa: E402
    Manifest,
    Sample,
    ShardEntry,
    SplitManifest,
    file_sha256,
    sample_key,
    shard_name,
    write_samples,
)
from pvl_search.shards.reader import ShardStream, caption_choice  # noqa: E402

PER_SHARD = 16
BUFFER = 256  # ShardStream's default shuffle buffer
SEED = 0


def on_the_fly(records: list[CaptionRecord], frames: int, size: int, tokenizer: Tokenizer, epoch: int) -> float:
    """samples/s decoding each video in-process as a decode worker does, plus its caption's tokens."""
    start = time.perf_counter()
    for i, r in enumerate(records):
        clip = read_clip(r.path, None, frames, size, backend="auto", fit="crop", threads=1)
        key = sample_key("train", i)
        tokens = tokenizer(r.captions[caption_choice(SEED, epoch, key, len(r.captions))])[0]
        assert clip.frames.shape == (frames, size, size, 3) and tokens.shape == (tokenizer.text_length,)
    return len(records) / (time.perf_counter() - start)


def from_shards(folder: Path, text_length: int, epoch: int, expected: int, buffer: int) -> float:
    """samples/s through a single-process ShardStream."""
    start = time.perf_counter()
    stream = ShardStream(folder, "train", text_length=text_length, seed=SEED, epoch=epoch, shuffle_buffer=buffer)
    count = sum(1 for _ in stream)
    assert count == expected
    return count / (time.perf_counter() - start)


def write_shards(records: list[CaptionRecord], folder: Path, frames: int, size: int) -> int:
    """Decode every video once and write its frames as shards; returns the bytes written."""
    folder.mkdir(parents=True)
    entries = []
    for number, first in enumerate(range(0, len(records), PER_SHARD)):
        samples = []
        for i, r in enumerate(records[first:first + PER_SHARD], start=first):
            clip = read_clip(r.path, None, frames, size, backend="auto", fit="crop", threads=1)
            samples.append(Sample(sample_key("train", i), r.video_id, clip.frames, clip.mask, r.captions,
                                  {k: v for k, v in r.meta.items() if k == "group"}))
        name = shard_name("train", number)
        with open(folder / name, "wb") as f:
            write_samples(f, samples)
        entries.append(ShardEntry(name, len(samples), file_sha256(folder / name)))
    Manifest(frames, size, {"clips": 1, "fit": "crop"}, "benchmark", {"train": SplitManifest(entries)},
             PER_SHARD).write(folder)
    return sum((folder / e.name).stat().st_size for e in entries)


def measure(name: str, records: list[CaptionRecord], tmp: Path, repeats: int) -> dict:
    config = preset(name)
    frames, size = config.frames, config.frame_size
    tokenizer = Tokenizer(config.text_length)
    tokenizer("warm up")  # loads the BPE once, outside the timings
    folder = tmp / f"shards-{name}"
    shard_bytes = write_shards(records, folder, frames, size)
    decode_rates, shard_rates, ordered_rates = [], [], []
    for epoch in range(repeats):  # alternated, so load on the machine hits both alike
        decode_rates.append(on_the_fly(records, frames, size, tokenizer, epoch))
        shard_rates.append(from_shards(folder, config.text_length, epoch, len(records), BUFFER))
        ordered_rates.append(from_shards(folder, config.text_length, epoch, len(records), 0))
    decode, shards = statistics.median(decode_rates), statistics.median(shard_rates)
    ordered = statistics.median(ordered_rates)
    return {"config": name, "frames": frames, "size": size, "videos": len(records),
            "video_bytes": sum(r.path.stat().st_size for r in records), "shard_bytes": shard_bytes,
            "on_the_fly_samples_per_s": decode, "shards_samples_per_s": shards, "ratio": shards / decode,
            "shards_unshuffled_samples_per_s": ordered, "unshuffled_ratio": ordered / decode,
            "on_the_fly_runs": decode_rates, "shards_runs": shard_rates, "shards_unshuffled_runs": ordered_rates}


def synthetic_videos(tmp: Path, n: int, size: int) -> list[CaptionRecord]:
    summary = generate_corpus(tmp / f"videos-{size}", n, SEED, size=size, fps=8, seconds=3.0, workers=2,
                              splits=(1.0, 0.0, 0.0))
    return load_captions(summary.captions_path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="tiny,base", help="model presets, comma-separated")
    parser.add_argument("--videos", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--videos-from", type=Path, default=None, help="a captions file (its first --videos videos)")
    parser.add_argument("--json", type=Path, default=None, help="write all measurements here")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        given = None
        if args.videos_from is not None:
            given = [r for r in load_captions(args.videos_from) if r.path.is_file() and r.captions][: args.videos]
        for name in args.configs.split(","):
            records = given if given is not None else synthetic_videos(tmp, args.videos, preset(name).frame_size)
            rows.append(measure(name, records, tmp, args.repeats))
            print(f"{name}: done", file=sys.stderr)
    print(f"{describe_cpu()}, one process; median of {args.repeats} runs, samples/s (higher is better)\n")
    print(f"| config | frames x size | videos | on-the-fly decode | shards, buffer {BUFFER} | ratio | "
          "shards, buffer 0 | ratio | video MB | shard MB |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['config']} | {r['frames']} x {r['size']} | {r['videos']} | {r['on_the_fly_samples_per_s']:.1f} | "
              f"{r['shards_samples_per_s']:.1f} | **{r['ratio']:.1f}x** | {r['shards_unshuffled_samples_per_s']:.1f} | "
              f"{r['unshuffled_ratio']:.1f}x | {r['video_bytes'] / 1e6:.2f} | {r['shard_bytes'] / 1e6:.2f} |")
    if args.json:
        args.json.write_text(json.dumps({"cpu": describe_cpu(), "repeats": args.repeats, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
