"""Issue #16, measured in one run: Ray indexing with 2 workers vs 1 and vs the local pipeline,
Milvus Lite vs FAISS query latency at 100k clustered vectors, and bytes per segment in each
store (the numbers docs/deploy.md extrapolates from).

    PYTHONPATH=. python3 benchmarks/scale_out.py [--videos 24] [--vectors 100000]

Prints a Markdown block for BENCHMARKS.md. The corpus is decode-bound on purpose (larger
frames than the model reads, 10 fps), since decoding is what Ray spreads over machines; the
model is the shipped tiny one in float32 on CPU.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def make_corpus(folder: Path, n: int, seconds: float) -> None:

    from pvl_search.media.sample_files import write_video

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        base = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)

        def frame(index: int, width: int, height: int, base=base) -> np.ndarray:  # noqa: ANN001
            tile = np.roll(base, index, axis=1).repeat(height // 30 + 1, 0).repeat(width // 40 + 1, 1)
            return np.ascontiguousarray(tile[:height, :width])

        write_video(folder / f"v{i:03d}.mp4", width=320, height=240, fps=10, seconds=seconds, frame_fn=frame)


def index_once(corpus: Path, out: Path, runner, *, ray_workers: int | None, decode_workers: int) -> dict:  # noqa: ANN001
    from indexer.ingest.pipeline import IndexOptions, build_index
    from indexer.ingest.ray_producer import RayOptions
    from indexer.store.index_store import IndexStore

    ray = None if ray_workers is None else RayOptions("local", ray_workers, files_per_task=2, dtype="float32")
    options = IndexOptions(workers=decode_workers, ray=ray, thumbnails=True)
    first: list[float] = []
    began = time.perf_counter()

    def progress(_p) -> None:  # noqa: ANN001
        if not first:
            first.append(time.perf_counter())

    with IndexStore(out) as store:
        summary = build_index([corpus], store, runner, options, progress=progress)
    end = time.perf_counter()
    assert not summary.failed, summary.failed
    return {"seconds": end - began, "segments": summary.segments, "videos": summary.indexed,
            "steady_s": end - first[0] if first else end - began}


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


def clustered(n: int, d: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(256, d))
    x = centres[rng.integers(0, 256, n)] + 0.35 * rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def query_latency(n: int, d: int, width: int, work: Path, queries: int = 100) -> dict:
    from indexer.store.vectors.faiss_index import VectorIndex
    from indexer.store.vectors.milvus import MilvusVectors

    xb, xq = clustered(n, d), clustered(queries, d, seed=1)
    ids = np.arange(n, dtype=np.int64)
    faiss_index = VectorIndex(d, factory="Flat")
    faiss_index.add(xb, ids)
    states = np.zeros((n, width), np.float32)
    t0 = time.perf_counter()
    milvus = MilvusVectors(d, width, str(work / "bench.db"), "bench", lambda i: states[i])
    milvus.add(xb, ids)
    milvus.save(work / "bench.json")
    insert_s = time.perf_counter() - t0
    out = {"insert_s": insert_s, "milvus_bytes": dir_bytes(work / "bench.db")}
    agree = 0
    for name, index in (("faiss", faiss_index), ("milvus", milvus)):
        index.search(xq[:1], 10)  # warm
        times = []
        for q in xq:
            t = time.perf_counter()
            index.search(q[None], 10)
            times.append((time.perf_counter() - t) * 1000)
        out[name] = (statistics.median(times), float(np.percentile(times, 95)))
    _, a = faiss_index.search(xq[:20], 10)
    _, b = milvus.search(xq[:20], 10)
    agree = float(np.mean([len(set(x) & set(y)) / 10 for x, y in zip(a.tolist(), b.tolist())]))
    out["agreement"] = agree
    milvus.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=24)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--vectors", type=int, default=100_000)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    import ray
    import torch

    from indexer.encoding import ModelRunner

    torch.set_num_threads(1)
    runner = ModelRunner.from_folder(None, device="cpu", dtype="float32")
    work = Path(tempfile.mkdtemp(prefix="pvl-scale-out-"))
    try:
        corpus = work / "corpus"
        make_corpus(corpus, args.videos, args.seconds)
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=256 * 1024**2, log_to_driver=False,
                 configure_logging=False)
        runs = {}
        for label, ray_workers, decode in (("local, 1 decode worker", None, 1), ("Ray, 1 worker", 1, 1),
                                           ("local, 2 decode workers", None, 2), ("Ray, 2 workers", 2, 1)):
            runs[label] = index_once(corpus, work / label.replace(" ", "_").replace(",", ""), runner,
                                     ray_workers=ray_workers, decode_workers=decode)
        ray.shutdown()
        folder = work / "Ray_2_workers"
        rows = runs["Ray, 2 workers"]["segments"]
        sizes = {name: dir_bytes(folder / name) / rows for name in
                 ("embeddings.f16", "rerank_states.f16", "latents.f16", "thumbnails", "index.sqlite", "vectors.faiss")
                 if (folder / name).exists()}
        d, width = runner.config.embed_dim, runner.config.rerank_state_width
        latency = query_latency(args.vectors, d, width, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    rate = {k: v["segments"] / v["seconds"] for k, v in runs.items()}
    steady = {k: v["segments"] / v["steady_s"] for k, v in runs.items()}
    print(f"\n## Scale-out (issue #16): `PYTHONPATH=. python3 benchmarks/scale_out.py "
          f"--videos {args.videos} --seconds {args.seconds:g} --vectors {args.vectors}`\n")
    print(f"{args.videos} videos of {args.seconds:g} s, 320x240 at 10 fps ({runs['Ray, 2 workers']['segments']} "
          f"segments), shipped tiny model, float32, CPU, {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.1f} at the end.\n")
    print("| run | wall s | segments/s | segments/s after the first video |")
    print("|---|---:|---:|---:|")
    for k, v in runs.items():
        print(f"| {k} | {v['seconds']:.1f} | {rate[k]:.2f} | {steady[k]:.2f} |")
    print()
    r2, r1 = "Ray, 2 workers", "Ray, 1 worker"
    print(f"- Ray 2 workers vs 1: **{rate[r2] / rate[r1]:.2f}x** wall ({steady[r2] / steady[r1]:.2f}x after "
          "the first video; goal 1.6x).")
    for n in (1, 2):
        ray_k = "Ray, 1 worker" if n == 1 else "Ray, 2 workers"
        loc_k = f"local, {n} decode worker" + ("s" if n > 1 else "")
        print(f"- Ray {n} vs local with {n} decode worker(s): Ray takes {runs[ray_k]['seconds'] / runs[loc_k]['seconds']:.2f}x "
              f"the local wall time ({steady[loc_k] / steady[ray_k]:.2f}x after the first video; goal <= 1.15x).")
    print("\nBytes per segment (Ray, 2 workers index): " + ", ".join(f"{k} {v:.0f}" for k, v in sizes.items()))
    print(f"\nQuery latency, {args.vectors} clustered vectors of d={d}, k=10, one query at a time (100 queries):\n")
    print("| store | p50 ms | p95 ms |")
    print("|---|---:|---:|")
    for name, label in (("faiss", "FAISS Flat (in process)"), ("milvus", "Milvus Lite FLAT (.db, gRPC in process)")):
        print(f"| {label} | {latency[name][0]:.2f} | {latency[name][1]:.2f} |")
    print(f"\nMilvus Lite: inserting {args.vectors} vectors + rerank states took {latency['insert_s']:.1f} s; "
          f"{latency['milvus_bytes'] / args.vectors:.0f} bytes per segment on disk (d={d} float32 + "
          f"{width} float32 rerank state); top-10 agreement with FAISS {latency['agreement']:.3f}.")


if __name__ == "__main__":
    main()
