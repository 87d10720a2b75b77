"""pvl-search HTTP API: the same Searcher as `pvl-search search`, behind FastAPI + uvicorn.

Layer 3, beside cli.py: it parses HTTP requests, calls indexer.searcher and returns JSON
(only /health reads the index database itself, for two counts). The model and the index are loaded once, at start-up
(`serve`); every search refreshes the read-only view of the index, so videos indexed while
the server runs become searchable without a restart.

    GET /search?q=...&k=&rerank_k=&rerank=&fusion=&glob=&min_duration=&max_duration=&since=
    GET /videos/{id}
    GET /health

Errors are JSON `{"detail": ...}`: 422 for malformed parameters (FastAPI's validation),
400 for a query the searcher refuses, 404 for an unknown video, 503 when the index cannot
be read, 500 `"internal error"` (logged, never a traceback) for anything else.
"""

from __future__ import annotations

import logging
import math
import socket
import threading
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse
from sqlalchemy import func, select

from indexer.errors import IndexStoreError
from indexer.schema import Segment, Video, VideoStatus
from indexer.searcher import Searcher, SearchError, SearchFilters

MAX_QUERY_CHARS = 1000
MAX_K = 100  # videos per response
MAX_RERANK_K = 1000  # segments retrieved and reranked
MAX_SINGLE_RERANK_K = 64  # single-stream rerank decodes every candidate again: keep K small

log = logging.getLogger("pvl_search.server")

T = TypeVar("T")


def _json_safe(value: Any) -> Any:
    """Non-finite floats -> None (JSON has no inf/NaN; a file that went bad after indexing
    scores -inf in the single-stream rerank)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _internal_error(exc: BaseException) -> HTTPException:
    log.error("internal error: %s: %s", type(exc).__name__, exc, exc_info=exc)
    return HTTPException(status_code=500, detail="internal error")


def create_app(searcher: Searcher) -> FastAPI:
    """The API over an open Searcher (the caller owns it and closes it)."""
    app = FastAPI(
        title="pvl-search",
        summary="Text-to-video search on Perceiver-VL",
        version=_version(),
    )
    # The model is not safe for concurrent use, and a search refreshes the index view in
    # place: one search at a time. Endpoints are plain functions, so FastAPI runs them in
    # its thread pool and the event loop stays free while a search holds the lock.
    model_lock = threading.Lock()

    def guarded(fn: Callable[[], T], *, locked: bool = True) -> T:
        """Run `fn` (under the lock unless it only reads SQL); domain errors -> 400/503,
        anything else -> 500."""
        try:
            if not locked:
                return fn()
            with model_lock:
                return fn()
        except HTTPException:
            raise
        except SearchError as exc:
            raise HTTPException(status_code=400, detail=str(exc)) from None
        except IndexStoreError as exc:  # index missing, replaced or damaged since start-up
            log.warning("index unavailable: %s", exc)
            raise HTTPException(status_code=503, detail=str(exc)) from None
        except Exception as exc:
            raise _internal_error(exc) from None

    @app.exception_handler(Exception)
    async def unexpected(_request: Request, _exc: Exception) -> JSONResponse:
        # Backstop for errors outside the endpoints; uvicorn logs the traceback server-side.
        return JSONResponse({"detail": "internal error"}, status_code=500)

    @app.get("/search")
    def search(
        q: Annotated[str, Query(max_length=MAX_QUERY_CHARS, description="What to look for, in words.")],
        k: Annotated[int, Query(ge=1, le=MAX_K, description="Videos to return.")] = 10,
        rerank_k: Annotated[int, Query(ge=1, le=MAX_RERANK_K,
                                       description="Segments retrieved and reranked.")] = 50,
        rerank: Annotated[Literal["mixed", "single", "none"], Query(
            description=f"mixed (stored states), single (decodes again; rerank_k <= {MAX_SINGLE_RERANK_K}), none."
        )] = "mixed",
        fusion: Annotated[Literal["sum", "rerank"], Query(
            description="sum: retrieval similarity + rerank logit; rerank: the logit alone."
        )] = "sum",
        glob: Annotated[str | None, Query(max_length=MAX_QUERY_CHARS,
                                          description="Only videos whose path matches, e.g. */news/*.")] = None,
        min_duration: Annotated[float | None, Query(ge=0, description="Seconds, at least.")] = None,
        max_duration: Annotated[float | None, Query(ge=0, description="Seconds, at most.")] = None,
        since: Annotated[datetime | None, Query(
            description="Only videos added since this ISO 8601 date/time (UTC when it has no zone)."
        )] = None,
    ) -> dict:
        if not q.strip():
            raise HTTPException(status_code=400, detail="q is empty: say what to look for")
        if rerank == "single" and rerank_k > MAX_SINGLE_RERANK_K:
            raise HTTPException(
                status_code=400,
                detail=f"rerank_k must be at most {MAX_SINGLE_RERANK_K} with rerank=single "
                f"(it decodes every candidate again), got {rerank_k}",
            )
        if min_duration is not None and max_duration is not None and min_duration > max_duration:
            raise HTTPException(status_code=400, detail=f"min_duration ({min_duration}) is greater than "
                                f"max_duration ({max_duration})")
        if since is not None and since.tzinfo is None:
            since = since.replace(tzinfo=timezone.utc)
        filters = SearchFilters(glob or None, min_duration, max_duration, since)
        result = guarded(lambda: searcher.search(q, k=k, rerank_k=rerank_k, rerank=rerank, fusion=fusion,
                                                 filters=filters))
        return _json_safe(result.to_dict())

    @app.get("/videos/{video_id}")
    def video(video_id: Annotated[int, PathParam(ge=0, le=2**63 - 1, description="A video id from /search.")]) -> dict:
        def lookup() -> dict:
            try:
                return searcher.video(video_id)
            except IndexStoreError as exc:  # the one it raises: no such video
                raise HTTPException(status_code=404, detail=str(exc)) from None

        return _json_safe(guarded(lookup, locked=False))  # SQL only: no need to wait for a search

    @app.get("/health")
    def health() -> dict:
        def counts() -> tuple[int, int]:
            with searcher.store.db.sessions() as s:
                videos = s.scalar(select(func.count()).select_from(Video)
                                  .where(Video.status == VideoStatus.INDEXED.value))
                segments = s.scalar(select(func.count()).select_from(Segment).where(Segment.removed.is_(False)))
            return int(videos or 0), int(segments or 0)

        videos, segments = guarded(counts, locked=False)
        return {"status": "ok", "videos": videos, "segments": segments, "model": searcher.runner.fingerprint[:12]}

    return app


def serve(
    index_dir: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    db_url: str | None = None,
    model_dir: str | Path | None = None,
    device: str | None = None,
    cross_layers: int | None = None,
    log_level: str = "warning",
    on_ready: Callable[[str], None] | None = None,
) -> None:
    """Bind the address, load the model and open the index once, then answer HTTP until
    interrupted (SIGINT / SIGTERM). `on_ready(url)` is called once requests are accepted.

    Everything that can fail at start-up fails here, before serving, as an exception for the
    caller to report in one line: OSError (the address is taken or not ours), then
    CheckpointError, IndexStoreError / ModelMismatchError (no index, another model)."""
    import uvicorn

    sock = _listen(host, port)
    try:
        with Searcher(index_dir, db_url=db_url, model_dir=model_dir, device=device,
                      cross_layers=cross_layers) as searcher:
            server = uvicorn.Server(uvicorn.Config(create_app(searcher), log_level=log_level))
            if on_ready is not None:
                bound_host, bound_port = sock.getsockname()[:2]
                on_ready(f"http://{f'[{bound_host}]' if ':' in bound_host else bound_host}:{bound_port}")
            server.run(sockets=[sock])
    finally:
        sock.close()


def _listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: any free port); bound before the model
    loads, so a taken port is reported at once and not by uvicorn exiting the process."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pvl-search")
    except PackageNotFoundError:
        return "0"
