"""What a search request may ask for: the one set of rules that `pvl-search search`, the HTTP
API and `Searcher.search` all apply, so the same request gets the same answer everywhere.

`search_request` takes the values as a caller parsed them (the CLI from its options, the
server from the query string) and returns a checked `SearchRequest`, or raises `SearchError`
naming the parameter. `since` is read here, once: an ISO 8601 date or date/time (UTC when it
has no offset) or a number of seconds since 1970, always returned as an aware UTC datetime.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Literal

from pvl_search.ranking import FUSIONS, Fusion

# auto: the reranker the model's validation chose (its search_defaults.json), else mixed.
RerankMode = Literal["auto", "stacked", "patch", "joint", "mixed", "latent", "single", "none"]
RERANK_MODES: tuple[str, ...] = ("auto", "stacked", "patch", "joint", "mixed", "latent", "single", "none")

DEFAULT_K = 10  # videos per answer
# Segments reranked and the fusion, when neither the request nor the model's
# search_defaults.json names them (indexer/search/rerankers.py fills them in).
DEFAULT_RERANK_K = 50
DEFAULT_FUSION: Fusion = "calibrated"

MAX_QUERY_CHARS = 1000  # a query, and a path pattern
MAX_K = 100  # videos per answer
MAX_RERANK_K = 1000  # segments retrieved and reranked
MAX_SINGLE_RERANK_K = 64  # single-stream rerank decodes every candidate again: keep K small


class SearchError(ValueError):
    """A request the searcher refuses; the message says why and `param` names the parameter."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass
class SearchFilters:
    path_glob: str | None = None  # shell-style, case-sensitive pattern on the path, e.g. "*/news/*"
    min_duration: float | None = None  # seconds
    max_duration: float | None = None
    added_since: datetime | None = None  # aware UTC

    def active(self) -> bool:
        return any(v is not None for v in asdict(self).values())


@dataclass(frozen=True)
class SearchRequest:
    query: str
    k: int = DEFAULT_K
    rerank_k: int | None = None  # None: the model's choice (search_defaults.json), else DEFAULT_RERANK_K
    rerank: RerankMode = "auto"
    fusion: Fusion | None = None  # None: the model's choice, else DEFAULT_FUSION
    filters: SearchFilters = field(default_factory=SearchFilters)


def is_slow(mode: str) -> bool:
    """Whether a (resolved) rerank mode decodes every candidate again: such requests are
    limited in depth and run one at a time in the server."""
    return mode == "single"


def check_rerank_depth(mode: str, rerank_k: int) -> None:
    """The depth limit of a slow rerank mode (SearchError naming rerank_k)."""
    if is_slow(mode) and rerank_k > MAX_SINGLE_RERANK_K:
        raise SearchError(f"rerank_k must be at most {MAX_SINGLE_RERANK_K} with rerank={mode} (it decodes "
                          f"every candidate again), got {rerank_k}", "rerank_k")


def check_fusion(fusion: object) -> None:
    """SearchError unless `fusion` names one of the ranking rules (pvl_search.ranking.FUSIONS)."""
    if fusion not in FUSIONS:
        raise SearchError(f"fusion must be one of {', '.join(FUSIONS)}, got {_short(fusion)}", "fusion")


def search_request(
    query: str,
    *,
    k: int = DEFAULT_K,
    rerank_k: int | None = None,
    rerank: str = "auto",
    fusion: str | None = None,
    glob: str | None = None,
    min_duration: float | None = None,
    max_duration: float | None = None,
    since: str | float | datetime | None = None,
) -> SearchRequest:
    """Check every parameter of a search; raises SearchError for the first one that is wrong."""
    if not isinstance(query, str) or not query.strip():
        raise SearchError("the query is empty: say what to look for", "q")
    if len(query) > MAX_QUERY_CHARS:
        raise SearchError(f"the query is {len(query)} characters long; at most {MAX_QUERY_CHARS} are allowed", "q")
    k = _whole("k", k, MAX_K)
    if rerank not in RERANK_MODES:
        raise SearchError(f"rerank must be one of {', '.join(RERANK_MODES)}, got {_short(rerank)}", "rerank")
    if fusion is not None:
        check_fusion(fusion)
    if rerank_k is not None:
        rerank_k = _whole("rerank_k", rerank_k, MAX_RERANK_K)
        check_rerank_depth(rerank, rerank_k)  # "auto" is checked once resolved (rerankers.py)
    if glob is not None and len(glob) > MAX_QUERY_CHARS:
        raise SearchError(f"glob is {len(glob)} characters long; at most {MAX_QUERY_CHARS} are allowed", "glob")
    low, high = _seconds("min_duration", min_duration), _seconds("max_duration", max_duration)
    if low is not None and high is not None and low > high:
        raise SearchError(f"min_duration ({low:g}) is greater than max_duration ({high:g})", "min_duration")
    filters = SearchFilters(glob or None, low, high, parse_since(since))
    return SearchRequest(query, k, rerank_k, rerank, fusion, filters)  # type: ignore[arg-type]


def parse_since(value: str | float | datetime | None) -> datetime | None:
    """`since` as an aware UTC datetime: ISO 8601 (no offset: UTC) or seconds since 1970."""
    if value is None or isinstance(value, datetime):
        return None if value is None else _utc(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return _from_epoch(float(value), value)
    text = str(value).strip()
    if not text:
        return None
    try:
        return _from_epoch(float(text), value)
    except ValueError:
        pass  # not a number: a date
    try:
        return _utc(datetime.fromisoformat(text))
    except ValueError:
        raise SearchError(f"since must be an ISO 8601 date or date/time (e.g. 2026-11-01 or "
                          f"2026-11-01T12:00:00+02:00) or seconds since 1970, got {_short(value)}", "since") from None


def _from_epoch(seconds: float, given: object) -> datetime:
    try:
        if not math.isfinite(seconds):
            raise ValueError
        return datetime.fromtimestamp(seconds, timezone.utc)
    except (ValueError, OverflowError, OSError):
        raise SearchError(f"since is not a time: {_short(given)}", "since") from None


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


def _whole(name: str, value: object, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SearchError(f"{name} must be a whole number, got {_short(value)}", name)
    if not 1 <= value <= high:
        raise SearchError(f"{name} must be between 1 and {high}, got {value}", name)
    return value


def _seconds(name: str, value: float | None) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise SearchError(f"{name} must be a number of seconds, 0 or more, got {_short(value)}", name)
    return float(value)


def _short(value: object, limit: int = 40) -> str:
    """`value` for an error message, cut short: an answer never echoes a whole long input."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
