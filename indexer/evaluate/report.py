"""What `pvl-search eval` reports: per method and rerank depth, R@1/5/10, median and mean
rank, latency, per-subset R@1 and twin-group metrics, and each query's rank."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from pvl_search.metrics import PairedChange, RetrievalMetrics, paired_top1_change

MULTI, MIXED, LATENT, JOINT, SINGLE, EXHAUSTIVE = "multi", "mixed", "latent", "joint", "single", "single-exhaustive"
PATCH, STACKED = "patch", "stacked"
DEFAULT_RERANK_KS = (8, 16, 32, 64, 128)
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
class MomentReport:
    """Moment retrieval with the default search (indexer/evaluate/moments.py); rates in %."""

    queries: int
    video_r1: float
    r1_iou50: float
    r1_iou70: float
    median_start_error_s: float | None  # None: no caption found its video first
    any_moment_r1_iou50: float
    mean_moments: float  # moments returned with the first result, on average
    latency_p50_ms: float

    def to_dict(self) -> dict:
        return asdict(self)


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
    moments: MomentReport | None = None  # when the captions carry time spans (indexer/evaluate/moments.py)

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
    def from_dict(cls, data: dict[str, Any]) -> EvalReport:
        data = dict(data)
        methods = []
        for raw in data.pop("methods"):
            raw = dict(raw)
            raw["metrics"] = RetrievalMetrics(**raw["metrics"])
            methods.append(MethodResult(**raw))
        if data.get("moments") is not None:
            data["moments"] = MomentReport(**data["moments"])
        return cls(methods=methods, **data)
