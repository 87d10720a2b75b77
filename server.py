"""pvl-search HTTP API: the same Searcher as `pvl-search search`, behind FastAPI + uvicorn.

Layer 3, beside cli.py: it parses HTTP requests, calls indexer.search.searcher and returns JSON
(only /health reads the index database itself, for two counts). The model and the index are loaded once, at start-up
(`serve`); every search refreshes the read-only view of the index, so videos indexed while
the server runs become searchable without a restart.

    GET /search?q=...&k=&rerank_k=&rerank=&fusion=&glob=&min_duration=&max_duration=&since=
    GET /search?like=SEGMENT_ID&k=&glob=&min_duration=&max_duration=&since=   more like this moment
    GET /videos/{id}
    GET /videos/{id}/file[?download=1]   the video itself (HTTP Range: 206 Partial Content)
    GET /segments/{id}/thumbnail         JPEG of the segment, made at index time
    GET /health
    GET /  and /static/...               the web page (pvl_web/static)

Files are looked up by id, never by path: only indexed videos that are still on disk, and
thumbnails of live segments; anything else is 404. With a token (required to listen beyond
loopback) every request needs it (pvl_web.auth). `serve` answers only requests whose Host names
this server (pvl_web.hosts: loopback names, its address, --allowed-host), against DNS rebinding.

Errors are JSON `{"detail": ...}`: 422 for a parameter of the wrong type (FastAPI's
validation; a long input is cut short in the echo), 400 for a request the searcher refuses
(indexer/search/request.py, the same rules as `pvl-search search`; `q` with `like`), 404 for an
unknown video or `like` segment, 429
with Retry-After when the single-stream rerank slots are all busy, 503 with a one-line reason
while the index cannot be read (it recovers by itself when the index is back), 500
`"internal error"` (logged, never a traceback) for anything else.

The server follows its index folder: if it is replaced (deleted and restored, rebuilt) the
next request reopens it. Single-stream rerank decodes every candidate again; at most
`single_slots` such requests run at once, so they never queue up in front of plain searches.

Every hit carries its moments and a relevance timeline (indexer/search/moments.py) and the
URLs of its file and thumbnails (pvl_web.present). `like` searches with a stored segment's own
embedding (Searcher.more_like): no text to encode, so it skips the batcher below.

Searches that arrive within a few milliseconds of each other are answered together
(indexer/search/batching.py: one text-encoder call and one SQL read of segment rows per batch);
each answer is exactly the one the request gets alone, and a lone request waits at most
the window.
"""

from __future__ import annotations

import functools
import os
import socket
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated

import orjson
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles

from indexer.paths import relative_shown
from indexer.search.batching import BATCH_WINDOW_S, MAX_BATCH, QueryBatcher
from indexer.search.request import (
    DEFAULT_K,
    DEFAULT_RERANK_K,
    MAX_K,
    MAX_QUERY_CHARS,
    MAX_RERANK_K,
    MAX_SINGLE_RERANK_K,
    RERANK_MODES,
    SearchError,
    search_request,
)
from indexer.search.searcher import Searcher, SearchResult
from indexer.search.state import QUERY_CACHE
from indexer.store.media_files import thumbnail_file, video_file
from pvl_search.precision import DtypeChoice
from pvl_search.ranking import FUSION_HELP
from pvl_web import PAGE, PAGE_CSP, STATIC_DIR
from pvl_web.auth import TokenGate, check_token, is_loopback
from pvl_web.files import MediaResponse, content_disposition
from pvl_web.guards import SingleStreamGate, found, guarded
from pvl_web.heap import settle_heap
from pvl_web.hosts import AllowedHosts, HostGate
from pvl_web.present import json_safe, search_json
from pvl_web.worker_processes import run_workers

SINGLE_SLOTS = 1  # single-stream rerank requests running at once; more wait in the client
ECHO_CHARS = 80  # a 422 shows at most this much of the input it refuses

# Media answers: private (the token may guard them), revalidated (a file may change), never sniffed.
MEDIA_HEADERS = {"Cache-Control": "private, no-cache", "X-Content-Type-Options": "nosniff"}


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def malformed(_request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's 422 echoes each refused input whole: cut it short.
        errors = []
        for error in exc.errors():
            error = dict(error)
            error.pop("ctx", None)  # may hold exception objects, not JSON
            text = error.get("input")
            if isinstance(text, str) and len(text) > ECHO_CHARS:
                error["input"] = text[:ECHO_CHARS] + "..."
            errors.append(error)
        return JSONResponse({"detail": json_safe(errors)}, status_code=422)

    @app.exception_handler(Exception)
    async def unexpected(_request: Request, _exc: Exception) -> JSONResponse:
        # Backstop for errors outside the endpoints; uvicorn logs the traceback server-side.
        return JSONResponse({"detail": "internal error"}, status_code=500)


def _add_search_route(app: FastAPI, searcher: Searcher, batcher: QueryBatcher, gate: SingleStreamGate,
                      path_root: str | Path | None) -> None:
    @app.get("/search")
    def search(
        q: Annotated[str | None, Query(
            description=f"What to look for, in words (at most {MAX_QUERY_CHARS} characters); or give `like`."
        )] = None,
        like: Annotated[int | None, Query(
            ge=0, le=2**63 - 1, description="More like this moment: a segment id from a hit's `moments` or `best`. "
            "Searches with that segment's own embedding (retrieval only) instead of `q`; the filters and `k` apply."
        )] = None,
        k: Annotated[int, Query(description=f"Videos to return (1 to {MAX_K}).")] = DEFAULT_K,
        rerank_k: Annotated[int | None, Query(description=f"Segments retrieved and reranked (1 to {MAX_RERANK_K}; "
                                              f"default: the model's choice, else {DEFAULT_RERANK_K}).")] = None,
        rerank: Annotated[str, Query(
            description=f"{', '.join(RERANK_MODES)}: auto (the reranker the model's validation chose), stacked "
            f"(latent + weighted patch logits), patch (a cross-encoder: the query reads each candidate's stored "
            f"patch tokens), joint (a "
            f"cross-encoder over the query's and the stored video latents), mixed "
            f"(the paper's [CLS] decoder, stored states), latent (query latents over stored video latents), "
            f"single (decodes again; rerank_k <= {MAX_SINGLE_RERANK_K}), none."
        )] = "auto",
        fusion: Annotated[str | None, Query(
            description=FUSION_HELP
        )] = None,
        glob: Annotated[str | None, Query(
            description="Only videos whose full path matches, e.g. */news/*: * and ? wildcards, case-sensitive."
        )] = None,
        min_duration: Annotated[float | None, Query(description="Seconds, at least.")] = None,
        max_duration: Annotated[float | None, Query(description="Seconds, at most.")] = None,
        since: Annotated[str | None, Query(
            description="Only videos added since this ISO 8601 date or date/time (UTC when it has no "
            "offset), or this many seconds since 1970."
        )] = None,
    ) -> dict:
        if like is not None:
            _like_only(q, rerank, rerank_k, fusion)
        elif q is None:  # what FastAPI answers for a missing required parameter
            raise RequestValidationError([{"type": "missing", "loc": ("query", "q"), "msg": "Field required",
                                           "input": None}])
        try:  # the same rules as `pvl-search search` (indexer/search/request.py)
            request = search_request("like" if like is not None else q, k=k, rerank_k=rerank_k, rerank=rerank,
                                     fusion=fusion, glob=glob, min_duration=min_duration,
                                     max_duration=max_duration, since=since)
        except SearchError as exc:
            raise HTTPException(status_code=400, detail=str(exc)) from None
        result: SearchResult
        if like is not None:  # no text to encode: not through the batcher (this runs in the thread pool)
            result = found(lambda: searcher.more_like(like, k=request.k, filters=request.filters))
        elif searcher.is_slow(request):  # the reranker it resolves to, "auto" included
            result = gate.run(lambda: guarded(lambda: batcher.submit(request)))
        else:
            result = guarded(lambda: batcher.submit(request))
        # Encoded here, once: FastAPI's own encoding walks every timeline score again (~1.4 ms),
        # and orjson writes an answer's ~1,200 numbers 10x faster than json (BENCHMARKS.md).
        body = guarded(lambda: search_json(result, searcher.store, path_root))
        return Response(orjson.dumps(body, option=orjson.OPT_NON_STR_KEYS), media_type="application/json")


def _like_only(q: str | None, rerank: str, rerank_k: int | None, fusion: str | None) -> None:
    """`like` searches by a stored embedding: a text, or a reranker (which reads one), is refused."""
    if q is not None:
        raise HTTPException(status_code=400, detail="give q (words) or like (a segment id), not both")
    if rerank not in ("auto", "none") or rerank_k is not None or fusion is not None:
        raise HTTPException(status_code=400, detail="like searches by the segment's embedding alone: "
                            "rerank, rerank_k and fusion do not apply")


def _add_index_routes(app: FastAPI, searcher: Searcher, path_root: str | Path | None) -> None:
    """Video metadata, health, the files (SQL only: no need to wait for a search), the page."""
    @app.get("/videos/{video_id}")
    def video(video_id: Annotated[int, PathParam(ge=0, le=2**63 - 1, description="A video id from /search.")]) -> dict:
        video = found(lambda: searcher.video(video_id))  # SQL only: no need to wait for a search
        return json_safe({**video, "path": relative_shown(video["path"], path_root)})

    @app.get("/health")
    def health() -> dict:
        videos, segments = guarded(searcher.counts)  # the index as it is on disk now
        return {"status": "ok", "videos": videos, "segments": segments, "model": searcher.runner.fingerprint[:12],
                "worker": os.getpid()}  # which server process answered (serve --workers)

    @app.api_route("/videos/{video_id}/file", methods=["GET", "HEAD"])
    def video_media(
        video_id: Annotated[int, PathParam(ge=0, le=2**63 - 1, description="A video id from /search.")],
        download: Annotated[bool, Query(description="As an attachment, to save.")] = False,
    ) -> FileResponse:
        media = found(lambda: video_file(searcher.store, video_id))
        # FileResponse answers Range requests (206, 416) itself: what <video> seeks with.
        saved = {"Content-Disposition": content_disposition(media.path.name)} if download else {}
        return MediaResponse(media.path, media_type=media.media_type, headers={**MEDIA_HEADERS, **saved})

    @app.api_route("/segments/{segment_id}/thumbnail", methods=["GET", "HEAD"])
    def thumbnail(
        segment_id: Annotated[int, PathParam(ge=0, le=2**63 - 1, description="A segment id from /search.")],
    ) -> FileResponse:
        media = found(lambda: thumbnail_file(searcher.store, segment_id))
        return MediaResponse(media.path, media_type=media.media_type, headers=MEDIA_HEADERS)

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(PAGE, media_type="text/html; charset=utf-8",
                            headers={"Content-Security-Policy": PAGE_CSP, "Cache-Control": "no-cache"})


def create_app(
    searcher: Searcher,
    *,
    token: str | None = None,
    docs: bool = True,
    path_root: str | Path | None = None,
    single_slots: int = SINGLE_SLOTS,
    batch_window_s: float = BATCH_WINDOW_S,
    max_batch: int = MAX_BATCH,
    allowed_hosts: AllowedHosts | None = None,
    wait_when_idle: bool = False,
    batcher: QueryBatcher | None = None,
) -> FastAPI:
    """The API and the page over an open Searcher (the caller owns it and closes it); with a
    `token`, every request must carry it (pvl_web.auth). `docs`: serve /docs, /redoc and
    /openapi.json. `path_root`: show video paths relative to this folder (a file outside it
    by its name alone), so answers do not expose the host's folders. Searches arriving
    within `batch_window_s` of each other are answered together, up to `max_batch` at once
    (indexer/search/batching.py; a request finding it idle is answered at once unless
    `wait_when_idle`); each answer is the one the request gets alone.
    `allowed_hosts`: else 403 (pvl_web.hosts); None: no Host check (in-process use; serve sets it)."""
    # The model is not safe for concurrent use, and a search refreshes the index view in
    # place: every text search goes through the batcher, whose one worker thread runs them.
    # A `like` search uses no model: like /videos it runs in the pool, on the reader's own
    # locking (its FAISS search holds the lock a refresh takes).
    # Endpoints are plain functions, so FastAPI runs them in its thread pool, where they
    # wait for their answer while the event loop stays free.
    batcher = batcher or _batcher(lambda: searcher, batch_window_s, max_batch, not wait_when_idle)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        batcher.close()  # waiting searches are answered first

    app = FastAPI(
        title="pvl-search",
        summary="Text-to-video search on Perceiver-VL",
        version=_version(),
        docs_url="/docs" if docs else None,
        redoc_url="/redoc" if docs else None,
        openapi_url="/openapi.json" if docs else None,
        lifespan=lifespan,
    )
    app.state.batcher = batcher
    _add_error_handlers(app)
    _add_search_route(app, searcher, batcher, SingleStreamGate(single_slots), path_root)
    _add_index_routes(app, searcher, path_root)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    if token is not None:
        app.add_middleware(TokenGate, token=token)
    if allowed_hosts is not None:  # added last: the outermost, before the token gate
        app.add_middleware(HostGate, allowed=allowed_hosts)
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
    token: str | None = None,
    docs: bool | None = None,
    path_root: str | Path | None = None,
    dtype: DtypeChoice = "auto",
    batch_window_s: float = BATCH_WINDOW_S,
    max_batch: int = MAX_BATCH,
    query_cache: int = QUERY_CACHE,
    allowed_hosts: Sequence[str] = (),
    workers: int = 1,
) -> None:
    """Bind the address, load the model and open the index once, then answer HTTP until
    interrupted (SIGINT / SIGTERM). `on_ready(url)` is called once requests are accepted.
    Any address but loopback needs a `token`, which every request must then carry.
    `docs` (/docs, /redoc): None serves them on loopback only. `path_root`, `batch_window_s`,
    `max_batch`: see create_app. `dtype`: what the model runs in (pvl_search/precision.py);
    `query_cache`: query encodings kept for repeated texts. A request's Host must be a loopback
    name, `host` or one of `allowed_hosts`, else 403 (pvl_web.hosts: the whole rule).
    `workers` > 1: that many processes answer on the one socket, each with its own model
    (pvl_web/worker_processes.py: more throughput under many clients).

    Everything that can fail at start-up fails here, before serving, as an exception for the
    caller to report in one line: ValueError (no token where one is needed, a short or
    non-ASCII one, an allowed host that is no name), OSError (the address is taken or not
    ours), then CheckpointError, IndexStoreError / ModelMismatchError (no index, another model)."""
    check_token(host, token)
    hosts = AllowedHosts.for_bind(host, allowed_hosts)
    docs = is_loopback(host) if docs is None else docs
    if path_root is not None and not Path(path_root).is_dir():
        raise ValueError(f"path root {path_root}: no such folder")
    sock = _listen(host, port)
    body = functools.partial(
        _serve_on, index_dir=index_dir, db_url=db_url, model_dir=model_dir, device=device, cross_layers=cross_layers,
        log_level=log_level, token=token, docs=docs, path_root=path_root, dtype=dtype, batch_window_s=batch_window_s,
        max_batch=max_batch, query_cache=query_cache, allowed_hosts=hosts)
    bound_host, bound_port = sock.getsockname()[:2]
    url = f"http://{f'[{bound_host}]' if ':' in bound_host else bound_host}:{bound_port}"
    def ready() -> None:
        if on_ready is not None:
            on_ready(url)

    try:
        if workers == 1:
            body(sock, ready)
        else:
            run_workers(body, sock, workers, ready)
    finally:
        sock.close()


def _serve_on(sock: socket.socket, ready: Callable[[], None], *, index_dir: str | Path, db_url: str | None,
              model_dir: str | Path | None, device: str | None, cross_layers: int | None, log_level: str,
              token: str | None, docs: bool, path_root: str | Path | None, dtype: DtypeChoice,
              batch_window_s: float, max_batch: int, query_cache: int, allowed_hosts: AllowedHosts) -> None:
    """One server process: load the model and open the index, then answer on `sock` until
    SIGINT / SIGTERM; `ready()` once requests are accepted."""
    import uvicorn

    opened: list[Searcher] = []
    # The model is loaded, warmed up and run on the batcher's one thread (QueryBatcher.call).
    batcher = _batcher(lambda: opened[0], batch_window_s, max_batch, True)
    try:
        opened.append(batcher.call(lambda: Searcher(
            index_dir, db_url=db_url, model_dir=model_dir, device=device, cross_layers=cross_layers, dtype=dtype,
            query_cache=query_cache)))
        with opened[0] as searcher:
            batcher.call(lambda: searcher.runner.encode_queries(["warm up"]))  # first-call costs paid now
            app = create_app(searcher, token=token, docs=docs, path_root=path_root, allowed_hosts=allowed_hosts,
                             batcher=batcher)
            server = uvicorn.Server(uvicorn.Config(app, log_level=log_level))
            settle_heap()  # start-up's objects out of the collector's walks (pvl_web/heap.py)
            ready()
            server.run(sockets=[sock])
    finally:
        batcher.close()


def _batcher(searcher: Callable[[], Searcher], window_s: float, max_batch: int, idle_at_once: bool) -> QueryBatcher:
    """The batcher of a server's text searches, answering through the searcher `searcher()`
    gives (serve opens it on the batcher's own thread, after the batcher exists)."""
    return QueryBatcher(lambda requests: searcher().run_many(requests), slow=lambda r: searcher().is_slow(r),
                        window_s=window_s, max_batch=max_batch, idle_at_once=idle_at_once)


def _listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: any free port); bound before the model
    loads, so a taken port is reported at once and not by uvicorn exiting the process."""
    if not 0 <= port <= 65535:  # else bind() raises OverflowError, not OSError
        raise OSError(f"cannot listen on {host}:{port}: a port is a number from 0 to 65535")
    # IPPROTO_TCP named, not 0: asyncio sets TCP_NODELAY only on sockets that say TCP, and
    # without it a kept-alive connection waited 40 ms (Nagle and delayed ACK) for every answer's
    # body after its headers (BENCHMARKS.md, "Served queries").
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
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
