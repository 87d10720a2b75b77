"""A search answer as the JSON of `GET /search`: the library's own `to_dict()`, made JSON-safe,
with the URLs the page needs (the file, the best segment's and each moment's thumbnail, all
by id) and paths shown relative to the server's `path_root`."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from indexer.paths import relative_shown
from indexer.search.results import SearchResult
from indexer.store.index_reader import IndexReader
from indexer.store.media_files import has_thumbnail, media_type


def json_safe(value: Any) -> Any:
    """Non-finite floats -> None (JSON has no inf/NaN; a file that went bad after indexing
    scores -inf in the single-stream rerank)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def thumbnail_url(store: IndexReader, segment_id: int) -> str | None:
    """The URL of a segment's thumbnail, None when it has none (indexed without them)."""
    return f"/segments/{segment_id}/thumbnail" if has_thumbnail(store, segment_id) else None


def search_json(result: SearchResult, store: IndexReader, path_root: str | Path | None) -> dict:
    """`result` as JSON, each hit with `thumbnail_url`, `video_url`, `media_type`, and each of
    its moments with its `thumbnail_url`."""
    body = json_safe(result.to_dict())
    for hit in body["hits"]:
        hit["thumbnail_url"] = thumbnail_url(store, hit["best"]["segment_id"])
        hit["video_url"] = f"/videos/{hit['video_id']}/file"
        hit["media_type"] = media_type(hit["path"])  # the page asks the browser if it plays it
        hit["path"] = relative_shown(hit["path"], path_root)
        for moment in hit["moments"]:
            moment["thumbnail_url"] = thumbnail_url(store, moment["segment_id"])
    return body
