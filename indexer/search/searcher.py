"""Text-to-video search over a stored index: FAISS retrieval (multi-stream), then a rerank
of the top candidates (mixed-stream from stored rerank states, or single-stream by decoding
the candidates again), results grouped per video with the best segment's time span."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import astuple
from pathlib import Path

import numpy as np

from indexer.encoding import ModelRunner
from indexer.errors import IndexReplacedError, NotFoundError
from indexer.paths import shown
from indexer.search.moments import find_moments, timeline
from indexer.search.request import (
    DEFAULT_K,
    RerankMode,
    SearchError,
    SearchFilters,
    SearchRequest,
    is_slow,
    search_request,
)
from indexer.search.rerankers import rerank_mode, stored_scores, with_model_defaults
from indexer.search.results import SearchResult, SegmentHit, VideoHit
from indexer.search.single_stream import read_segment_clip, single_stream_scores
from indexer.search.state import QUERY_CACHE, EncodedQuery, QueryCache, SharedLock
from indexer.store.index_reader import IndexReader
from indexer.store.records import SegmentInfo
from pvl_search.precision import DtypeChoice
from pvl_search.ranking import Fusion, best_segment_ranking, fuse, segment_keys


class Searcher:
    """Loads the model and opens the index once, then answers many queries.

    It follows the index on disk: when the folder or its database is replaced (deleted and
    restored, rebuilt) it reopens it at the next request instead of answering from the old
    copy, and when the index cannot be read it raises IndexStoreError until it can again.
    """

    def __init__(
        self,
        index_dir: str | Path,
        *,
        db_url: str | None = None,
        model_dir: str | Path | None = None,
        device: str | None = None,
        cross_layers: int | None = None,
        runner: ModelRunner | None = None,
        dtype: DtypeChoice = "auto",
        query_cache: int = QUERY_CACHE,
    ) -> None:
        self.index_dir = Path(index_dir)
        self.db_url = db_url
        self.runner = runner or ModelRunner.from_folder(model_dir, device=device, cross_layers=cross_layers,
                                                        dtype=dtype)
        self.query_cache = QueryCache(query_cache)
        self._swap = SharedLock()
        self._reopening = threading.Lock()
        self._stale = False  # the database was replaced under the open store (a refresh saw it)
        self.store = self._open()

    def _open(self) -> IndexReader:
        store = IndexReader(self.index_dir, self.db_url)
        try:
            store.check_model(self.runner.config.to_json(), self.runner.fingerprint)
        except BaseException:
            store.close()
            raise
        return store

    def _reopen(self) -> None:
        """Open the index again and swap it in once no request uses the old one. If it
        cannot be opened (deleted, not restored yet) the error is raised and the old one
        kept, so the next request tries again."""
        with self._reopening:
            if not self.store.replaced() and not self._stale:
                return  # another thread has just reopened it
            fresh = self._open()
            with self._swap.exclusive():
                old, self.store, self._stale = self.store, fresh, False
            old.close()

    @contextmanager
    def _current(self) -> Iterator[IndexReader]:
        """The index as it is on disk now, held for one operation: reopened first if it was
        replaced, then caught up with what writers committed since the last request."""
        for attempt in range(2):
            if self.store.replaced() or self._stale:
                self._reopen()
            with self._swap.shared():
                store = self.store
                try:
                    store.refresh()  # new videos searchable (one SQL read if nothing changed)
                except IndexReplacedError:
                    if attempt:
                        raise
                    self._stale = True  # reopen, outside this shared hold, and try again
                    continue
                yield store
                return

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> Searcher:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ filters
    def allowed_segments(self, filters: SearchFilters) -> np.ndarray:
        """Ids of live segments whose video passes the filters (applied in SQL)."""
        return self.store.filtered_segment_ids(filters)

    # ------------------------------------------------------------------ search
    def run(self, request: SearchRequest) -> SearchResult:
        """Answer a request checked by `indexer.search.request.search_request`."""
        return self.run_many([request])[0]

    def run_many(self, requests: Sequence[SearchRequest]) -> list[SearchResult]:
        """Answer requests, each with its own k, filters and rerank mode, as one batch: one
        text-encoder call for the texts not in the query cache, one SQL read for all the
        candidates' rows, one refresh of the index view. Each answer is bit for bit the one
        the request gets alone: nothing whose rounding depends on the batch is batched
        (`ModelRunner._text_latents`, `_retrieve_many`, `_rerank`)."""
        if not requests:
            raise SearchError("no query given", "q")
        for r in requests:
            self._check([r.query], r.k, r.rerank_k, r.rerank, r.fusion)
        with self._current():  # the index as it is on disk now, kept for the whole batch
            return self._answer([self._resolved(r) for r in requests])

    def search(
        self,
        query: str,
        *,
        k: int = DEFAULT_K,
        rerank_k: int | None = None,
        rerank: RerankMode = "auto",
        fusion: Fusion | None = None,
        filters: SearchFilters | None = None,
    ) -> SearchResult:
        return self.search_many([query], k=k, rerank_k=rerank_k, rerank=rerank, fusion=fusion, filters=filters)[0]

    def search_many(
        self,
        queries: Sequence[str],
        *,
        k: int = DEFAULT_K,
        rerank_k: int | None = None,
        rerank: RerankMode = "auto",
        fusion: Fusion | None = None,
        filters: SearchFilters | None = None,
    ) -> list[SearchResult]:
        """Answer a batch of queries with the same settings (see `run_many`)."""
        self._check(queries, k, rerank_k, rerank, fusion)
        requests = [SearchRequest(q, k, rerank_k, rerank, fusion, filters or SearchFilters()) for q in queries]
        with self._current():  # the index as it is on disk now, kept for the whole batch
            return self._answer([self._resolved(r) for r in requests])

    def more_like(self, segment_id: int, *, k: int = DEFAULT_K, filters: SearchFilters | None = None) -> SearchResult:
        """"More like this moment": search with a segment's own stored embedding instead of a
        text (retrieval only: every reranker reads a text), with the same filters and grouping.
        The segment's own video comes first unless the filters leave it out. NotFoundError when
        the index has no such live segment."""
        search_request("like", k=k)  # the k rule, as for a text
        filters = filters or SearchFilters()
        started = time.perf_counter()
        with self._current() as store:
            if isinstance(segment_id, bool) or not store.is_live_segment(int(segment_id)):
                raise NotFoundError(f"no segment with id {segment_id}")
            xq = store.embeddings([int(segment_id)])[0]
            allowed = self.allowed_segments(filters) if filters.active() else None
            ids, sims, info = self._retrieve(xq[None], k, 0, allowed)
            hits = self._group(ids, sims, info, np.empty(0, np.float32), "calibrated", k)
            self._add_moments(hits, xq)
            timings = {"total": (time.perf_counter() - started) * 1000}
            return SearchResult(f"like:{int(segment_id)}", hits, "none", False, timings, self.runner.dtype_name,
                                store.encode_dtype(), store.windows())

    def _resolved(self, request: SearchRequest) -> SearchRequest:
        """The request with the model's defaults filled in, checked against the reranker it gets."""
        return with_model_defaults(request, self.runner, self.rerank_mode(request.rerank))

    def default_request(self, query: str) -> SearchRequest:
        """What a search for `query` with no options asks for (the model's defaults filled in)."""
        with self._current():
            return self._resolved(SearchRequest(query))

    def is_slow(self, request: SearchRequest) -> bool:
        """Whether the request resolves to a slow reranker (the server runs those one at a time).
        A request whose reranker cannot run here is not slow: its search answers the error."""
        try:
            return is_slow(self.rerank_mode(request.rerank))
        except SearchError:
            return False

    def _answer(self, requests: Sequence[SearchRequest]) -> list[SearchResult]:
        encoded, encode_ms = self._encode([r.query for r in requests])
        t1 = time.perf_counter()
        allowed: dict[tuple, np.ndarray | None] = {}  # one SQL filter per distinct filter set
        for r in requests:
            key = astuple(r.filters)
            if key not in allowed:
                allowed[key] = self.allowed_segments(r.filters) if r.filters.active() else None
        xq = np.stack([e.embedding for e in encoded])
        found, info = self._retrieve_many(requests, xq, allowed)
        # Retrieval (filters, FAISS, the one SQL read) is charged evenly to the requests.
        retrieve_ms = (time.perf_counter() - t1) * 1000 / len(requests)
        index_dtype, windows = self.store.encode_dtype(), self.store.windows()
        results = []
        for r, enc, (ids, sims), ms in zip(requests, encoded, found, encode_ms):
            t2 = time.perf_counter()
            mode = self.rerank_mode(r.rerank)
            n_rerank = min(len(ids), r.rerank_k) if mode != "none" else 0
            # One call per query, never one for the batch: a batched product rounds differently.
            rerank_scores = self._rerank(r.query, enc, ids[:n_rerank], info, mode)
            t3 = time.perf_counter()
            hits = self._group(ids, sims, info, rerank_scores, r.fusion, r.k)
            t4 = time.perf_counter()
            self._add_moments(hits, enc.embedding)
            t5 = time.perf_counter()
            timings = {"encode": ms, "retrieve": retrieve_ms, "rerank": (t3 - t2) * 1000, "lookup": (t4 - t3) * 1000,
                       "moments": (t5 - t4) * 1000}
            timings["total"] = sum(timings.values())
            results.append(SearchResult(r.query, hits, mode, enc.truncated, timings,
                                        self.runner.dtype_name, index_dtype, windows))
        return results

    def _encode(self, texts: Sequence[str]) -> tuple[list[EncodedQuery], list[float]]:
        """Each text's encoding, from the cache or from one encoder call for all the texts
        not in it; and the encoder's milliseconds per text (0 for a cached one)."""
        rows = {text: self.query_cache.get(text) for text in dict.fromkeys(texts)}
        todo = [text for text, row in rows.items() if row is None]
        ms = 0.0
        if todo:
            started = time.perf_counter()
            out = self.runner.encode_queries(todo)
            ms = (time.perf_counter() - started) * 1000 / len(todo)
            for j, text in enumerate(todo):
                latents = None if out.latents is None else out.latents[j]
                rows[text] = EncodedQuery(out.embeddings[j], out.rerank_states[j], out.truncated[j], latents)
                self.query_cache.put(text, rows[text])
        fresh = set(todo)
        return [rows[t] for t in texts], [ms if t in fresh else 0.0 for t in texts]

    @staticmethod
    def _check(queries: Sequence[str], k: int, rerank_k: int | None, rerank: str, fusion: str | None) -> None:
        """The request rules (indexer/search/request.py), for callers of the library too."""
        if not queries:
            raise SearchError("no query given", "q")
        for text in queries:
            search_request(text, k=k, rerank_k=rerank_k, rerank=rerank, fusion=fusion)

    def _retrieve_many(
        self, requests: Sequence[SearchRequest], xq: np.ndarray, allowed: dict[tuple, np.ndarray | None]
    ) -> tuple[list[tuple[np.ndarray, np.ndarray]], dict[int, SegmentInfo]]:
        """`_retrieve` for many requests: FAISS per request, then one SQL read of all their
        segments; a request whose list does not cover k videos yet then searches deeper
        alone, as `_retrieve` would have.

        FAISS is called once per query, not once per batch: a multi-query call scores with a
        matrix product (BLAS, from faiss_index's threshold on) whose rounding differs from a
        single query's (measured: last-bit differences, which reorder ties), and an answer
        must not depend on its batch. A FAISS call is small next to the text encoder."""
        found: list[tuple[np.ndarray, np.ndarray]] = []
        for i, r in enumerate(requests):
            passes = allowed[astuple(r.filters)]
            if passes is not None and len(passes) == 0:  # nothing passes the filters
                found.append((np.empty(0, np.int64), np.empty(0, np.float32)))
                continue
            D, I = self.store.search(xq[i : i + 1], self._depth(r), passes)
            keep = I[0] >= 0
            found.append((I[0][keep], D[0][keep]))
        info = self.store.segments(np.concatenate([ids for ids, _ in found]))  # one SQL round trip
        for i, r in enumerate(requests):
            ids, _ = found[i]
            fetch = self._depth(r)
            if len(ids) < fetch or len({info[s].video_id for s in ids.tolist() if s in info}) >= r.k:
                continue
            rerank_k = r.rerank_k if r.rerank != "none" else 0
            ids, sims, more = self._retrieve(xq[i : i + 1], r.k, rerank_k, allowed[astuple(r.filters)], fetch * 4)
            found[i] = (ids, sims)
            info.update(more)
        return found, info

    @staticmethod
    def _depth(request: SearchRequest) -> int:
        """Segments a first FAISS call fetches for `request`."""
        return max(request.k, request.rerank_k if request.rerank != "none" else 0)

    def _retrieve(
        self, xq: np.ndarray, k: int, rerank_k: int, allowed: np.ndarray | None, fetch: int | None = None
    ) -> tuple[np.ndarray, np.ndarray, dict[int, SegmentInfo]]:
        """Top segments by similarity and their metadata: at least `rerank_k` of them, and
        enough to cover `k` distinct videos (a long video can fill the list on its own).
        `fetch`: how deep the first FAISS call looks (default max(k, rerank_k))."""
        if allowed is not None and len(allowed) == 0:
            return np.empty(0, np.int64), np.empty(0, np.float32), {}
        fetch = fetch or max(k, rerank_k)
        while True:
            D, I = self.store.search(xq, fetch, allowed)
            keep = I[0] >= 0
            ids, sims = I[0][keep], D[0][keep]
            info = self.store.segments(ids)  # one SQL read, used by rerank and grouping too
            if len(ids) < fetch:  # everything there is
                return ids, sims, info
            videos = {seg.video_id for seg in info.values()}
            if len(videos) >= k or fetch >= 64 * max(k, rerank_k, 1):
                return ids, sims, info
            fetch *= 4

    def rerank_mode(self, requested: str) -> str:
        """The reranker a request gets (indexer/search/rerankers.py) on the index open now."""
        return rerank_mode(requested, self.runner, self.store)

    def _rerank(
        self, text: str, query: EncodedQuery, ids: np.ndarray, info: dict[int, SegmentInfo], mode: str
    ) -> np.ndarray:
        if len(ids) == 0 or mode == "none":
            return np.empty(0, np.float32)
        if is_slow(mode):
            return self._single_stream(text, ids, info)
        return stored_scores(self.runner, self.store, mode, query.rerank_state, query.latents, ids)

    def _single_stream(self, text: str, ids: np.ndarray, info: dict[int, SegmentInfo]) -> np.ndarray:
        """Decode the candidate segments again and run the joint encoder on each pair."""
        config = self.runner.config
        clips = [read_segment_clip(info[sid], config.frames, config.frame_size) for sid in ids.tolist()]
        return single_stream_scores(self.runner, text, clips)

    def _group(
        self,
        ids: np.ndarray,
        sims: np.ndarray,
        info: dict[int, SegmentInfo],
        rerank_scores: np.ndarray,
        fusion: Fusion,
        k: int,
    ) -> list[VideoHit]:
        """The top `k` videos by the ranking rule (pvl_search.ranking), each with its best
        segment; `rerank_scores` belong to the first rows of `ids`."""
        rows = np.asarray([row for row, sid in enumerate(ids.tolist())
                           if (seg := info.get(sid)) is not None and not seg.removed], dtype=np.int64)
        if len(rows) == 0:
            return []
        sims = np.asarray(sims)[rows]
        n_reranked = int((rows < len(rerank_scores)).sum())  # reranked rows come first
        logits = np.asarray(rerank_scores)[rows[:n_reranked]]
        fused = fuse(sims[:n_reranked], logits, fusion, self.runner.retrieval_scale)
        keys = segment_keys(sims, np.arange(n_reranked), fused)
        videos, best = best_segment_ranking(keys, np.asarray([info[int(ids[r])].video_id for r in rows]))
        hits = []
        for rank, (vid, row) in enumerate(zip(videos[:k].tolist(), best[:k].tolist())):
            sid = int(ids[rows[row]])
            seg = info[sid]
            logit = float(logits[row]) if row < n_reranked else None
            hit = SegmentHit(sid, seg.start_s, seg.end_s, float(sims[row]), logit, float(keys.score[row]))
            # The video's path (as shown, = its SQL text) and length came with the segment rows.
            hits.append(VideoHit(rank + 1, vid, shown(seg.path), seg.duration, hit.score, hit))
        return hits

    def _add_moments(self, hits: list[VideoHit], query: np.ndarray) -> None:
        """Each hit's moments and timeline, from the retrieval score of every segment of its
        video (indexer/search/moments.py): one SQL read and one product for all the hits."""
        if not hits:
            return
        per_video = self.store.video_segments(h.video_id for h in hits)
        for hit in hits:
            segments = per_video[hit.video_id]
            if len(segments.ids) == 0:
                continue
            scores = self.store.embeddings(segments.ids) @ np.asarray(query, np.float32)
            hit.moments = find_moments(segments, scores, hit.best.segment_id)
            hit.timeline = timeline(segments, scores, hit.duration)

    def counts(self) -> tuple[int, int]:
        """(indexed videos, searchable segments) in the index as it is on disk now."""
        with self._current() as store:
            return store.counts()

    def video(self, video_id: int) -> dict:
        """Metadata of one video and its segments (for `GET /videos/{id}`); NotFoundError
        when the index has no such video. `path` is the readable form (indexer/paths.py)."""
        with self._current() as store:
            details = store.video_details(video_id)
        if details is None:
            raise NotFoundError(f"no video with id {video_id}")
        return details
