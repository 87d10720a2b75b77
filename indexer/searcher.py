"""Text-to-video search over a stored index: FAISS retrieval (multi-stream), then a rerank
of the top candidates (mixed-stream from stored rerank states, or single-stream by decoding
the candidates again), results grouped per video with the best segment's time span."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Literal

import numpy as np
from sqlalchemy import select

from indexer.encoding import ModelRunner
from indexer.errors import IndexStoreError
from indexer.index_store import IndexStore, SegmentInfo
from indexer.schema import Segment, Video, VideoStatus
from pvl_search.video import VideoDecodeError, read_clips

RerankMode = Literal["mixed", "single", "none"]
Fusion = Literal["sum", "rerank"]
RERANK_MODES: tuple[str, ...] = ("mixed", "single", "none")
MAX_K = 1000


class SearchError(ValueError):
    """A query the searcher refuses (empty, k out of range, ...); the message says why."""


@dataclass
class SearchFilters:
    path_glob: str | None = None  # shell-style pattern on the video's path, e.g. "*/news/*"
    min_duration: float | None = None  # seconds
    max_duration: float | None = None
    added_since: datetime | None = None

    def active(self) -> bool:
        return any(v is not None for v in asdict(self).values())


@dataclass
class SegmentHit:
    segment_id: int
    start_s: float
    end_s: float
    retrieval_score: float  # cosine of query and segment embeddings
    rerank_score: float | None  # VTM logit, when this segment was reranked
    score: float  # what the ranking used


@dataclass
class VideoHit:
    rank: int
    video_id: int
    path: str
    duration: float | None
    score: float
    best: SegmentHit  # the segment that matched best: the moment inside the video

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class SearchResult:
    query: str
    hits: list[VideoHit]
    rerank: str
    truncated: bool  # the query was longer than the model reads; its tail was ignored
    timings_ms: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def glob_to_like(pattern: str) -> str:
    """Shell glob -> SQL LIKE pattern (escape character '\\')."""
    out = []
    for ch in pattern:
        if ch in "%_\\":
            out.append("\\" + ch)
        elif ch == "*":
            out.append("%")
        elif ch == "?":
            out.append("_")
        else:
            out.append(ch)
    return "".join(out)


class Searcher:
    """Loads the model and opens the index once, then answers many queries."""

    def __init__(
        self,
        index_dir: str | Path,
        *,
        db_url: str | None = None,
        model_dir: str | Path | None = None,
        device: str | None = None,
        cross_layers: int | None = None,
        runner: ModelRunner | None = None,
    ) -> None:
        self.index_dir = Path(index_dir)
        self.runner = runner or ModelRunner.from_folder(model_dir, device=device, cross_layers=cross_layers)
        self.store = IndexStore(self.index_dir, db_url, read_only=True)
        try:
            self.store.check_model(self.runner.config.to_json(), self.runner.fingerprint)
        except BaseException:
            self.store.close()
            raise

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> "Searcher":
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ filters
    def allowed_segments(self, filters: SearchFilters) -> np.ndarray:
        """Ids of live segments whose video passes the filters (applied in SQL)."""
        query = (
            select(Segment.id)
            .join(Video, Segment.video_id == Video.id)
            .where(Segment.removed.is_(False), Video.status == VideoStatus.INDEXED.value)
        )
        if filters.path_glob:
            query = query.where(Video.path.like(glob_to_like(filters.path_glob), escape="\\"))
        if filters.min_duration is not None:
            query = query.where(Video.duration >= filters.min_duration)
        if filters.max_duration is not None:
            query = query.where(Video.duration <= filters.max_duration)
        if filters.added_since is not None:
            query = query.where(Video.created_at >= filters.added_since)
        with self.store.db.sessions() as s:
            return np.asarray(s.scalars(query.order_by(Segment.id)).all(), dtype=np.int64)

    # ------------------------------------------------------------------ search
    def search(
        self,
        query: str,
        *,
        k: int = 10,
        rerank_k: int = 50,
        rerank: RerankMode = "mixed",
        fusion: Fusion = "sum",
        filters: SearchFilters | None = None,
    ) -> SearchResult:
        return self.search_many([query], k=k, rerank_k=rerank_k, rerank=rerank, fusion=fusion, filters=filters)[0]

    def search_many(
        self,
        queries: Sequence[str],
        *,
        k: int = 10,
        rerank_k: int = 50,
        rerank: RerankMode = "mixed",
        fusion: Fusion = "sum",
        filters: SearchFilters | None = None,
    ) -> list[SearchResult]:
        """Answer a batch of queries: one text-encoder pass and one FAISS call for all."""
        self._check(queries, k, rerank_k, rerank, fusion)
        self.store.refresh()  # see videos indexed since the last query (one SQL read if none)
        started = time.perf_counter()
        encoded = self.runner.encode_queries(queries)
        encode_ms = (time.perf_counter() - started) * 1000 / len(queries)
        allowed = self.allowed_segments(filters) if filters is not None and filters.active() else None
        results = []
        for q, text in enumerate(queries):
            t0 = time.perf_counter()
            ids, sims, info = self._retrieve(
                encoded.embeddings[q : q + 1], k, rerank_k if rerank != "none" else 0, allowed
            )
            t1 = time.perf_counter()
            n_rerank = min(len(ids), rerank_k) if rerank != "none" else 0
            rerank_scores = self._rerank(text, encoded.rerank_states[q], ids[:n_rerank], info, rerank)
            t2 = time.perf_counter()
            hits = self._group(ids, sims, info, rerank_scores, fusion, k)
            t3 = time.perf_counter()
            timings = {"encode": encode_ms, "retrieve": (t1 - t0) * 1000, "rerank": (t2 - t1) * 1000,
                       "lookup": (t3 - t2) * 1000}
            timings["total"] = sum(timings.values())
            results.append(SearchResult(text, hits, rerank, encoded.truncated[q], timings))
        return results

    @staticmethod
    def _check(queries: Sequence[str], k: int, rerank_k: int, rerank: str, fusion: str) -> None:
        if not queries:
            raise SearchError("no query given")
        for text in queries:
            if not text or not text.strip():
                raise SearchError("the query is empty: say what to look for")
        if not 1 <= k <= MAX_K:
            raise SearchError(f"k must be between 1 and {MAX_K}, got {k}")
        if not 1 <= rerank_k <= 10 * MAX_K:
            raise SearchError(f"rerank-k must be between 1 and {10 * MAX_K}, got {rerank_k}")
        if rerank not in RERANK_MODES:
            raise SearchError(f"rerank must be one of {', '.join(RERANK_MODES)}, got {rerank!r}")
        if fusion not in ("sum", "rerank"):
            raise SearchError(f"fusion must be 'sum' or 'rerank', got {fusion!r}")

    def _retrieve(
        self, xq: np.ndarray, k: int, rerank_k: int, allowed: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray, dict[int, SegmentInfo]]:
        """Top segments by similarity and their metadata: at least `rerank_k` of them, and
        enough to cover `k` distinct videos (a long video can fill the list on its own)."""
        if allowed is not None and len(allowed) == 0:
            return np.empty(0, np.int64), np.empty(0, np.float32), {}
        fetch = max(k, rerank_k)
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

    def _rerank(
        self, text: str, query_state: np.ndarray, ids: np.ndarray, info: dict[int, SegmentInfo], mode: str
    ) -> np.ndarray:
        if len(ids) == 0 or mode == "none":
            return np.empty(0, np.float32)
        if mode == "mixed":
            states = self.store.rerank_states(ids)  # (K, D + H): read from the memory map
            return self.runner.mixed_scores(query_state[None], states[None])[0]
        return self._single_stream(text, ids, info)

    def _single_stream(
        self, text: str, ids: np.ndarray, info: dict[int, SegmentInfo], batch: int = 8
    ) -> np.ndarray:
        """Decode the candidate segments again and run the joint encoder on each pair."""
        config = self.runner.config
        scores = np.full(len(ids), -np.inf, dtype=np.float32)
        frames, masks, rows = [], [], []
        for row, sid in enumerate(ids.tolist()):
            seg = info[sid]
            try:
                clip = read_clips(seg.path, [(seg.start_s, max(seg.end_s, seg.start_s + 1e-3))],
                                  config.frames, config.frame_size)[0]
            except VideoDecodeError:
                continue  # a file that went bad after indexing ranks last
            frames.append(clip.frames)
            masks.append(clip.mask)
            rows.append(row)
        for start in range(0, len(rows), batch):
            part = slice(start, start + batch)
            scores[rows[part]] = self.runner.single_scores(np.stack(frames[part]), np.stack(masks[part]), text)
        return scores

    def _group(
        self,
        ids: np.ndarray,
        sims: np.ndarray,
        info: dict[int, SegmentInfo],
        rerank_scores: np.ndarray,
        fusion: str,
        k: int,
    ) -> list[VideoHit]:
        """Score segments, then keep each video's best segment; reranked segments rank ahead
        of the ones only retrieved (their scores are not on the same scale)."""
        n_reranked = len(rerank_scores)
        best: dict[int, tuple[tuple[int, float], SegmentHit]] = {}
        for row, (sid, sim) in enumerate(zip(ids.tolist(), sims.tolist())):
            seg = info.get(sid)
            if seg is None or seg.removed:
                continue
            reranked = row < n_reranked
            logit = float(rerank_scores[row]) if reranked else None
            if logit is None:
                score = sim
            else:
                score = logit if fusion == "rerank" else sim + logit
            key = (1 if reranked else 0, score)
            hit = SegmentHit(sid, seg.start_s, seg.end_s, float(sim), logit, float(score))
            if seg.video_id not in best or key > best[seg.video_id][0]:
                best[seg.video_id] = (key, hit)
        ranked = sorted(best.items(), key=lambda item: item[1][0], reverse=True)[:k]
        videos = self._videos([vid for vid, _ in ranked])
        return [
            VideoHit(rank + 1, vid, videos[vid][0], videos[vid][1], hit.score, hit)
            for rank, (vid, (_, hit)) in enumerate(ranked)
        ]

    def _videos(self, video_ids: list[int]) -> dict[int, tuple[str, float | None]]:
        if not video_ids:
            return {}
        with self.store.db.sessions() as s:
            rows = s.execute(select(Video.id, Video.path, Video.duration).where(Video.id.in_(video_ids)))
            return {r.id: (r.path, r.duration) for r in rows}

    def video(self, video_id: int) -> dict:
        """Metadata of one video and its segments (for `GET /videos/{id}`)."""
        with self.store.db.sessions() as s:
            video = s.get(Video, video_id)
            if video is None:
                raise IndexStoreError(f"no video with id {video_id}")
            segments = s.scalars(
                select(Segment).where(Segment.video_id == video_id, Segment.removed.is_(False)).order_by(Segment.start_s)
            ).all()
            return {
                "id": video.id, "path": video.path, "status": video.status, "duration": video.duration,
                "fps": video.fps, "width": video.width, "height": video.height, "error": video.error,
                "created_at": video.created_at.isoformat() if video.created_at else None,
                "segments": [{"id": seg.id, "start_s": seg.start_s, "end_s": seg.end_s} for seg in segments],
            }
