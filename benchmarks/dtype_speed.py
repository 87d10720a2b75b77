"""bfloat16 against float32 at the base config: indexing throughput, single-query latency and
how far the embeddings move, as ratios measured in one run.

One process, one model (random weights of the `base` preset unless `--model` names a trained
folder: the cost does not depend on the weights, the cosine does), the same clips and the same
queries for both dtypes:

- indexing: `build_index` into a fresh index (SQLite, 2 decode workers, batch 8), once per
  dtype per repeat, the dtypes alternated; videos/s;
- single query: `Searcher.search` (tokenise + text encoder + FAISS + mixed rerank of the top
  50), query cache off, each query answered in both dtypes one after the other with the
  order alternated; p50 of each and the median of the paired ratios;
- the video encoder alone, in the same run, on a batch of 8 of the same clips already decoded:
  `encode_video` on model-ready tensors (the forward pass), and `ModelRunner.encode_clips` from
  uint8 frames (adds normalising, the cast and the rerank states); videos/s of each, so the
  indexing speed-up can be read against the encoder's own (issue #25: indexing >= 0.85 of it);
- where a single query's time goes: the p50 of each stage the search reports (encode, retrieve,
  rerank, lookup, moments) in each dtype;
- agreement: cosine between the two indexes' stored embeddings (per segment) and between the
  two runners' query embeddings; the rerank states' largest relative error.

`--dtype auto` is what the CLI does by default; the script says what it resolved to (on a CPU
without native bf16 it is float32, and the ratio is then ~1 by design). Goals (issue 15):
indexing auto >= 2.5x float32 (issue #25: >= 0.85x the encoder-alone speed-up), single-query p50 auto <= 0.4x float32, cosine >= 0.999.

    python benchmarks/dtype_speed.py [--config base] [--clips 24] [--queries 30] [--repeats 2]
        [--dtype auto] [--model DIR] [--json out.json] [--smoke]

`--smoke`: a few clips and queries, to check the script runs (numbers meaningless).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Light imports only at module level: each decode worker re-imports this file when it starts.
import numpy as np  # noqa: E402
import torch  # noqa: E402


def make_clips(folder: Path, count: int) -> list[Path]:
    from pvl_search.media.sample_files import write_video

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    files = []
    for i in range(count):
        colour = rng.integers(0, 256, 3).astype(np.uint8)
        files.append(write_video(
            folder / f"clip{i:03d}.mp4", width=128, height=128, fps=8, seconds=3.0,
            frame_fn=lambda j, w, h, c=colour: np.roll(np.broadcast_to(c, (h, w, 3)) *
                                                       (np.arange(w)[None, :, None] % 16 < 8), 2 * j, 1)))
    return files


def query_text(i: int) -> str:
    colours, shapes = ["red", "green", "blue", "yellow", "white"], ["circle", "square", "triangle", "star"]
    return f"a {colours[i % 5]} {shapes[i // 5 % 4]} moves {'left' if i % 2 else 'right'} then stops, take {i}"


def encoder_rates(files: list[Path], runners: dict, rounds: int) -> dict[str, dict[str, float]]:
    """Videos/s of the forward pass alone and of `encode_clips`, per runner, on one batch of 8
    decoded clips (median of `rounds` alternated rounds of 3 calls each)."""
    from pvl_search.media.video import read_clip, to_model_input

    some = next(iter(runners.values())).config
    clips = [read_clip(f, None, some.frames, some.frame_size) for f in files[:8]]
    frames, masks = np.stack([c.frames for c in clips]), np.stack([c.mask for c in clips])
    x, m = to_model_input(frames, masks)
    ready = {name: x.to(r.model.dtype) for name, r in runners.items()}
    seconds: dict[str, dict[str, list[float]]] = {name: {"forward": [], "encode_clips": []} for name in runners}
    for rnd in range(rounds + 1):  # round 0 warms up
        for name in (list(runners) if rnd % 2 == 0 else list(runners)[::-1]):
            runner = runners[name]
            with torch.inference_mode():
                began = time.perf_counter()
                for _ in range(3):
                    runner.model.encode_video(ready[name], m, cross_layers=runner.cross_layers)
                forward = (time.perf_counter() - began) / 3
            began = time.perf_counter()
            for _ in range(3):
                runner.encode_clips(frames, masks)
            if rnd:
                seconds[name]["forward"].append(forward)
                seconds[name]["encode_clips"].append((time.perf_counter() - began) / 3)
    return {name: {stage: len(clips) / statistics.median(v) for stage, v in per.items()}
            for name, per in seconds.items()}


def index_once(files: list[Path], runner, folder: Path) -> float:  # noqa: ANN001 - a ModelRunner
    """Seconds of one build_index into a fresh folder."""
    from indexer.ingest.pipeline import IndexOptions, build_index
    from indexer.store.index_store import IndexStore

    with IndexStore(folder) as store:
        summary = build_index(files, store, runner, IndexOptions(batch_size=8, workers=2, thumbnails=False))
    assert summary.indexed == len(files) and not summary.failed, summary
    return summary.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="base", help="model preset (random weights) when --model is not given")
    parser.add_argument("--model", type=Path, default=None, help="a trained model folder instead")
    parser.add_argument("--clips", type=int, default=24)
    parser.add_argument("--queries", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=2, help="indexing runs per dtype, alternated")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16"], help="compared with float32")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--smoke", action="store_true", help="a few clips and queries: checks the script only")
    args = parser.parse_args()
    if args.smoke:
        args.clips, args.queries, args.repeats = min(args.clips, 3), min(args.queries, 3), 1

    from indexer.encoding import ModelRunner
    from indexer.search.searcher import Searcher
    from pvl_search.model.checkpoint import save_model
    from pvl_search.model.config import preset
    from pvl_search.model.perceiver import PerceiverVL

    began = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir = args.model
        if model_dir is None:
            torch.manual_seed(0)
            model_dir = save_model(PerceiverVL(preset(args.config)), root / "model")
        runners = {"float32": ModelRunner.from_folder(model_dir, device="cpu", dtype="float32"),
                   "fast": ModelRunner.from_folder(model_dir, device="cpu", dtype=args.dtype)}
        resolved = runners["fast"].dtype_name
        files = make_clips(root / "clips", args.clips)
        index_once(files[:2], runners["float32"], root / "warm-up")  # forkserver, first calls

        seconds: dict[str, list[float]] = {"float32": [], "fast": []}
        for repeat in range(args.repeats):
            for name in (("float32", "fast") if repeat % 2 == 0 else ("fast", "float32")):
                seconds[name].append(index_once(files, runners[name], root / f"index-{name}-{repeat}"))
        rate = {name: len(files) / statistics.median(s) for name, s in seconds.items()}
        alone = encoder_rates(files, runners, max(2, args.repeats))

        latency: dict[str, list[float]] = {"float32": [], "fast": []}
        stages: dict[str, dict[str, list[float]]] = {"float32": {}, "fast": {}}
        encoded = {}
        with Searcher(root / "index-float32-0", runner=runners["float32"], query_cache=0) as exact, \
                Searcher(root / "index-fast-0", runner=runners["fast"], query_cache=0) as fast:
            searchers = {"float32": exact, "fast": fast}
            for name in searchers:  # untimed: first calls
                searchers[name].search("warm up")
            for i in range(args.queries):
                for name in (("float32", "fast") if i % 2 == 0 else ("fast", "float32")):
                    started = time.perf_counter()
                    result = searchers[name].search(query_text(i), k=10, rerank_k=50, rerank="mixed")
                    latency[name].append(time.perf_counter() - started)
                    for stage, ms in result.timings_ms.items():
                        stages[name].setdefault(stage, []).append(ms)
            texts = [query_text(i) for i in range(args.queries)]
            for name in runners:
                encoded[name] = runners[name].encode_queries(texts)
            ids = exact.store.segment_ids()
            xa, xb = exact.store.embeddings(ids), fast.store.embeddings(ids)
            sa, sb = exact.store.rerank_states(ids), fast.store.rerank_states(ids)

    def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)

    video_cos, text_cos = cosines(xa, xb), cosines(encoded["float32"].embeddings, encoded["fast"].embeddings)
    state_err = float(np.abs(sa - sb).max() / np.abs(sa).max())
    p50 = {name: statistics.median(v) * 1000 for name, v in latency.items()}
    paired = statistics.median(f / e for f, e in zip(latency["fast"], latency["float32"]))
    model = str(args.model) if args.model else f"{args.config} (random weights)"
    load = os.getloadavg()
    from pvl_search.precision import describe_cpu

    print(f"CPU: {describe_cpu()}")
    print(f"model {model}; {args.dtype} resolved to {resolved} here; {len(files)} clips 128x128 3 s, "
          f"{args.repeats} indexing runs per dtype, {args.queries} queries; torch threads "
          f"{torch.get_num_threads()}; load average at the end {load[0]:.2f} on {os.cpu_count()} cores; "
          f"run {time.monotonic() - began:.0f} s\n")
    print(f"| what | float32 | {args.dtype} ({resolved}) | ratio | goal |")
    print("|---|---:|---:|---:|---|")
    print(f"| indexing, videos/s (median of {args.repeats}) | {rate['float32']:.2f} | {rate['fast']:.2f} | "
          f"{rate['fast'] / rate['float32']:.2f}x | >= 2.5x |")
    speedup = {stage: alone["fast"][stage] / alone["float32"][stage] for stage in ("forward", "encode_clips")}
    index_speedup = rate["fast"] / rate["float32"]
    for stage, what in (("forward", "video encoder forward pass alone"), ("encode_clips", "encode_clips (+ normalise, cast)")):
        print(f"| {what}, videos/s, batch 8 | {alone['float32'][stage]:.2f} | {alone['fast'][stage]:.2f} | "
              f"{speedup[stage]:.2f}x | indexing / this: {index_speedup / speedup[stage]:.2f} (>= 0.85) |")
    print(f"| single query p50 ms (encode + FAISS + mixed K=50) | {p50['float32']:.1f} | {p50['fast']:.1f} | "
          f"{p50['fast'] / p50['float32']:.2f} (paired median {paired:.2f}) | <= 0.4 |")
    for stage in stages["float32"]:
        a, b = (statistics.median(stages[n][stage]) for n in ("float32", "fast"))
        print(f"| - of it, {stage} p50 ms (as the search reports it) | {a:.2f} | {b:.2f} | "
              f"{b / a if a else float('nan'):.2f} | |")
    print(f"| video embedding cosine, min / median | | | {video_cos.min():.6f} / {np.median(video_cos):.6f} | >= 0.999 |")
    print(f"| query embedding cosine, min / median | | | {text_cos.min():.6f} / {np.median(text_cos):.6f} | >= 0.999 |")
    print(f"| rerank state, largest error / largest value | | | {state_err:.4f} | |")
    if args.json:
        args.json.write_text(json.dumps({
            "args": {k: str(v) for k, v in vars(args).items()}, "resolved": resolved,
            "index_seconds": seconds, "videos_per_s": rate, "encoder_alone_videos_per_s": alone,
            "query_stage_ms": stages, "query_seconds": latency, "p50_ms": p50,
            "paired_query_ratio": paired, "video_cosine": video_cos.tolist(), "query_cosine": text_cos.tolist(),
            "rerank_state_rel_error": state_err}, indent=2))


if __name__ == "__main__":
    main()
