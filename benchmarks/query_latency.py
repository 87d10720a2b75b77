"""Query-time cost of pvl-search at the paper's base config, measured in one run.

What one search costs, and what each rerank choice adds, over a 100k-segment corpus held
the way an index holds it: embeddings in a `VectorIndex` (exact Flat, the IVF it switches
to by itself past its threshold, and HNSW32), rerank states in a real float16
memory-mapped `RowStore`. Random weights (cost does not depend on them), float32, 2 threads,
`torch.inference_mode()`.

Corpus (clustered, because approximate indexes score near-zero recall on uniform noise):

  1. `--centres` synthetic videos (8 frames of 384x384: moving gratings, checkerboards,
     rings, moving blobs, noise, colour ramps, each with random colours and rates) are
     encoded by the base model -> their embeddings e_c (d = 256) and rerank states s_c
     (W = D + H = 780). A random-weight model maps every input into a narrow cone
     (pairwise cosine ~0.8-0.99); a trained contrastive model spreads them, so the
     centres' common mean is removed and they are re-normalised (both cosines printed).
  2. A two-level Gaussian mixture: `segments / --segments-per-video` "videos", each around a
     random centre (noise `--sigma-video`), each segment around its video (noise
     `--sigma-segment`); a noise of sigma has norm ~sigma; embeddings re-normalised.
     Rerank states get the same two-level perturbation, scaled per column by the spread of
     the centres' states (log-normaliser columns: absolute noise), independently of the
     embedding noise (they only need realistic values for timing).
  3. Queries for search are drawn near random segments (`--sigma-query`; a second, farther
     set `--sigma-query-far` for recall only, closer to a real text-video cosine): the random text
     encoder does not land near any video, a trained one would. The text itself is still
     tokenised and encoded in every timed query (same cost), and its rerank state is
     the one the rerank uses.

Recall@10 (and @50) of each approximate index is measured against exact search over
`--recall-queries` such queries, with the index's own default search parameters; the same
queries time each index's top-50 search alone (one query per call, round-robin).
End to end (tokenise + text encoder + top-50 [+ query rerank state + K rows read from the
RowStore + one batched `mixed_scores`]) is timed on the auto (IVF) and the exact index.

Timing: every per-query section runs its variants round-robin per query, the order
rotated each query, so that load from other processes on a shared machine hits all alike;
medians and p95 are reported. Components are timed inside each call too, and the
"paired" share (component / rest of the same call, median over queries) is what the goals
use where the difference of two medians would be below the noise. "CPU share" =
process CPU time / (wall x threads): well below 1 means our threads waited for others'.

Single-stream reranking runs the joint encoder on (video, text) pairs from random frames
already decoded and normalised (decoding is NOT counted: it only adds to single-stream).
The exhaustive single-stream cost over `--exhaustive` videos is extrapolated linearly
from the measured per-pair cost unless `--measure-exhaustive` is given.

Run:  python benchmarks/query_latency.py --segments 100000 --queries 50 --json out.json
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from indexer.store.row_store import RowStore  # noqa: E402
from indexer.store.vectors.faiss_index import VectorIndex  # noqa: E402
from pvl_search.media.video import to_model_input  # noqa: E402
from pvl_search.model.config import preset  # noqa: E402
from pvl_search.model.perceiver import PerceiverVL  # noqa: E402
from pvl_search.model.profiling import count_flops  # noqa: E402
from pvl_search.model.tokenizer import Tokenizer  # noqa: E402

SUBJECTS = ("a man", "a woman", "two children", "a dog", "a chef", "a cyclist", "a band", "a cat")
ACTIONS = ("rides a red bicycle", "cooks pasta", "plays guitar", "runs along", "dances", "paints a wall",
           "throws a ball", "opens a door")
PLACES = ("on a beach", "in a kitchen", "at night in the city", "in the snow", "on a stage",
          "in a park", "under heavy rain", "inside a busy train station")


# --------------------------------------------------------------------------- helpers
def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def pct(xs: list[float], q: float) -> float:
    """q-th percentile (linear interpolation) of xs."""
    return float(np.percentile(np.asarray(xs, dtype=np.float64), q))


def summary(xs: list[float]) -> dict[str, float]:
    return {"p50": pct(xs, 50), "p95": pct(xs, 95), "min": min(xs), "n": len(xs)}


class Section:
    """Wall and process-CPU time of a block, for the CPU-share column."""

    def __init__(self, threads: int) -> None:
        self.threads = threads

    def __enter__(self) -> Section:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *_: object) -> None:
        self.wall = time.perf_counter() - self.wall
        self.cpu = time.process_time() - self.cpu
        self.share = self.cpu / max(self.wall * self.threads, 1e-9)


def ms_since(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000


def normalise(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def queries_text(n: int, rng: np.random.Generator) -> list[str]:
    combos = [f"{s} {a} {p}" for s in SUBJECTS for a in ACTIONS for p in PLACES]
    return [combos[i] for i in rng.choice(len(combos), size=n, replace=n > len(combos))]


# --------------------------------------------------------------------------- corpus
def synthetic_videos(n: int, frames: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """n distinct synthetic clips, uint8 (n, F, S, S, 3)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    out = np.empty((n, frames, size, size, 3), np.uint8)
    for i in range(n):
        kind = i % 6
        c0, c1 = rng.uniform(0, 1, 3).astype(np.float32), rng.uniform(0, 1, 3).astype(np.float32)
        freq, speed, angle = rng.uniform(1, 12), rng.uniform(-1, 1), rng.uniform(0, np.pi)
        for t in range(frames):
            ph = t / frames
            if kind == 0:  # moving grating
                u = np.cos(angle) * xx + np.sin(angle) * yy
                a = 0.5 + 0.5 * np.sin(2 * np.pi * (freq * u + speed * 4 * ph))
            elif kind == 1:  # checkerboard, shifting
                cells = max(2, int(freq))
                a = ((np.floor(xx * cells + speed * t) + np.floor(yy * cells)) % 2).astype(np.float32)
            elif kind == 2:  # rings, pulsing
                a = 0.5 + 0.5 * np.cos(2 * np.pi * freq * np.hypot(xx - 0.5, yy - 0.5) - 6 * speed * ph)
            elif kind == 3:  # blob moving across
                cx, cy = (0.2 + 0.6 * ph) % 1.0, 0.5 + 0.3 * speed
                a = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * (0.02 + 0.01 * freq) ** 2))
            elif kind == 4:  # noise (new each frame)
                a = rng.uniform(0, 1, (size, size)).astype(np.float32)
            else:  # colour ramp, fading
                a = np.clip(np.cos(angle) * xx + np.sin(angle) * yy + speed * ph, 0, 1)
            img = c0 * a[..., None] + c1 * (1 - a[..., None])
            out[i, t] = np.clip(img * 255, 0, 255).astype(np.uint8)
    return out


def encode_centres(model: PerceiverVL, n: int, rng: np.random.Generator, batch: int = 8) -> dict[str, Any]:
    cfg = model.config
    embs, states, latents = [], [], []
    for lo in range(0, n, batch):
        clips = synthetic_videos(min(batch, n - lo), cfg.frames, cfg.frame_size, rng)
        x, m = to_model_input(clips, np.ones(clips.shape[:2], bool))
        out = model.encode_video(x, m)
        embs.append(out.embedding.numpy())
        states.append(model.rerank_state(out.latents).numpy())
        latents.append(out.latents.clone())
    return {"emb": np.concatenate(embs), "state": np.concatenate(states), "latents": torch.cat(latents)}


def mean_offdiag_cos(e: np.ndarray) -> float:
    g = e @ e.T
    n = len(e)
    return float((g.sum() - np.trace(g)) / (n * (n - 1)))


def build_corpus(
    centres: dict[str, Any], args: argparse.Namespace, rng: np.random.Generator, store: RowStore, heads: int
) -> dict[str, Any]:
    """Two-level mixture around the centres: embeddings returned, rerank states appended to `store`."""
    e_raw = centres["emb"]
    e_c = normalise(e_raw - e_raw.mean(0))
    s_c = centres["state"].astype(np.float32)
    d, w = e_c.shape[1], s_c.shape[1]
    hidden = w - heads
    # Per-column spread of the state: value means scale with the centres' spread; the
    # log-normalisers get absolute noise.
    scale = np.maximum(s_c.std(0), 1e-3).astype(np.float32)
    scale[hidden:] = 1.0

    n_videos = max(1, args.segments // args.segments_per_video)
    video_centre = rng.integers(0, len(e_c), n_videos)
    e_v = normalise(e_c[video_centre] + args.sigma_video * rng.standard_normal((n_videos, d)) / math.sqrt(d))
    s_v = s_c[video_centre] + args.sigma_state * scale * rng.standard_normal((n_videos, w)).astype(np.float32)
    seg_video = np.sort(rng.integers(0, n_videos, args.segments))  # segments of a video are neighbours
    xb = np.empty((args.segments, d), np.float32)
    chunk = 10_000
    for lo in range(0, args.segments, chunk):
        v = seg_video[lo : lo + chunk]
        noise = rng.standard_normal((len(v), d)).astype(np.float32) / math.sqrt(d)
        xb[lo : lo + chunk] = normalise(e_v[v] + args.sigma_segment * noise)
        s_noise = rng.standard_normal((len(v), w)).astype(np.float32)
        store.append(s_v[v] + 0.5 * args.sigma_state * scale * s_noise)
    store.flush()
    # Queries near random segments (a trained text encoder lands near its videos).
    n_q = max(args.queries, args.recall_queries)
    near = rng.integers(0, args.segments, n_q)
    xq = normalise(xb[near] + args.sigma_query * rng.standard_normal((n_q, d)).astype(np.float32) / math.sqrt(d))
    far = rng.integers(0, args.segments, args.recall_queries)
    noise = rng.standard_normal((len(far), d)).astype(np.float32) / math.sqrt(d)
    xq_far = normalise(xb[far] + args.sigma_query_far * noise)
    return {
        "xb": xb,
        "xq": xq,
        "xq_far": xq_far,
        "query_cos": float((xq[: len(near)] * xb[near]).sum(1).mean()),
        "query_far_cos": float((xq_far * xb[far]).sum(1).mean()),
        "centre_cos_raw": mean_offdiag_cos(e_raw),
        "centre_cos_centred": mean_offdiag_cos(e_c),
        "videos": n_videos,
    }


# --------------------------------------------------------------------------- the run
def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    t_start = time.perf_counter()
    load_start = os.getloadavg()
    cfg = preset("base")
    model = PerceiverVL(cfg).eval().requires_grad_(False)
    tok = Tokenizer(cfg.text_length)
    texts = queries_text(args.queries, rng)
    res: dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "config": "base",
        "threads": args.threads,
        "torch": torch.__version__,
        "faiss": faiss.__version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "loadavg_start": load_start,
        "sections": {},
    }
    def section(name: str, sec: Section) -> None:
        res["sections"][name] = {"wall_s": sec.wall, "cpu_share": sec.share}
        log(f"  {name}: {sec.wall:.1f} s, CPU share {sec.share:.2f}, load {os.getloadavg()[0]:.1f}")

    tmp = tempfile.TemporaryDirectory(prefix="pvl_query_bench_", dir=args.workdir)
    store = RowStore(Path(tmp.name) / "rerank_states.rows", cfg.rerank_state_width, dtype=np.float16)
    with torch.inference_mode():
        # ------------------------------------------------------------ 1. corpus
        log(f"encoding {args.centres} centre videos (base model) ...")
        with Section(args.threads) as sec:
            centres = encode_centres(model, args.centres, rng)
        section("encode centres", sec)
        log(f"building {args.segments} segments ...")
        with Section(args.threads) as sec:
            corpus = build_corpus(centres, args, rng, store, cfg.heads)
        section("build corpus", sec)
        xb, xq = corpus["xb"], corpus["xq"]
        ids = np.arange(args.segments, dtype=np.int64)
        res["corpus"] = {
            "segments": args.segments,
            "videos": corpus["videos"],
            "centres": args.centres,
            "centre_cos_raw": corpus["centre_cos_raw"],
            "centre_cos_centred": corpus["centre_cos_centred"],
            "query_cos": corpus["query_cos"],
            "query_far_cos": corpus["query_far_cos"],
            "rowstore_mb": store.nbytes / 2**20,
            "sigmas": {k: getattr(args, f"sigma_{k}") for k in ("video", "segment", "query", "query_far", "state")},
        }

        # ------------------------------------------------------------ indexes + recall
        indexes: dict[str, VectorIndex] = {}
        builds = [("exact", "Flat"), ("auto", None)] + ([("hnsw", "HNSW32")] if args.hnsw else [])
        for name, factory in builds:
            vi = VectorIndex(cfg.embed_dim, factory=factory)
            with Section(args.threads) as sec:
                vi.rebuild_from(xb, ids)
            section(f"build {name} ({vi.description})", sec)
            res.setdefault("indexes", {})[name] = {"description": vi.description, "build_s": sec.wall}
            indexes[name] = vi
        xr = xq[: args.recall_queries]
        recall: dict[str, dict[str, float]] = {}
        for tag, xs in (("", xr), ("far ", corpus["xq_far"])):
            _, gt = indexes["exact"].search(xs, 50)
            for name, vi in indexes.items():
                if name == "exact":
                    continue
                _, found = vi.search(xs, 50)
                r10 = np.mean([len(set(found[i, :10]) & set(gt[i, :10])) / 10 for i in range(len(xs))])
                r50 = np.mean([len(set(found[i]) & set(gt[i])) / 50 for i in range(len(xs))])
                recall.setdefault(name, {}).update({f"{tag}recall@10": float(r10), f"{tag}recall@50": float(r50)})
                res["indexes"][name].update(recall[name])
        ivf = faiss.try_extract_index_ivf(indexes["auto"]._index)
        res["indexes"]["exact"]["params"] = "exact"
        res["indexes"]["auto"]["params"] = (
            f"nprobe {indexes['auto']._nprobe(ivf)} (the wrapper's default, nlist/8)" if ivf else "exact (below threshold)"
        )
        if args.hnsw:
            res["indexes"]["hnsw"]["params"] = "efSearch max(128, 2k) (the wrapper's default)"
        log(f"  recall vs exact: {recall}")

        # ------------------------------------------------------------ FAISS search alone, per index
        # With 2 OpenMP threads, one query pays for waking the second thread; under load
        # that wait dominates, so each index is also timed with FAISS on 1 thread.
        order = [(name, th) for name in indexes for th in sorted({args.threads, 1}, reverse=True)]
        log(f"FAISS top-50 alone, one query at a time, {len(xr)} queries round-robin over {order} ...")
        search_ms: dict[tuple[str, int], list[float]] = {v: [] for v in order}
        with Section(args.threads) as sec:
            for name, th in order:
                faiss.omp_set_num_threads(th)
                indexes[name].search(xr[:1], 50)
            for i in range(len(xr)):
                for name, th in order[i % len(order):] + order[: i % len(order)]:
                    faiss.omp_set_num_threads(th)
                    t0 = time.perf_counter()
                    indexes[name].search(xr[i : i + 1], 50)
                    search_ms[(name, th)].append(ms_since(t0))
            faiss.omp_set_num_threads(args.threads)
        section("search alone", sec)
        for name, th in order:
            key = "search_ms" if th == args.threads else "search_ms_1thread"
            res["indexes"][name][key] = summary(search_ms[(name, th)])

        # ------------------------------------------------------------ 2. per-query latency
        def encode(text: str, m: PerceiverVL = model) -> tuple[Any, float]:
            t0 = time.perf_counter()
            out = m.encode_text(tok([text]))
            return out, ms_since(t0)

        def one_query(i: int, index: str, k_rerank: int) -> dict[str, float]:
            """Tokenise + encode query i, FAISS top-50 on `index`; with k_rerank, also its
            rerank state, the K rows from the RowStore and one batched mixed_scores call."""
            t = {}
            t0 = time.perf_counter()
            out, t["encode"] = encode(texts[i])
            t1 = time.perf_counter()
            _, found = indexes[index].search(xq[i : i + 1], 50)
            t["search"] = ms_since(t1)
            if k_rerank:
                t2 = time.perf_counter()
                q_state = model.rerank_state(out.latents)[0]
                t["query_state"] = ms_since(t2)
                t3 = time.perf_counter()
                rows_k = torch.from_numpy(store.get(found[0, :k_rerank]))
                t["read"] = ms_since(t3)
                t4 = time.perf_counter()
                model.mixed_scores(q_state, rows_k)
                t["score"] = ms_since(t4)
                t["rerank"] = t["query_state"] + t["read"] + t["score"]
            t["total"] = ms_since(t0)
            return t

        variants = [(name, k) for name in ("auto", "exact") for k in (0, 50)]
        log(f"per-query latency: {len(variants)} variants x {args.queries} queries, round-robin ...")
        timings: dict[tuple[str, int], list[dict[str, float]]] = {v: [] for v in variants}
        with Section(args.threads) as sec:
            for v in variants:  # warm-up
                one_query(0, *v)
            for i in range(args.queries):
                shift = i % len(variants)
                for v in variants[shift:] + variants[:shift]:
                    timings[v].append(one_query(i, *v))
        section("per-query latency", sec)
        res["per_query"] = {}
        for (name, k), ts in timings.items():
            key = f"{indexes[name].description} ({name}) {'+ mixed K=50' if k else 'retrieval only'}"
            entry = {c: summary([t[c] for t in ts]) for c in ts[0]}
            if k:
                entry["paired_rerank_share"] = statistics.median(
                    t["rerank"] / (t["encode"] + t["search"]) for t in ts
                )
            res["per_query"][key] = {"index": name, "k": k, **entry}

        # ------------------------------------------------------------ K=1000 vs encoding a query
        n_k = args.rerank_many
        _, top_many = indexes["exact"].search(xq[: args.queries], n_k)
        q_states = [model.rerank_state(encode(texts[i])[0].latents)[0] for i in range(args.queries)]
        enc_ms, many_ms, many_read, many_score = [], [], [], []

        def encode_query(i: int) -> None:
            t0 = time.perf_counter()
            out, _ = encode(texts[i])
            model.rerank_state(out.latents)
            enc_ms.append(ms_since(t0))

        def rerank_many(i: int) -> None:
            t0 = time.perf_counter()
            rows_k = torch.from_numpy(store.get(top_many[i]))
            t1 = time.perf_counter()
            model.mixed_scores(q_states[i], rows_k)
            many_read.append((t1 - t0) * 1000)
            many_score.append(ms_since(t1))
            many_ms.append(ms_since(t0))

        log(f"rerank K={n_k} vs query encode, {args.queries} rounds ...")
        with Section(args.threads) as sec:
            rerank_many(0)  # warm-up, not kept
            encode_query(0)
            for xs in (enc_ms, many_ms, many_read, many_score):
                xs.clear()
            for i in range(args.queries):
                pair = (encode_query, rerank_many) if i % 2 else (rerank_many, encode_query)
                for fn in pair:
                    fn(i)
        section(f"rerank {n_k} vs encode", sec)
        res["rerank_many"] = {
            "k": n_k,
            "encode_query": summary(enc_ms),
            "rerank": summary(many_ms),
            "rerank_read": summary(many_read),
            "rerank_score": summary(many_score),
            "paired_ratio": statistics.median(r / e for r, e in zip(many_ms, enc_ms)),
        }

        # ------------------------------------------------------------ 3. mixed vs single vs plain, K=50
        k = 50
        s = cfg.frame_size
        log(f"single-stream: {args.single_pairs} pairs x {args.single_repeats} rounds (random frames, pre-decoded) ...")
        frames_u8 = np.random.default_rng(args.seed + 1).integers(
            0, 256, (args.single_pairs, cfg.frames, s, s, 3), dtype=np.uint8
        )
        frames, fmask = to_model_input(frames_u8, np.ones((args.single_pairs, cfg.frames), bool))
        del frames_u8
        text_ids = tok([texts[0]])
        text_out = model.encode_text(text_ids)
        text_state = model.rerank_state(text_out.latents)[0]
        _, cand = indexes["auto"].search(xq[:1], k)
        vid_latents = centres["latents"][torch.arange(k) % len(centres["latents"])].contiguous()

        def single_pairs(n: int) -> float:
            t0 = time.perf_counter()
            for lo in range(0, n, args.single_batch):
                hi = min(n, lo + args.single_batch)
                model.single_stream_scores(frames[lo:hi], fmask[lo:hi], text_ids.expand(hi - lo, -1))
            return ms_since(t0)

        def mixed_k() -> float:
            t0 = time.perf_counter()
            model.mixed_scores(text_state, torch.from_numpy(store.get(cand[0])))
            return ms_since(t0)

        def mixed_k_with_encode() -> float:
            t0 = time.perf_counter()
            out = model.encode_text(tok([texts[0]]))
            st = model.rerank_state(out.latents)[0]
            model.mixed_scores(st, torch.from_numpy(store.get(cand[0])))
            return ms_since(t0)

        def mixed_k_1thread() -> float:
            torch.set_num_threads(1)
            try:
                return mixed_k()
            finally:
                torch.set_num_threads(args.threads)

        def plain_k() -> float:
            t0 = time.perf_counter()
            model.mixed_scores_plain(vid_latents, text_out.latents)
            return ms_since(t0)

        single_ms, mixed_ms, mixed_enc_ms, plain_ms, mixed1_ms = [], [], [], [], []
        with Section(args.threads) as sec:
            for warm_up in (lambda: single_pairs(min(2, args.single_pairs)), mixed_k, plain_k, mixed_k_with_encode):
                warm_up()
            for _round in range(args.single_repeats):
                for _ in range(3):
                    mixed_ms.append(mixed_k())
                    mixed1_ms.append(mixed_k_1thread())
                mixed_enc_ms.append(mixed_k_with_encode())
                plain_ms.append(plain_k())
                single_ms.append(single_pairs(args.single_pairs))
                plain_ms.append(plain_k())
                mixed_enc_ms.append(mixed_k_with_encode())
                for _ in range(3):
                    mixed1_ms.append(mixed_k_1thread())
                    mixed_ms.append(mixed_k())
        section("mixed vs single vs plain", sec)
        per_pair = statistics.median(single_ms) / args.single_pairs
        res["rerank_k50"] = {
            "single_pairs": args.single_pairs,
            "single_batch": args.single_batch,
            "single_ms_for_50": summary([m * k / args.single_pairs for m in single_ms]),
            "single_ms_per_pair": per_pair,
            "mixed": summary(mixed_ms),
            "mixed_1thread": summary(mixed1_ms),
            "mixed_with_query_encode": summary(mixed_enc_ms),
            "plain": summary(plain_ms),
        }

        # ------------------------------------------------------------ 4. exhaustive single-stream
        n_ex = args.exhaustive
        if args.measure_exhaustive:
            log(f"measuring exhaustive single-stream over {n_ex} pairs ...")
            big = frames[torch.arange(n_ex) % args.single_pairs]
            t0 = time.perf_counter()
            for lo in range(0, n_ex, args.single_batch):
                hi = min(n_ex, lo + args.single_batch)
                model.single_stream_scores(big[lo:hi], None, text_ids.expand(hi - lo, -1))
            exhaustive_ms, how = ms_since(t0), "measured"
        else:
            exhaustive_ms = per_pair * n_ex
            how = f"extrapolated: {n_ex} x median per-pair cost of the measured {args.single_pairs}-pair runs"
        res["exhaustive"] = {"videos": n_ex, "ms": exhaustive_ms, "how": how}
        frames = fmask = None  # free the pre-decoded clips before the FLOP count

        # ------------------------------------------------------------ FLOPs (load-independent cross-check)
        log("counting FLOPs ...")
        one_frames = torch.randn(1, cfg.frames, 3, s, s)
        rows50 = torch.from_numpy(store.get(cand[0]))
        rows_many = torch.from_numpy(store.get(top_many[0]))
        res["gflops"] = {
            "query encode": count_flops(lambda: model.rerank_state(model.encode_text(text_ids).latents)) / 1e9,
            "mixed K=50": count_flops(lambda: model.mixed_scores(text_state, rows50)) / 1e9,
            f"mixed K={n_k}": count_flops(lambda: model.mixed_scores(text_state, rows_many)) / 1e9,
            "plain K=50": count_flops(lambda: model.mixed_scores_plain(vid_latents, text_out.latents)) / 1e9,
            "single pair": count_flops(lambda: model.single_stream_scores(one_frames, None, text_ids)) / 1e9,
        }

        # ------------------------------------------------------------ bf16 query encoder
        if args.bf16:
            log("bf16 query encoder vs float32 ...")
            model_bf = copy.deepcopy(model).to(torch.bfloat16)
            f32_ms, bf_ms, cos, state_err = [], [], [], []
            n_bf = min(args.queries, args.bf16_queries)
            with Section(args.threads) as sec:
                encode(texts[0], model_bf)
                for i in range(n_bf):
                    pair = (model, model_bf) if i % 2 else (model_bf, model)
                    outs = {}
                    for m in pair:
                        t0 = time.perf_counter()
                        o = m.encode_text(tok([texts[i]]))
                        st = m.rerank_state(o.latents)[0].float()
                        (bf_ms if m is model_bf else f32_ms).append(ms_since(t0))
                        outs[m is model_bf] = (o.embedding[0].float(), st)
                    (e32, s32), (ebf, sbf) = outs[False], outs[True]
                    cos.append(float(e32 @ ebf))
                    state_err.append(float((sbf - s32).norm() / s32.norm()))
            section("bf16 encode", sec)
            res["bf16"] = {
                "queries": n_bf,
                "f32": summary(f32_ms),
                "bf16": summary(bf_ms),
                "paired_speedup": statistics.median(f / b for f, b in zip(f32_ms, bf_ms)),
                "cosine_min": min(cos),
                "cosine_median": statistics.median(cos),
                "rerank_state_rel_err_max": max(state_err),
            }
            del model_bf

    store.close()
    tmp.cleanup()
    res["loadavg_end"] = os.getloadavg()
    res["total_s"] = time.perf_counter() - t_start
    res["goals"] = goals(res)
    return res


# --------------------------------------------------------------------------- report
def goals(res: dict[str, Any]) -> list[dict[str, Any]]:
    pq = res["per_query"]
    auto = next(v for v in pq.values() if v["index"] == "auto" and v["k"] == 0)
    auto_rr = next(v for v in pq.values() if v["index"] == "auto" and v["k"] == 50)
    rm, rk, ex = res["rerank_many"], res["rerank_k50"], res["exhaustive"]
    out = []

    def goal(name: str, value: float, target: str, met: bool, how: str) -> None:
        out.append({"goal": name, "value": value, "target": target, "met": bool(met), "how": how})

    share = auto_rr["paired_rerank_share"]
    goal("mixed rerank K=50 adds to a query (auto index)", share, "<= 10%", share <= 0.10,
         "paired: median over queries of rerank ms / (encode + search ms) in the same call")
    p50_add = auto_rr["total"]["p50"] / auto["total"]["p50"] - 1
    goal("  same, from p50s of the two variants", p50_add, "<= 10%", p50_add <= 0.10,
         "p50(retrieval + rerank) / p50(retrieval) - 1; within load noise")
    r = rm["rerank"]["p50"] / rm["encode_query"]["p50"]
    goal(f"rerank K={rm['k']} / encoding one query", r, "< 1", r < 1,
         f"p50 ratio (paired median {rm['paired_ratio']:.2f})")
    r = rk["single_ms_for_50"]["p50"] / rk["mixed"]["p50"]
    goal("single-stream K=50 / mixed K=50 (rerank stage)", r, ">= 10x", r >= 10, "p50 ratio")
    r2 = rk["single_ms_for_50"]["p50"] / rk["mixed_with_query_encode"]["p50"]
    goal("  single K=50 / (query encode + mixed K=50)", r2, ">= 10x", r2 >= 10,
         "stricter: charges mixed for the text encoder pass single does not need")
    r = ex["ms"] / auto_rr["total"]["p50"]
    goal(f"exhaustive single over {ex['videos']} videos / two-stage", r, ">= 50x", r >= 50,
         f"two-stage = p50 of encode + {auto_rr['index']} top-50 + mixed K=50; exhaustive {ex['how'].split(':')[0]}")
    return out


def fmt_ms(x: float) -> str:
    return f"{x:.2f}" if x < 10 else f"{x:.1f}" if x < 1000 else f"{x:,.0f}"


def table(res: dict[str, Any]) -> str:
    lines = []
    c = res["corpus"]
    lines += [
        f"Corpus: {c['segments']:,} segments in {c['videos']:,} videos around {c['centres']} encoded centres "
        f"(centre cosine {c['centre_cos_raw']:.3f} raw -> {c['centre_cos_centred']:.3f} centred); "
        f"rerank states {c['rowstore_mb']:.0f} MB float16 RowStore; sigmas {c['sigmas']}.",
        f"Load average start {res['loadavg_start'][0]:.2f} / end {res['loadavg_end'][0]:.2f} "
        f"on {res['machine']}; {res['threads']} threads; run {res['total_s']:.0f} s.",
        "",
        f"Queries for search: near a random segment, mean cosine to it {c['query_cos']:.2f} "
        f"(sigma {c['sigmas']['query']}); 'far' recall queries: cosine {c['query_far_cos']:.2f} "
        f"(sigma {c['sigmas']['query_far']}).",
        "",
        f"| index | build s | top-50 search p50 ms ({res['threads']} FAISS threads) | p95 ms | p50 ms, 1 FAISS thread | "
        "recall@10 | recall@50 | far recall@10 | far recall@50 | search params |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, ix in res["indexes"].items():
        keys = ("recall@10", "recall@50", "far recall@10", "far recall@50")
        rec = [f"{ix[k]:.3f}" for k in keys] if "recall@10" in ix else ["1 (ref.)"] * 4
        sm = ix["search_ms"]
        one = fmt_ms(ix["search_ms_1thread"]["p50"]) if "search_ms_1thread" in ix else "-"
        lines.append(f"| {ix['description']} ({name}) | {ix['build_s']:.1f} | {fmt_ms(sm['p50'])} | {fmt_ms(sm['p95'])} | {one} | "
                     f"{' | '.join(rec)} | {ix['params']} |")
    lines += ["", "| per query (ms) | p50 | p95 | encode p50 | search p50 | rerank p50 (state + read + score) | rerank share (paired) |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for name, v in res["per_query"].items():
        rr = (f"{fmt_ms(v['rerank']['p50'])} ({fmt_ms(v['query_state']['p50'])} + {fmt_ms(v['read']['p50'])} + "
              f"{fmt_ms(v['score']['p50'])})") if v["k"] else "-"
        share = f"{100 * v['paired_rerank_share']:.1f}%" if v["k"] else "-"
        lines.append(f"| {name} | {fmt_ms(v['total']['p50'])} | {fmt_ms(v['total']['p95'])} | "
                     f"{fmt_ms(v['encode']['p50'])} | {fmt_ms(v['search']['p50'])} | {rr} | {share} |")
    rm, rk, ex = res["rerank_many"], res["rerank_k50"], res["exhaustive"]
    g = res["gflops"]
    g_many = g[f"mixed K={rm['k']}"]
    lines += ["", "| operation | p50 ms | p95 ms | n | GFLOPs | note |", "|---|---:|---:|---:|---:|---|",
              f"| encode one query (tokenise + text encoder + rerank state) | {fmt_ms(rm['encode_query']['p50'])} | "
              f"{fmt_ms(rm['encode_query']['p95'])} | {rm['encode_query']['n']} | {g['query encode']:.1f} | |",
              f"| mixed rerank K={rm['k']} (read + score) | {fmt_ms(rm['rerank']['p50'])} | {fmt_ms(rm['rerank']['p95'])} | "
              f"{rm['rerank']['n']} | {g_many:.2f} | read {fmt_ms(rm['rerank_read']['p50'])}, "
              f"score {fmt_ms(rm['rerank_score']['p50'])} |",
              f"| mixed rerank K=50 (read + score) | {fmt_ms(rk['mixed']['p50'])} | {fmt_ms(rk['mixed']['p95'])} | "
              f"{rk['mixed']['n']} | {g['mixed K=50']:.3f} | |",
              f"| mixed rerank K=50, torch on 1 thread | {fmt_ms(rk['mixed_1thread']['p50'])} | "
              f"{fmt_ms(rk['mixed_1thread']['p95'])} | {rk['mixed_1thread']['n']} | | interleaved with the row above |",
              f"| query encode + mixed rerank K=50 | {fmt_ms(rk['mixed_with_query_encode']['p50'])} | "
              f"{fmt_ms(rk['mixed_with_query_encode']['p95'])} | {rk['mixed_with_query_encode']['n']} | | |",
              f"| plain mixed decoder K=50 (mixed_scores_plain) | {fmt_ms(rk['plain']['p50'])} | {fmt_ms(rk['plain']['p95'])} | "
              f"{rk['plain']['n']} | {g['plain K=50']:.1f} | over 2 x 128 latents per candidate |",
              f"| single-stream K=50 (joint encoder, 50 pairs) | {fmt_ms(rk['single_ms_for_50']['p50'])} | "
              f"{fmt_ms(rk['single_ms_for_50']['p95'])} | {rk['single_ms_for_50']['n']} | {50 * g['single pair']:.0f} | "
              f"batches of {rk['single_batch']}; frames pre-decoded, decoding NOT counted |",
              f"| exhaustive single-stream, {ex['videos']} videos | {fmt_ms(ex['ms'])} | | | "
              f"{ex['videos'] * g['single pair']:.0f} | {ex['how']} |"]
    if "bf16" in res:
        b = res["bf16"]
        lines += ["", "| query encoder dtype | p50 ms | p95 ms | n | vs float32 |", "|---|---:|---:|---:|---|",
                  f"| float32 | {fmt_ms(b['f32']['p50'])} | {fmt_ms(b['f32']['p95'])} | {b['queries']} | |",
                  f"| bfloat16 (cast weights) | {fmt_ms(b['bf16']['p50'])} | {fmt_ms(b['bf16']['p95'])} | {b['queries']} | "
                  f"paired speed-up {b['paired_speedup']:.2f}x; embedding cosine min {b['cosine_min']:.4f} / median "
                  f"{b['cosine_median']:.4f}; rerank-state rel. error max {b['rerank_state_rel_err_max']:.3f} |"]
    lines += ["", "| goal | measured | target | met | how |", "|---|---:|---|---|---|"]
    for gl in res["goals"]:
        v = gl["value"]
        val = f"{100 * v:.1f}%" if "%" in gl["target"] else f"{v:,.1f}x" if "x" in gl["target"] else f"{v:.2f}"
        lines.append(f"| {gl['goal']} | {val} | {gl['target']} | {'yes' if gl['met'] else 'NO'} | {gl['how']} |")
    lines += ["", "| section | wall s | CPU share |", "|---|---:|---:|"]
    for name, sct in res["sections"].items():
        lines.append(f"| {name} | {sct['wall_s']:.1f} | {sct['cpu_share']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--segments", type=int, default=100_000)
    p.add_argument("--queries", type=int, default=50, help="timed queries per variant")
    p.add_argument("--json", type=Path, default=None, help="write every number here")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--centres", type=int, default=64, help="synthetic videos encoded as mixture centres")
    p.add_argument("--segments-per-video", type=int, default=20)
    p.add_argument("--sigma-video", type=float, default=0.6)
    p.add_argument("--sigma-segment", type=float, default=0.25)
    p.add_argument("--sigma-query", type=float, default=1.0, help="timed and recall queries")
    p.add_argument("--sigma-query-far", type=float, default=2.0, help="second, harder recall query set")
    p.add_argument("--sigma-state", type=float, default=0.3)
    p.add_argument("--recall-queries", type=int, default=200)
    p.add_argument("--rerank-many", type=int, default=1000, help="K of the large rerank")
    p.add_argument("--single-pairs", type=int, default=50)
    p.add_argument("--single-batch", type=int, default=10)
    p.add_argument("--single-repeats", type=int, default=3)
    p.add_argument("--exhaustive", type=int, default=1000, help="videos in the exhaustive single-stream run")
    p.add_argument("--measure-exhaustive", action="store_true", help="run it instead of extrapolating")
    p.add_argument("--hnsw", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--bf16-queries", type=int, default=20)
    p.add_argument("--workdir", default=None, help="folder for the temporary RowStore (default: system tmp)")
    args = p.parse_args()
    if args.queries < 1 or args.segments < 1000 or args.single_pairs < 1:
        p.error("need --queries >= 1, --segments >= 1000, --single-pairs >= 1")
    res = run(args)
    print(table(res))
    if args.json:
        args.json.write_text(json.dumps(res, indent=2, default=float) + "\n")


if __name__ == "__main__":
    main()
