"""What the model's windows cost against the old fixed ones (issue #23), per hour of video.

Long videos are made with the moment benchmark's generator (`synth --long`: scenes of 3-4.5 s
cut hard, 64x64 at 8 fps, as the shipped model sees them), then indexed with the indexer
itself (`build_index`, the shipped model, SQLite + FAISS, thumbnails on) twice per repeat, once
with each setting, interleaved:

- old: 10 s windows every 5 s (the fixed default before windows followed the model);
- new: the shipped model's own, 3 s every 2 s and one window per shot (pvl_search/media/windows.py);
  the generator's scenes are cut hard, so each event is a shot: the most shot windows a video of
  3-4.5 s shots gets.

Reported per hour of video: segments, bytes of the index folder, and indexing seconds (median
of the repeats), and new / old for each.

    PYTHONPATH=. python benchmarks/window_cost.py [--videos 6] [--events 40] [--repeats 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from indexer.encoding import ModelRunner
from indexer.ingest.options import IndexOptions
from indexer.ingest.pipeline import build_index
from indexer.store.index_store import IndexStore
from pvl_search.data.long_synth import generate_long_corpus
from pvl_search.media.windows import LEGACY_STRIDE_S, LEGACY_WINDOW_S, Windows, model_windows

SETTINGS = {"old": Windows(LEGACY_WINDOW_S, LEGACY_STRIDE_S, shots=False)}


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=6)
    parser.add_argument("--events", type=int, default=40, help="events per video (3-4.5 s each)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=77)
    args = parser.parse_args()
    runner = ModelRunner.from_folder(None)
    new = model_windows(runner.clip_s)
    settings = {**SETTINGS, "new": new}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        corpus = generate_long_corpus(root / "corpus", args.videos, args.events, args.seed)
        hours = corpus.seconds / 3600
        rows: dict[str, dict[str, list[float]]] = {name: {"segments": [], "bytes": [], "seconds": []}
                                                   for name in settings}
        for repeat in range(args.repeats):
            for name, windows in settings.items():
                folder = root / f"{name}-{repeat}"
                options = IndexOptions(window_s=windows.window_s, stride_s=windows.stride_s, shots=windows.shots)
                began = time.perf_counter()
                with IndexStore(folder) as store:
                    summary = build_index([root / "corpus" / "videos"], store, runner, options)
                rows[name]["seconds"].append(time.perf_counter() - began)
                rows[name]["segments"].append(summary.segments)
                rows[name]["bytes"].append(_folder_bytes(folder))
    print(f"{corpus.videos} videos, {corpus.seconds / 60:.1f} min in all, {args.repeats} repeats, "
          f"{runner.dtype_name}, torch threads as build_index sets them\n")
    print("| windows | window s | stride s | shots | segments / h | MB / h | indexing s / h |")
    print("|---|---:|---:|---|---:|---:|---:|")
    per_hour = {}
    for name, windows in settings.items():
        values = {key: statistics.median(v) / hours for key, v in rows[name].items()}
        per_hour[name] = values
        print(f"| {name} | {windows.window_s:g} | {windows.stride_s:g} | {'yes' if windows.shots else 'no'} | "
              f"{values['segments']:.0f} | {values['bytes'] / 1e6:.1f} | {values['seconds']:.0f} |")
    ratio = {key: per_hour["new"][key] / per_hour["old"][key] for key in per_hour["new"]}
    print(f"| new / old | | | | {ratio['segments']:.2f}x | {ratio['bytes']:.2f}x | {ratio['seconds']:.2f}x |")


if __name__ == "__main__":
    main()
