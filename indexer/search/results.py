"""What a search answers: result videos, each with the segment that ranked it and the moments
inside it (indexer/search/moments.py), as plain values that serialise to the JSON of
`search --json` and `GET /search`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from indexer.search.moments import Moment, Timeline
from pvl_search.media.windows import Windows


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
    best: SegmentHit  # the segment that ranked the video
    moments: list[Moment] = field(default_factory=list)  # the best first; it grows from `best`
    timeline: Timeline | None = None  # scores along the whole video

    def to_dict(self) -> dict:
        # By hand, not dataclasses.asdict: asdict deep-copies every timeline score, which cost
        # about 1 ms of a served search's 10 (BENCHMARKS.md, "Served queries").
        return {"rank": self.rank, "video_id": self.video_id, "path": self.path, "duration": self.duration,
                "score": self.score, "best": asdict(self.best), "moments": [m.to_dict() for m in self.moments],
                "timeline": None if self.timeline is None else self.timeline.to_dict()}


@dataclass
class SearchResult:
    query: str
    hits: list[VideoHit]
    rerank: str
    truncated: bool  # the query was longer than the model reads; its tail was ignored
    timings_ms: dict[str, float] = field(default_factory=dict)
    dtype: str = "float32"  # what the query was encoded in
    index_dtype: str | None = None  # what the index's segments were encoded in (None: not recorded)
    windows: Windows | None = None  # what the index's videos are cut into (None: not recorded)

    def to_dict(self) -> dict:
        return {"query": self.query, "hits": [hit.to_dict() for hit in self.hits], "rerank": self.rerank,
                "truncated": self.truncated, "timings_ms": dict(self.timings_ms), "dtype": self.dtype,
                "index_dtype": self.index_dtype, "windows": None if self.windows is None else asdict(self.windows)}
