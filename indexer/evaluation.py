"""Reranking evaluation over a stored index: how much does each way of scoring buy, and what
does it cost per query?

Every caption of a split whose video is in the index is a query; its one ground-truth video
is the video it describes (MSR-VTT convention, `pvl_search.metrics`: 1-based ranks, ties
counted against the model). Videos are ranked, not segments: a video scores as its best
segment. Methods, all over every indexed video:

- ``multi``: multi-stream retrieval alone, exact (query embedding @ every stored segment
  embedding, max per video), no FAISS approximation.
- ``mixed`` at K: retrieval, then the top-K *segments* by similarity (what ``--rerank-k``
  means to `Searcher.search`) are rescored by the fused score (similarity + mixed-stream VTM
  logit from the stored rerank states, or the logit alone with ``fusion="rerank"``). A video
  with a reranked segment ranks by its best reranked segment, ahead of every video that was
  only retrieved; those keep their retrieval order. So a ground truth outside the reranked
  set keeps its ``multi`` rank. With one segment per video, top-K segments = top-K videos.
- ``latent`` at K: the same with the latent reranker's logit (the query's text latents
  attending over the stored video latents); only for a model that has one and an index that
  keeps latents.
- ``single`` at K: the same with the single-stream (joint encoder) logit; candidates are
  decoded again as the searcher does, with decoded clips cached per segment across queries.
- ``single-exhaustive``: single-stream rerank of every segment for every query (the
  searcher with ``rerank_k`` >= all segments); only for corpora of at most
  ``exhaustive_limit`` videos.

This is `Searcher.search(text, k=n_videos, rerank_k=K, rerank=...)` computed rank by rank
(tests check it), except that similarities come from the stored (float16) embeddings rather
than from FAISS.

Latency per query and method = encoding the query (each query alone, as a search does) +
retrieval (similarities and the candidate order) + the method's rerank at K. For single-stream,
the rerank time is the joint encoder's time plus the time each candidate took to decode the
first time it was decoded, so caching clips saves evaluation time without hiding decode cost.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from indexer.encoding import ModelRunner
from indexer.index_store import IndexStore
from indexer.searcher import Searcher
from pvl_search.data.captions import SPLITS, load_captions
from pvl_search.metrics import PairedChange, RetrievalMetrics, paired_top1_change, ranks_from_scores, retrieval_metrics
from pvl_search.media.video import VideoDecodeError, read_clips

MULTI, MIXED, LATENT, SINGLE, EXHAUSTIVE = "multi", "mixed", "latent", "single", "single-exhaustive"
DEFAULT_RERANK_KS = (8, 16, 32, 64, 128)
SINGLE_BATCH = 8  # joint-encoder pairs per call, as in Searcher._single_stream
ROW_HEADER = ("method", "K", "R@1", "R@5", "R@10", "MdR", "MnR", "p50 ms", "p95 ms")


class EvalError(ValueError):
    """An evaluation that cannot run (no queries, bad K list, empty index); one line says why."""


@dataclass
class EvalProgress:
    done: int  # queries evaluated
    total: int


@dataclass
class MethodResult:
    method: str  # multi | mixed | single | single-exhaustive
    k: int | None  # rerank depth in segments (None: no rerank / everything)
    metrics: RetrievalMetrics
    latency_p50_ms: float
    latency_p95_ms: float
    ranks: list[int]  # per query, in query order (see EvalReport)
    subsets: dict[str, float] = field(default_factory=dict)  # subset label -> R@1 (%)
    # Over queries whose video has twins in the index (meta "group"): "within_group_top1" (its
    # video ranks above every twin; chance 1 / group size), "group_r1" (no video of another
    # group ranks above the best twin), and within_group_top1 per subset label ("...:heldout").
    groups: dict[str, float] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.method if self.k is None else f"{self.method}@{self.k}"


@dataclass
class EvalReport:
    """Queries are the split's captions in caption-file order (video by video, each video's
    captions in order), skipping videos the index does not hold; `MethodResult.ranks` follow
    that order."""

    captions: str  # caption file
    split: str
    fusion: str
    n_queries: int
    n_videos: int  # indexed videos ranked against (the whole index, not just the split)
    n_segments: int
    n_split_videos: int  # videos of the split in the caption file
    n_missing: int  # of those, videos the index does not hold (their captions are skipped)
    chance_r1: float  # 100 / n_videos
    methods: list[MethodResult]
    subset_key: str | None = None
    subset_sizes: dict[str, int] = field(default_factory=dict)  # label -> queries
    seconds: float = 0.0  # wall time of the whole evaluation

    def method(self, name: str, k: int | None = None) -> MethodResult:
        for m in self.methods:
            if m.method == name and m.k == k:
                return m
        raise KeyError(f"no {name} result at K={k}")

    def rows(self) -> list[tuple[str, int | None, float, float, float, float, float, float, float]]:
        """One row per method and K, columns as ROW_HEADER."""
        return [
            (m.method, m.k, m.metrics.r1, m.metrics.r5, m.metrics.r10, m.metrics.median_rank,
             m.metrics.mean_rank, m.latency_p50_ms, m.latency_p95_ms)
            for m in self.methods
        ]

    def versus_retrieval(self) -> dict[str, PairedChange]:
        """Per reranking method (by label), its top-1 changes against retrieval alone."""
        base = self.method(MULTI).ranks
        return {m.label: paired_top1_change(base, m.ranks) for m in self.methods if m.method != MULTI}

    def subset_rows(self) -> list[tuple[str, int | None, str, int, float]]:
        """(method, K, subset label, queries in it, R@1) for every subset label found."""
        return [
            (m.method, m.k, label, self.subset_sizes[label], r1)
            for m in self.methods
            for label, r1 in m.subsets.items()
        ]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EvalReport":
        data = dict(data)
        methods = []
        for raw in data.pop("methods"):
            raw = dict(raw)
            raw["metrics"] = RetrievalMetrics(**raw["metrics"])
            methods.append(MethodResult(**raw))
        return cls(methods=methods, **data)


# ---------------------------------------------------------------------------- rank logic


def candidate_order(sims: np.ndarray, segment_ids: np.ndarray | None = None) -> np.ndarray:
    """Positions of segments by decreasing similarity, ties by increasing segment id."""
    sims = np.asarray(sims)
    ids = np.arange(len(sims)) if segment_ids is None else np.asarray(segment_ids)
    return np.lexsort((ids, -sims.astype(np.float64)))


def video_max(scores: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Per-video max of per-segment scores (..., S) when segments are grouped by video and
    video v's segments start at column starts[v]."""
    return np.maximum.reduceat(scores, starts, axis=-1)


_TIER = 1e6  # a reranked video's key is offset by this: any reranked video ranks ahead


def video_keys(
    video_scores: np.ndarray, segment_video: np.ndarray, candidates: np.ndarray, rerank_scores: np.ndarray
) -> np.ndarray:
    """(V,) sort keys of the two-tier ranking: a video with a reranked segment scores as its
    best reranked segment, offset to rank ahead of every video without one, which keeps its
    retrieval score. Ranks and twin metrics both read these keys."""
    keys = np.asarray(video_scores, dtype=np.float64).copy()
    candidates = np.asarray(candidates, dtype=np.int64)
    if len(candidates):
        fused = np.full(len(keys), -np.inf)
        np.maximum.at(fused, np.asarray(segment_video)[candidates], np.asarray(rerank_scores, dtype=np.float64))
        reranked = np.isfinite(fused)
        keys[reranked] = _TIER + fused[reranked]
    return keys


def twin_hits(keys: np.ndarray, target: int, twins: np.ndarray) -> tuple[bool, bool]:
    """(within-group top-1, group R@1) of one query: `twins` (V,) bool marks its group's
    videos, the target included. Ties count against the model."""
    within = int(((keys >= keys[target]) & twins).sum()) == 1
    group_first = not bool((keys[~twins] > keys[twins].max()).any())
    return within, group_first


def rank_after_rerank(
    sims: np.ndarray,
    segment_video: np.ndarray,
    target: int,
    candidates: np.ndarray,
    rerank_scores: np.ndarray,
    video_scores: np.ndarray | None = None,
) -> int:
    """1-based rank of video `target` after reranking some segments.

    sims (S,): retrieval similarity of every segment; segment_video (S,): its video index;
    candidates (K,): positions of the reranked segments; rerank_scores (K,): their new score
    (already fused). A video with a reranked segment scores as its best reranked segment and
    ranks ahead of all videos without one, which keep their retrieval score (best segment).
    Ties count against the model in both tiers. video_scores (V,): the per-video retrieval
    scores when already at hand (max of sims per video).
    """
    segment_video = np.asarray(segment_video, dtype=np.int64)
    if video_scores is None:
        retrieval = np.full(int(segment_video.max()) + 1, -np.inf)
        np.maximum.at(retrieval, segment_video, np.asarray(sims, dtype=np.float64))
    else:
        retrieval = np.asarray(video_scores, dtype=np.float64)
    keys = video_keys(retrieval, segment_video, candidates, rerank_scores)
    return int((keys >= keys[target]).sum())


def fuse(sims: np.ndarray, logits: np.ndarray, fusion: str) -> np.ndarray:
    """The searcher's score of a reranked segment."""
    return np.asarray(logits, np.float64) if fusion == "rerank" else np.asarray(sims, np.float64) + logits


# ---------------------------------------------------------------------------- evaluation


@dataclass
class _Query:
    text: str
    target: int  # video index
    labels: list[str]


@dataclass
class _Corpus:
    segment_ids: np.ndarray  # (S,) grouped by video
    segment_video: np.ndarray  # (S,) video index
    starts: np.ndarray  # (V,) first position of each video's segments
    embeddings: np.ndarray  # (S, d) float32
    info: dict  # segment id -> SegmentInfo
    video_of_path: dict[str, int]


class _ClipCache:
    """Decoded clips per segment, least recently used first out past `max_bytes`. Remembers
    how long each segment took to decode (also after eviction) and which ones failed."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.clips: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self.decode_ms: dict[int, float] = {}
        self.failed: set[int] = set()

    def get(self, seg, frames: int, size: int) -> tuple[np.ndarray, np.ndarray] | None:
        if seg.id in self.failed:
            return None
        clip = self.clips.get(seg.id)
        if clip is not None:
            self.clips.move_to_end(seg.id)
            return clip
        started = time.perf_counter()
        try:  # exactly the searcher's read
            got = read_clips(seg.path, [(seg.start_s, max(seg.end_s, seg.start_s + 1e-3))], frames, size)[0]
        except VideoDecodeError:
            got = None
        self.decode_ms.setdefault(seg.id, (time.perf_counter() - started) * 1000)
        if got is None:
            self.failed.add(seg.id)
            return None
        clip = (got.frames, got.mask)
        self.clips[seg.id] = clip
        self.bytes += got.frames.nbytes
        while self.bytes > self.max_bytes and len(self.clips) > 1:
            _, (old, _) = self.clips.popitem(last=False)
            self.bytes -= old.nbytes
        return clip


def _labels(meta: dict, key: str | None) -> list[str]:
    if key is None:
        return []
    value = meta.get(key)
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value if isinstance(v, (str, int))]
    return []


def _corpus(searcher: Searcher) -> _Corpus:
    store = searcher.store
    live = store.segment_ids()
    if len(live) == 0:
        raise EvalError(f"index {store.directory} holds no searchable segments")
    info = store.segments(live)
    live = np.asarray([i for i in live.tolist() if i in info and not info[i].removed], dtype=np.int64)
    video_ids = np.asarray([info[i].video_id for i in live.tolist()], dtype=np.int64)
    order = np.lexsort((live, video_ids))  # grouped by video, segments in id order
    live, video_ids = live[order], video_ids[order]
    unique, starts, segment_video = np.unique(video_ids, return_index=True, return_inverse=True)
    video_of_path: dict[str, int] = {}
    for v, first in enumerate(starts.tolist()):
        path = info[int(live[first])].path
        video_of_path[path] = v
        video_of_path.setdefault(os.path.realpath(path), v)
    embeddings = np.ascontiguousarray(store.embeddings(live), dtype=np.float32)
    return _Corpus(live, segment_video.astype(np.int64), starts.astype(np.int64), embeddings, info, video_of_path)


def _queries(records: Iterable, corpus: _Corpus, split: str, subset_key: str | None) -> tuple[list[_Query], int, int]:
    queries, n_split, n_missing = [], 0, 0
    for record in records:
        if record.split != split:
            continue
        n_split += 1
        path = str(record.path)
        target = corpus.video_of_path.get(path, corpus.video_of_path.get(os.path.realpath(path)))
        if target is None:
            n_missing += 1
            continue
        labels = _labels(record.meta, subset_key)
        queries.extend(_Query(text, target, labels) for text in record.captions if text and text.strip())
    return queries, n_split, n_missing


def _check_ks(rerank_ks: Sequence[int]) -> list[int]:
    ks = sorted({int(k) for k in rerank_ks})
    if any(k < 1 for k in ks):
        raise EvalError(f"rerank K values must be positive, got {list(rerank_ks)}")
    return ks


def evaluate_index(
    searcher: Searcher,
    captions_path: str | os.PathLike[str],
    *,
    split: str = "test",
    rerank_ks: Sequence[int] = DEFAULT_RERANK_KS,
    single: bool = True,
    exhaustive_limit: int = 200,
    fusion: str = "sum",
    subset_key: str | None = "factors",
    clip_cache_bytes: int = 1 << 30,
    progress: Callable[[EvalProgress], None] | None = None,
) -> EvalReport:
    """Evaluate retrieval and reranking on the captions of `split` (see the module doc).

    rerank_ks: rerank depths, in segments, for the mixed and single methods. single: also run
    the single-stream rerank at each K. exhaustive_limit: run the exhaustive single-stream
    ranking when the index holds at most this many videos (0: never). subset_key: a meta
    field (string or list of strings) whose values get their own R@1 per method.
    """
    began = time.perf_counter()
    ks = _check_ks(rerank_ks)
    if split not in SPLITS:
        raise EvalError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if fusion not in ("sum", "rerank"):
        raise EvalError(f"fusion must be 'sum' or 'rerank', got {fusion!r}")
    searcher.store.refresh()
    corpus = _corpus(searcher)
    records = load_captions(captions_path, default_split=split)
    queries, n_split, n_missing = _queries(records, corpus, split, subset_key)
    if not queries:
        raise EvalError(
            f"{captions_path}: no {split} caption describes a video in the index "
            f"({n_split} {split} videos listed, {n_missing} of them not indexed)"
        )
    n_videos, n_segments = len(corpus.starts), len(corpus.segment_ids)
    exhaustive = n_videos <= exhaustive_limit
    depth = max(min(max(ks), n_segments) if single else 0, n_segments if exhaustive else 0)
    # Batches of the single-stream pass end at every K, so each K's latency is its own work.
    bounds = sorted({b for b in range(SINGLE_BATCH, depth, SINGLE_BATCH)} | {min(k, depth) for k in ks} | {depth})
    bounds = [b for b in bounds if b > 0]

    runner, store = searcher.runner, searcher.store
    cache = _ClipCache(clip_cache_bytes)
    _warm_up(runner, store, corpus, single_stream=depth > 0)
    ranks: dict[tuple[str, int | None], list[int]] = {}
    latency: dict[tuple[str, int | None], list[float]] = {}
    twins: dict[tuple[str, int | None], list[tuple[bool, bool]]] = {}
    group_of = _video_groups(records, corpus)
    latent = runner.model.latent_reranker is not None and store.layout.latent_shape is not None

    def record(key: tuple[str, int | None], rank: int, ms: float, keys: np.ndarray | None = None,
               target: int = -1) -> None:
        ranks.setdefault(key, []).append(rank)
        latency.setdefault(key, []).append(ms)
        if keys is not None and group_of[target] >= 0:
            twins.setdefault(key, []).append(twin_hits(keys, target, group_of == group_of[target]))

    for done, query in enumerate(queries, start=1):
        t0 = time.perf_counter()
        encoded = runner.encode_queries([query.text])
        t1 = time.perf_counter()
        sims = corpus.embeddings @ encoded.embeddings[0].astype(np.float32)  # (S,)
        video_scores = video_max(sims, corpus.starts)
        order = candidate_order(sims, corpus.segment_ids)
        t2 = time.perf_counter()
        base_ms = (t2 - t0) * 1000
        record((MULTI, None), int(ranks_from_scores(video_scores[None], [query.target])[0]), base_ms,
               video_scores, query.target)

        for k in ks:
            cand = order[:k]
            for method in (MIXED, LATENT) if latent else (MIXED,):
                started = time.perf_counter()
                if method == MIXED:
                    states = store.rerank_states(corpus.segment_ids[cand])
                    logits = runner.mixed_scores(encoded.rerank_states[:1], states[None])[0]
                else:
                    logits = runner.latent_scores(encoded.latents[0], store.latents(corpus.segment_ids[cand]))
                ms = (time.perf_counter() - started) * 1000
                fused = fuse(sims[cand], logits, fusion)
                rank = rank_after_rerank(sims, corpus.segment_video, query.target, cand, fused, video_scores)
                record((method, k), rank, base_ms + ms,
                       video_keys(video_scores, corpus.segment_video, cand, fused), query.target)

        if depth:
            logits, cost_ms = _single_pass(runner, cache, corpus, query.text, order[:depth], bounds)
            targets = ([(SINGLE, k) for k in ks] if single else []) + ([(EXHAUSTIVE, None)] if exhaustive else [])
            for key in targets:
                n = depth if key[0] == EXHAUSTIVE else min(key[1], depth)
                cand = order[:n]
                fused = fuse(sims[cand], logits[:n], fusion)
                rank = rank_after_rerank(sims, corpus.segment_video, query.target, cand, fused, video_scores)
                record(key, rank, base_ms + cost_ms[n],
                       video_keys(video_scores, corpus.segment_video, cand, fused), query.target)
        if progress:
            progress(EvalProgress(done, len(queries)))

    subset_sizes: dict[str, int] = {}
    for q in queries:
        for label in q.labels:
            subset_sizes[label] = subset_sizes.get(label, 0) + 1
    subset_sizes = dict(sorted(subset_sizes.items()))
    methods = []
    for key, method_ranks in ranks.items():
        r = np.asarray(method_ranks)
        subsets = {
            label: float((r[[label in q.labels for q in queries]] <= 1).mean() * 100) for label in subset_sizes
        }
        p50, p95 = np.percentile(np.asarray(latency[key]), [50, 95]).tolist()
        methods.append(MethodResult(key[0], key[1], retrieval_metrics(r), float(p50), float(p95),
                                    r.tolist(), subsets, _twin_summary(twins.get(key, []), queries, group_of)))
    return EvalReport(
        captions=str(Path(captions_path).absolute()), split=split, fusion=fusion, n_queries=len(queries),
        n_videos=n_videos, n_segments=n_segments, n_split_videos=n_split, n_missing=n_missing,
        chance_r1=100.0 / n_videos, methods=methods, subset_key=subset_key if subset_sizes else None,
        subset_sizes=subset_sizes, seconds=time.perf_counter() - began,
    )


def _video_groups(records: Iterable, corpus: _Corpus) -> np.ndarray:
    """(V,) int: a group number per indexed video from caption meta "group" (-1: none), and
    -1 too for a group with a single indexed member (no twin to tell apart)."""
    labels: dict[str, int] = {}
    group_of = np.full(len(corpus.starts), -1, dtype=np.int64)
    for record in records:
        label = record.meta.get("group") if isinstance(record.meta, dict) else None
        path = str(record.path)
        video = corpus.video_of_path.get(path, corpus.video_of_path.get(os.path.realpath(path)))
        if label is not None and video is not None:
            group_of[video] = labels.setdefault(str(label), len(labels))
    if not labels:
        return group_of
    counts = np.bincount(group_of[group_of >= 0], minlength=len(labels))
    group_of[(group_of >= 0) & (counts[np.maximum(group_of, 0)] < 2)] = -1
    return group_of


def _twin_summary(hits: list[tuple[bool, bool]], queries: list[_Query], group_of: np.ndarray) -> dict[str, float]:
    """Percentages over the queries with twins, overall and per subset label."""
    if not hits:
        return {}
    grouped = [q for q in queries if group_of[q.target] >= 0]  # the order `record` saw them in
    within = np.asarray([h[0] for h in hits])
    out = {"within_group_top1": float(within.mean() * 100), "group_r1": float(np.mean([h[1] for h in hits]) * 100),
           "queries": float(len(hits))}
    for label in sorted({label for q in grouped for label in q.labels}):
        picked = np.asarray([label in q.labels for q in grouped])
        out[f"within_group_top1:{label}"] = float(within[picked].mean() * 100)
    return out


def _warm_up(runner: ModelRunner, store: IndexStore, corpus: _Corpus, *, single_stream: bool) -> None:
    """One untimed call of each model path, so the first query's latency is not the cost of
    lazy initialisation (kernels, allocator, thread pools)."""
    encoded = runner.encode_queries(["warm up"])
    runner.mixed_scores(encoded.rerank_states[:1], store.rerank_states(corpus.segment_ids[:1])[None])
    if encoded.latents is not None and store.layout.latent_shape is not None:
        runner.latent_scores(encoded.latents[0], store.latents(corpus.segment_ids[:1]))
    if single_stream:
        config = runner.config
        frames = np.zeros((1, config.frames, config.frame_size, config.frame_size, 3), dtype=np.uint8)
        runner.single_scores(frames, np.ones((1, config.frames), dtype=bool), "warm up")


def _single_pass(
    runner: ModelRunner, cache: _ClipCache, corpus: _Corpus, text: str, cand: np.ndarray, bounds: list[int]
) -> tuple[np.ndarray, dict[int, float]]:
    """Single-stream logits of the candidates (positions, in retrieval order) and, for each
    bound n, the milliseconds a search reranking the first n would spend (decode + encoder)."""
    config = runner.config
    logits = np.full(len(cand), -np.inf, dtype=np.float64)  # a clip that fails to decode ranks last
    cost: dict[int, float] = {0: 0.0}
    spent, lo = 0.0, 0
    for hi in bounds:
        frames, masks, rows = [], [], []
        for row in range(lo, hi):
            seg = corpus.info[int(corpus.segment_ids[cand[row]])]
            clip = cache.get(seg, config.frames, config.frame_size)
            spent += cache.decode_ms[seg.id]
            if clip is not None:
                frames.append(clip[0])
                masks.append(clip[1])
                rows.append(row)
        if rows:
            started = time.perf_counter()
            logits[rows] = runner.single_scores(np.stack(frames), np.stack(masks), text)
            spent += (time.perf_counter() - started) * 1000
        cost[hi] = spent
        lo = hi
    return logits, cost


# ---------------------------------------------------------------------------------- plot


def plot_report(report: EvalReport, path: str | os.PathLike[str]) -> Path:
    """Two panels as a PNG: R@1 vs rerank K, and p50 latency vs K (log scale); multi-stream
    retrieval and exhaustive single-stream as horizontal lines, chance as a dotted one."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullLocator

    path = Path(path)
    fig = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(fig)
    recall, speed = fig.subplots(1, 2)
    styles = {MIXED: ("tab:blue", "o"), SINGLE: ("tab:orange", "s")}
    for name, (colour, marker) in styles.items():
        points = sorted((m.k, m) for m in report.methods if m.method == name)
        if points:
            xs = [k for k, _ in points]
            recall.plot(xs, [m.metrics.r1 for _, m in points], marker=marker, color=colour, label=f"{name} rerank")
            speed.plot(xs, [m.latency_p50_ms for _, m in points], marker=marker, color=colour,
                       label=f"{name} rerank")
    lines = {MULTI: ("tab:green", "--", "multi-stream only"), EXHAUSTIVE: ("tab:red", "-.", "single, exhaustive")}
    for name, (colour, style, label) in lines.items():
        for m in report.methods:
            if m.method == name:
                recall.axhline(m.metrics.r1, color=colour, linestyle=style, label=label)
                speed.axhline(m.latency_p50_ms, color=colour, linestyle=style, label=label)
    recall.axhline(report.chance_r1, color="grey", linestyle=":", label="chance")
    ks = sorted({m.k for m in report.methods if m.k is not None})
    for ax in (recall, speed):
        ax.set_xscale("log", base=2)
        if ks:
            ax.set_xticks(ks, [str(k) for k in ks])
            ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlabel("rerank K (segments)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    recall.set_ylabel("R@1 (%)")
    recall.set_title(f"R@1 vs K ({report.n_queries} queries, {report.n_videos} videos)")
    speed.set_yscale("log")
    speed.set_ylabel("p50 latency per query (ms)")
    speed.set_title("latency vs K")
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path
