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
  logit from the stored rerank states, fused as `pvl_search.ranking.fuse` says). A video
  with a reranked segment ranks by its best reranked segment, ahead of every video that was
  only retrieved; those keep their retrieval order. So a ground truth outside the reranked
  set keeps its ``multi`` rank. With one segment per video, top-K segments = top-K videos.
- ``latent`` at K: the same with the latent reranker's logit (the query's text latents
  attending over the stored video latents); only for a model that has one and an index that
  keeps latents.
- ``joint`` at K: the same with the joint reranker's logit (a cross-encoder over the query's
  text latents and the stored video latents, shipped beside the model); only where it can run.
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
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from indexer.encoding import ModelRunner
from indexer.evaluate.moments import evaluate_moments, moment_queries
from indexer.evaluate.report import (
    DEFAULT_RERANK_KS,
    EXHAUSTIVE,
    JOINT,
    LATENT,
    MIXED,
    MULTI,
    PATCH,
    SINGLE,
    STACKED,
    EvalError,
    EvalProgress,
    EvalReport,
    MethodResult,
)
from indexer.search.request import SearchError, check_fusion
from indexer.search.rerankers import (
    joint_rerank_available,
    latent_rerank_available,
    patch_rerank_available,
    stacked_rerank_available,
    stored_scores,
)
from indexer.search.searcher import Searcher
from indexer.search.single_stream import SINGLE_BATCH, ClipCache, single_pass
from indexer.store.base import StoreBase
from pvl_search.data.captions import SPLITS, load_captions
from pvl_search.metrics import retrieval_metrics
from pvl_search.ranking import Fusion, candidate_order, fuse, segment_keys, twin_hits, video_keys

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
    video_of_path: dict[str, int]  # as stored, and resolved

    def video_of(self, path: str) -> int | None:
        """The video index of a captions file's path, as written or resolved (None: not indexed)."""
        return self.video_of_path.get(path, self.video_of_path.get(os.path.realpath(path)))


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
        target = corpus.video_of(str(record.path))
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
    fusion: Fusion = "calibrated",
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
    try:
        check_fusion(fusion)
    except SearchError as exc:
        raise EvalError(str(exc)) from None
    searcher.store.refresh()
    corpus = _corpus(searcher)
    records = load_captions(captions_path, default_split=split)
    queries, n_split, n_missing = _queries(records, corpus, split, subset_key)
    if not queries:
        raise EvalError(
            f"{captions_path}: no {split} caption describes a video in the index "
            f"({n_split} {split} videos listed, {n_missing} of them not indexed)"
        )
    plan = _Plan.make(ks, single, len(corpus.starts) <= exhaustive_limit, len(corpus.segment_ids), fusion)
    tally = _Tally(corpus, _video_groups(records, corpus))
    scorer = _QueryScorer(searcher.runner, searcher.store, corpus, plan, ClipCache(clip_cache_bytes))
    for done, query in enumerate(queries, start=1):
        scorer.score(query, tally)
        if progress:
            progress(EvalProgress(done, len(queries)))
    subset_sizes = _subset_sizes(queries)
    methods = tally.results(queries, subset_sizes)
    # Captions with known time spans (`synth --long`) are also searched as a user would.
    spans = [q for q in moment_queries(records, split) if corpus.video_of(q.path) is not None]
    moments = evaluate_moments(searcher, spans) if spans else None
    return EvalReport(
        captions=str(Path(captions_path).absolute()), split=split, fusion=fusion, n_queries=len(queries),
        n_videos=len(corpus.starts), n_segments=len(corpus.segment_ids), n_split_videos=n_split,
        n_missing=n_missing, chance_r1=100.0 / len(corpus.starts), methods=methods,
        subset_key=subset_key if subset_sizes else None, subset_sizes=subset_sizes,
        seconds=time.perf_counter() - began, moments=moments,
    )


@dataclass(frozen=True)
class _Plan:
    """What to compute per query: rerank depths, single-stream methods and their batches."""

    ks: list[int]
    single: bool
    exhaustive: bool
    depth: int  # candidates the single-stream pass scores (0: none)
    bounds: list[int]  # where its batches end
    fusion: Fusion

    @classmethod
    def make(cls, ks: list[int], single: bool, exhaustive: bool, n_segments: int, fusion: Fusion) -> _Plan:
        depth = max(min(max(ks), n_segments) if single else 0, n_segments if exhaustive else 0)
        # Batches of the single-stream pass end at every K, so each K's latency is its own work.
        bounds = sorted({b for b in range(SINGLE_BATCH, depth, SINGLE_BATCH)} | {min(k, depth) for k in ks} | {depth})
        return cls(ks, single, exhaustive, depth, [b for b in bounds if b > 0], fusion)

    def single_methods(self) -> list[tuple[str, int | None]]:
        singles: list[tuple[str, int | None]] = [(SINGLE, k) for k in self.ks] if self.single else []
        return singles + ([(EXHAUSTIVE, None)] if self.exhaustive else [])


class _Tally:
    """Per method: each query's rank and latency, and its twin-group hits."""

    def __init__(self, corpus: _Corpus, group_of: np.ndarray) -> None:
        self.corpus, self.group_of = corpus, group_of
        self.ranks: dict[tuple[str, int | None], list[int]] = {}
        self.latency: dict[tuple[str, int | None], list[float]] = {}
        self.twins: dict[tuple[str, int | None], list[tuple[bool, bool]]] = {}

    def record(self, key: tuple[str, int | None], ms: float, sims: np.ndarray, cand: np.ndarray,
               fused: np.ndarray, target: int) -> None:
        """One query's ranking by `key`'s method: segments `cand` reranked to `fused`."""
        keys = video_keys(segment_keys(sims, cand, fused), self.corpus.segment_video, len(self.corpus.starts))
        self.ranks.setdefault(key, []).append(int(keys.rank(target)))
        self.latency.setdefault(key, []).append(ms)
        if self.group_of[target] >= 0:
            self.twins.setdefault(key, []).append(twin_hits(keys, target, self.group_of == self.group_of[target]))

    def results(self, queries: list[_Query], labels: Iterable[str]) -> list[MethodResult]:
        methods = []
        for key, method_ranks in self.ranks.items():
            r = np.asarray(method_ranks)
            subsets = {label: float((r[[label in q.labels for q in queries]] <= 1).mean() * 100) for label in labels}
            p50, p95 = np.percentile(np.asarray(self.latency[key]), [50, 95]).tolist()
            twins = _twin_summary(self.twins.get(key, []), queries, self.group_of)
            methods.append(MethodResult(key[0], key[1], retrieval_metrics(r), float(p50), float(p95),
                                        r.tolist(), subsets, twins))
        return methods


class _QueryScorer:
    """Runs every method of the plan on one query, timing each as a search would spend it."""

    def __init__(self, runner: ModelRunner, store: StoreBase, corpus: _Corpus, plan: _Plan, cache: ClipCache) -> None:
        self.runner, self.store, self.corpus, self.plan, self.cache = runner, store, corpus, plan, cache
        # The rerankers that score from stored rows, as this model and index allow.
        self.stored_methods = [MIXED] + [LATENT] * latent_rerank_available(runner, store) \
            + [JOINT] * joint_rerank_available(runner, store) + [PATCH] * patch_rerank_available(runner, store) \
            + [STACKED] * stacked_rerank_available(runner, store)
        _warm_up(runner, store, corpus, single_stream=plan.depth > 0)

    def _logits(self, method: str, encoded: object, cand: np.ndarray) -> np.ndarray:
        ids = self.corpus.segment_ids[cand]
        latents = None if encoded.latents is None else encoded.latents[0]
        return stored_scores(self.runner, self.store, method, encoded.rerank_states[0], latents, ids)

    def score(self, query: _Query, tally: _Tally) -> None:
        t0 = time.perf_counter()
        encoded = self.runner.encode_queries([query.text])
        sims = self.corpus.embeddings @ encoded.embeddings[0].astype(np.float32)  # (S,)
        order = candidate_order(sims, self.corpus.segment_ids)
        base_ms = (time.perf_counter() - t0) * 1000
        fusion = self.plan.fusion
        tally.record((MULTI, None), base_ms, sims, order[:0], np.empty(0), query.target)
        for k in self.plan.ks:
            cand = order[:k]
            for method in self.stored_methods:
                started = time.perf_counter()
                logits = self._logits(method, encoded, cand)
                ms = (time.perf_counter() - started) * 1000
                fused = fuse(sims[cand], logits, fusion, self.runner.retrieval_scale)
                tally.record((method, k), base_ms + ms, sims, cand, fused, query.target)
        if not self.plan.depth:
            return
        depth = self.plan.depth
        logits, cost_ms = single_pass(self.runner, self.cache, self.corpus.info, self.corpus.segment_ids,
                                      query.text, order[:depth], self.plan.bounds)
        for key in self.plan.single_methods():
            n = depth if key[0] == EXHAUSTIVE else min(key[1], depth)
            cand = order[:n]
            fused = fuse(sims[cand], logits[:n], fusion, self.runner.retrieval_scale)
            tally.record(key, base_ms + cost_ms[n], sims, cand, fused, query.target)


def _subset_sizes(queries: list[_Query]) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for q in queries:
        for label in q.labels:
            sizes[label] = sizes.get(label, 0) + 1
    return dict(sorted(sizes.items()))


def _video_groups(records: Iterable, corpus: _Corpus) -> np.ndarray:
    """(V,) int: a group number per indexed video from caption meta "group" (-1: none), and
    -1 too for a group with a single indexed member (no twin to tell apart)."""
    labels: dict[str, int] = {}
    group_of = np.full(len(corpus.starts), -1, dtype=np.int64)
    for record in records:
        label = record.meta.get("group") if isinstance(record.meta, dict) else None
        video = corpus.video_of(str(record.path))
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


def _warm_up(runner: ModelRunner, store: StoreBase, corpus: _Corpus, *, single_stream: bool) -> None:
    """One untimed call of each model path, so the first query's latency is not the cost of
    lazy initialisation (kernels, allocator, thread pools)."""
    encoded = runner.encode_queries(["warm up"])
    runner.mixed_scores(encoded.rerank_states[:1], store.rerank_states(corpus.segment_ids[:1])[None])
    if latent_rerank_available(runner, store):
        runner.latent_scores(encoded.latents[0], store.latents(corpus.segment_ids[:1]))
    if joint_rerank_available(runner, store):
        runner.joint_scores(encoded.latents[0], store.latents(corpus.segment_ids[:1]))
    if patch_rerank_available(runner, store):
        runner.patch_scores(encoded.latents[0], store.patch_tokens(corpus.segment_ids[:1]))
    if single_stream:
        config = runner.config
        frames = np.zeros((1, config.frames, config.frame_size, config.frame_size, 3), dtype=np.uint8)
        runner.single_scores(frames, np.ones((1, config.frames), dtype=bool), "warm up")
