"""Garbage collection in a loaded server process: Python's collector as shipped against
`pvl_web.heap.settle_heap` (start-up's objects frozen, a larger young generation), as ratios in
one run.

One process holds what a `pvl-search serve` process holds (a random-weight model of `--config`,
an index of short clips, the FastAPI app), then, in each setting, alternated `--rounds` times:

- a full collection (`gc.collect()`), timed: the pause every request in flight waits out;
- `--searches` requests to the app's `/search` (Starlette's in-process test client: the
  routing, validation, batcher and JSON a served search goes through, without a socket; fresh
  texts), with the collector's own callbacks counting the collections they set off and the
  time they took.

    python benchmarks/gc_pause.py [--config tiny] [--videos 12] [--searches 300] [--rounds 2]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))


class CollectionClock:
    """Counts the collector's runs per generation and the seconds they took (gc.callbacks)."""

    def __init__(self) -> None:
        self.runs = [0, 0, 0]
        self.seconds = [0.0, 0.0, 0.0]
        self._began = 0.0

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._began = time.perf_counter()
        else:
            self.runs[info["generation"]] += 1
            self.seconds[info["generation"]] += time.perf_counter() - self._began


def full_collection_ms(repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        gc.collect()
        times.append((time.perf_counter() - began) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="tiny", help="model preset (random weights)")
    parser.add_argument("--videos", type=int, default=12)
    parser.add_argument("--searches", type=int, default=300, help="searches per setting per round")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    import torch
    from dtype_speed import index_once, make_clips
    from starlette.testclient import TestClient

    from indexer.encoding import ModelRunner
    from indexer.search.searcher import Searcher
    from pvl_search.model.checkpoint import save_model
    from pvl_search.model.config import preset
    from pvl_search.model.perceiver import PerceiverVL
    from pvl_search.precision import describe_cpu
    from pvl_web.heap import settle_heap
    from server import create_app

    defaults = gc.get_threshold()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        torch.manual_seed(0)
        model_dir = save_model(PerceiverVL(preset(args.config)), root / "model")
        runner = ModelRunner.from_folder(model_dir, device="cpu")
        index_once(make_clips(root / "clips", args.videos), runner, root / "index")
        with Searcher(root / "index", runner=runner, query_cache=0) as searcher:
            client = TestClient(create_app(searcher)).__enter__()
            clock = CollectionClock()
            gc.callbacks.append(clock)
            results: dict[str, dict[str, list[float]]] = {}
            counter = 0
            for _ in range(args.rounds):
                for setting in ("as shipped", "settle_heap"):
                    if setting == "settle_heap":
                        frozen = settle_heap()
                    else:
                        gc.unfreeze()
                        gc.set_threshold(*defaults)
                    row = results.setdefault(setting, {"full_ms": [], "objects": [], "young_per_1k": [],
                                                       "gc_ms_per_search": [], "full_runs": []})
                    row["objects"].append(len(gc.get_objects()))
                    row["full_ms"].append(full_collection_ms())
                    runs, seconds = list(clock.runs), list(clock.seconds)
                    for _ in range(args.searches):
                        reply = client.get("/search", params={"q": f"a red circle moves left, take {counter}"})
                        assert reply.status_code == 200, reply.text
                        counter += 1
                    row["young_per_1k"].append(1000 * (clock.runs[0] - runs[0]) / args.searches)
                    row["full_runs"].append(clock.runs[2] - runs[2])
                    row["gc_ms_per_search"].append(1000 * (sum(clock.seconds) - sum(seconds)) / args.searches)
            gc.callbacks.remove(clock)
            client.__exit__(None, None, None)

    print(f"CPU: {describe_cpu()}")
    print(f"{args.config} model (random weights), {args.videos} videos, {args.searches} searches per setting "
          f"per round, {args.rounds} rounds alternated; {frozen} objects frozen by settle_heap; medians\n")
    print("| collector | objects it walks | full collection ms | young collections per 1,000 searches | "
          "full collections in the searches | collector ms per search |")
    print("|---|---:|---:|---:|---:|---:|")
    for setting, row in results.items():
        print(f"| {setting} | {statistics.median(row['objects']):,.0f} | {statistics.median(row['full_ms']):.1f} | "
              f"{statistics.median(row['young_per_1k']):.0f} | {sum(row['full_runs'])} | "
              f"{statistics.median(row['gc_ms_per_search']):.3f} |")


if __name__ == "__main__":
    main()
