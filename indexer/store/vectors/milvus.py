"""Segment vectors in Milvus: the same interface as `indexer.store.vectors.faiss_index.VectorIndex`, so the
index store keeps one crash-safety protocol whatever holds the vectors.

One collection per index (``pvl_<index uuid>``): ``id`` (segment id, primary key),
``embedding`` (FLOAT_VECTOR, inner product) and ``rerank`` (the segment's rerank state, an
ARRAY of FLOAT returned with every hit, so a search and its mixed-stream rerank need one
round trip). The same pymilvus client talks to a Milvus Lite ``.db`` folder (embedded) and
to a server (``http://HOST:19530``: Milvus Lite's gRPC server, Standalone, Distributed).

Derived data, like the FAISS file: SQL and the row stores stay the source of truth.
- Writes are upserts and deletes by primary key, so replaying them after a crash is
  harmless; `save` flushes the collection and then writes ``rows`` / ``removal_seq`` to a
  small JSON file in the index folder (tmp + fsync + rename), the point the store's
  recovery catches up from. The collection may hold more than that file says (a crash
  between an upsert and the next save): a writer that opens it deletes every id at or above
  the saved rows first, so what recovery re-adds is never there twice.
- A reader (searcher, server) never writes to Milvus: it searches ids below the saved rows
  there and keeps what a writer committed since (and removals) in memory, as the FAISS
  reader does; results of both are merged per query.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from indexer.errors import IndexStoreError
from indexer.store.vectors.faiss_index import VectorIndex
from pvl_search.durable import fsync_dir

META_VERSION = 1
MAX_LIMIT = 16_384  # Milvus' largest top-k and query page
_UPSERT_ROWS = 2_000  # rows per upsert call: stays under gRPC's default message size
_IN_LIST = 50_000  # ids per `id in [...]` expression chunk when deleting

_clients: dict[str, tuple[Any, int]] = {}  # uri -> (client, users): one client per process
_clients_lock = threading.Lock()


def _client(uri: str) -> Any:
    with _clients_lock:
        client, users = _clients.get(uri, (None, 0))
        if client is None:
            client = _connect(uri)
        _clients[uri] = (client, users + 1)
        return client


class _LiteFailures(logging.Handler):
    """Keeps the exceptions Milvus Lite logs while it starts. It logs why a .db would not
    open (with a traceback, on stderr) and hands pymilvus only "Open local milvus failed":
    caught here, the reason goes into the one-line error instead."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.errors: list[BaseException] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info and record.exc_info[1] is not None:
            self.errors.append(record.exc_info[1])


def _connect(uri: str) -> Any:
    """A client for `uri`; IndexStoreError, one line with the reason, when there is none."""
    from pymilvus import MilvusClient

    lite = uri.endswith(".db")
    if lite and not Path(uri).parent.is_dir():
        raise IndexStoreError(f"cannot open Milvus Lite file {uri}: folder {Path(uri).parent} does not exist")
    caught, logger = _LiteFailures(), logging.getLogger("milvus_lite")
    propagate, logger.propagate = logger.propagate, False  # its traceback must not reach stderr
    logger.addHandler(caught)
    try:
        return MilvusClient(uri=uri)
    except Exception as exc:  # noqa: BLE001 - any client failure is one line for the user
        if lite and caught.errors:
            reason = _lite_reason(uri, caught.errors[-1])
            raise IndexStoreError(f"cannot open Milvus Lite file {uri}: {reason}") from None
        raise IndexStoreError(f"cannot reach Milvus at {uri}: {_short(exc)}") from None
    finally:
        logger.removeHandler(caught)
        logger.propagate = propagate


def _lite_reason(uri: str, exc: BaseException) -> str:
    from milvus_lite.exceptions import DataDirLockedError

    if isinstance(exc, DataDirLockedError):
        # Milvus Lite is embedded: one process at a time may open a .db.
        return ("another process holds it (a running `pvl-search serve`?): stop that process, or run Milvus as "
                "a server (python -m milvus_lite server --data-dir FILE) and use --vectors milvus:http://HOST:PORT")
    if isinstance(exc, OSError) and exc.strerror:
        where = exc.filename if exc.filename and exc.filename != uri else None  # e.g. its LOCK file
        return exc.strerror + (f": {where}" if where else "")
    return _short(exc)


def _release(uri: str) -> None:
    """Drop one user of the client; the last one closes it and, for a Milvus Lite file, stops
    the in-process server, so that the folder's lock is free for another process."""
    with _clients_lock:
        client, users = _clients.get(uri, (None, 0))
        if client is None:
            return
        if users > 1:
            _clients[uri] = (client, users - 1)
            return
        del _clients[uri]
    try:
        client.close()
    finally:
        if uri.endswith(".db"):
            from milvus_lite import server_manager_instance

            server_manager_instance.release_server(uri)


def _short(exc: BaseException) -> str:
    message = getattr(exc, "message", None)  # pymilvus' exceptions: the text without "<...(code=...)>"
    text = str(message if isinstance(message, str) and message else exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def collection_name(index_uuid: str) -> str:
    return f"pvl_{index_uuid}"


class MilvusVectors:
    """Inner-product search over segment embeddings in one Milvus collection (see module doc).

    `rerank_rows(ids)` gives the stored rerank states of committed segments (the row store):
    they are written beside each embedding."""

    def __init__(
        self,
        dim: int,
        rerank_width: int,
        uri: str,
        collection: str,
        rerank_rows: Callable[[np.ndarray], np.ndarray],
        *,
        index_type: str = "FLAT",
        read_only: bool = False,
    ) -> None:
        self.dim, self.rerank_width = int(dim), int(rerank_width)
        self.uri, self.collection, self.index_type = uri, collection, index_type
        self.read_only = read_only
        self.meta: dict[str, Any] = {}
        self._rerank_rows = rerank_rows
        self._client = _client(uri)
        self._closed = False
        self._local = threading.local()  # per thread: rerank states of the last search's hits
        # Reader only: Milvus is searched below `_remote_rows`; newer rows live in `_overlay`,
        # removed ids below `_remote_rows` are hidden.
        self._remote_rows = 0
        self._overlay = VectorIndex(self.dim, approx_threshold=1 << 62)
        self._hidden: set[int] = set()
        if self.exists():
            # A server (re)started holds collections released: searchable only once loaded.
            self._call(self._client.load_collection, self.collection)
        elif not read_only:
            self._create()

    # -- collection ------------------------------------------------------------------------

    def _call(self, fn: Callable, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - pymilvus raises its own and gRPC errors
            raise IndexStoreError(f"Milvus {self.uri} ({self.collection}): {_short(exc)}") from None

    def _create(self) -> None:
        from pymilvus import DataType

        schema = self._client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("embedding", DataType.FLOAT_VECTOR, dim=self.dim)
        schema.add_field("rerank", DataType.ARRAY, element_type=DataType.FLOAT, max_capacity=self.rerank_width)
        params = self._client.prepare_index_params()
        params.add_index(field_name="embedding", index_type=self.index_type, metric_type="IP")
        self._call(self._client.create_collection, self.collection, schema=schema, index_params=params)

    def exists(self) -> bool:
        return bool(self._call(self._client.has_collection, self.collection))

    def truncate(self, rows: int) -> None:
        """Writer: delete every id >= `rows` (upserted after the last save, see module doc)."""
        self._call(self._client.delete, self.collection, filter=f"id >= {int(rows)}")

    # -- properties ------------------------------------------------------------------------

    @property
    def ntotal(self) -> int:
        where = f"id < {self._remote_rows}" if self.read_only else "id >= 0"
        res = self._call(self._client.query, self.collection, filter=where, output_fields=["count(*)"])
        remote = int(res[0]["count(*)"]) if res else 0
        return remote - len(self._hidden) + self._overlay.ntotal

    @property
    def is_approximate(self) -> bool:
        return self.index_type.upper() != "FLAT"

    @property
    def description(self) -> str:
        return f"Milvus {self.index_type} ({self.collection} at {self.uri})"

    def ids(self) -> np.ndarray:
        """Every id searchable through this object (int64, unordered)."""
        where = f"id < {self._remote_rows}" if self.read_only else "id >= 0"
        found: list[int] = []
        last = -1
        while True:  # pages by id: Milvus caps one query's rows
            page = self._call(self._client.query, self.collection, filter=f"{where} and id > {last}",
                              output_fields=["id"], limit=MAX_LIMIT)
            got = sorted(int(r["id"]) for r in page)
            found += got
            if len(got) < MAX_LIMIT:
                break
            last = got[-1]
        remote = np.asarray([i for i in found if i not in self._hidden], np.int64)
        return np.concatenate([remote, self._overlay.ids()])

    # -- updates ---------------------------------------------------------------------------

    def add(self, xb: np.ndarray, ids: Any) -> None:
        """Add vectors (and their stored rerank states) under new ids."""
        ids = np.asarray(ids, np.int64).reshape(-1)
        xb = np.ascontiguousarray(xb, np.float32)
        if xb.ndim != 2 or xb.shape != (len(ids), self.dim):
            raise ValueError(f"expected vectors of shape ({len(ids)}, {self.dim}), got {xb.shape}")
        if not len(ids):
            return
        if self.read_only:
            self._overlay.add(xb, ids)
            return
        states = np.asarray(self._rerank_rows(ids), np.float32)
        for lo in range(0, len(ids), _UPSERT_ROWS):
            rows = [
                {"id": int(i), "embedding": e.tolist(), "rerank": s.tolist()}
                for i, e, s in zip(ids[lo : lo + _UPSERT_ROWS], xb[lo : lo + _UPSERT_ROWS],
                                   states[lo : lo + _UPSERT_ROWS])
            ]
            self._call(self._client.upsert, self.collection, rows)

    def remove_ids(self, ids: Any) -> int:
        """Remove `ids` (absent ones are ignored); returns how many were asked for."""
        ids = np.asarray(ids, np.int64).reshape(-1)
        if not len(ids):
            return 0
        if self.read_only:
            self._overlay.remove_ids(ids)
            self._hidden.update(int(i) for i in ids if i < self._remote_rows)
            return len(ids)
        for lo in range(0, len(ids), _IN_LIST):
            self._call(self._client.delete, self.collection, ids=ids[lo : lo + _IN_LIST].tolist())
        return len(ids)

    def rebuild_from(self, embeddings: np.ndarray, ids: np.ndarray) -> None:
        """Replace the contents with `embeddings` under `ids` (a writer re-creates the
        collection; a reader stops using Milvus and holds them in memory)."""
        ids = np.asarray(ids, np.int64).reshape(-1)
        if self.read_only:
            self._remote_rows, self._hidden = 0, set()
            self._overlay = VectorIndex(self.dim, approx_threshold=1 << 62)
            self._overlay.add(np.asarray(embeddings, np.float32), ids)
            return
        if self.exists():
            self._call(self._client.drop_collection, self.collection)
        self._create()
        for lo in range(0, len(ids), 65_536):  # the stores hand out float16 rows in chunks
            self.add(np.asarray(embeddings[lo : lo + 65_536], np.float32), ids[lo : lo + 65_536])

    def set_search_params(self, **_params: Any) -> None:
        """FAISS's knobs (nprobe, efSearch) do not apply; Milvus' index keeps its own."""

    # -- search ----------------------------------------------------------------------------

    def search(self, xq: np.ndarray, k: int, allowed_ids: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k inner products: D (nq, k), I (nq, k), -1 where none; with `allowed_ids` only
        those come back (an id pre-filter from SQL, sent as a Milvus filter expression). The
        hits' rerank states are kept for `fetched_states` (this thread, this search only)."""
        xq = np.ascontiguousarray(np.atleast_2d(xq), np.float32)
        if k <= 0:
            raise ValueError(f"k must be positive, got {k}")
        D = np.full((len(xq), k), -np.finfo(np.float32).max, np.float32)
        I = np.full((len(xq), k), -1, np.int64)
        states: dict[int, np.ndarray] = {}
        allowed = None if allowed_ids is None else np.unique(np.asarray(allowed_ids, np.int64).reshape(-1))
        clauses = []
        if self.read_only:
            clauses.append(f"id < {self._remote_rows}")
            if allowed is not None:
                allowed = allowed[allowed < self._remote_rows]
        if allowed is not None:
            clauses.append(f"id in [{','.join(map(str, allowed.tolist()))}]")
        remote = not (self.read_only and self._remote_rows == 0) and (allowed is None or len(allowed))
        limit = min(MAX_LIMIT, k + len(self._hidden))  # hidden hits are dropped afterwards
        hits: list[list[tuple[float, int]]] = [[] for _ in xq]
        if remote:
            res = self._call(self._client.search, self.collection, data=xq.tolist(), limit=limit,
                             filter=" and ".join(clauses), output_fields=["rerank"],
                             search_params={"metric_type": "IP"}, anns_field="embedding")
            for row, found in enumerate(res):
                for hit in found:
                    sid = int(hit["id"])
                    if sid in self._hidden:
                        continue
                    hits[row].append((float(hit["distance"]), sid))
                    states[sid] = np.asarray(hit["entity"]["rerank"], np.float32)
        if self._overlay.ntotal:
            sub = None if allowed_ids is None else np.asarray(allowed_ids, np.int64)
            d_o, i_o = self._overlay.search(xq, k, sub)
            for row in range(len(xq)):
                hits[row] += [(float(d), int(i)) for d, i in zip(d_o[row], i_o[row]) if i >= 0]
        for row, found in enumerate(hits):
            found.sort(key=lambda h: (-h[0], h[1]))
            for col, (d, i) in enumerate(found[:k]):
                D[row, col], I[row, col] = d, i
        self._local.states = states
        return D, I

    def fetched_states(self, ids: np.ndarray) -> np.ndarray | None:
        """Rerank states of `ids` as the last search on this thread returned them, or None
        when any of them did not come with it (then read the row store)."""
        states = getattr(self._local, "states", None)
        if not states or not all(int(i) in states for i in ids):
            return None
        return np.stack([states[int(i)] for i in ids]) if len(ids) else np.zeros((0, self.rerank_width), np.float32)

    # -- files -----------------------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        """Flush the collection, then record `self.meta` in `path` (tmp, fsync, rename)."""
        path = Path(path)
        self._call(self._client.flush, self.collection)
        header = {"version": META_VERSION, "uri": self.uri, "collection": self.collection,
                  "index_type": self.index_type, "dim": self.dim, "meta": self.meta}
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w") as f:
            json.dump(header, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)

    @staticmethod
    def read_meta(path: str | Path) -> dict[str, Any] | None:
        """The header `save` wrote, or None when it is missing or damaged (then rebuild)."""
        try:
            header = json.loads(Path(path).read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(header, dict) or header.get("version") != META_VERSION:
            return None
        return header

    def start_reading_at(self, rows: int) -> None:
        """Reader: Milvus holds what was saved below `rows`; everything newer is caught up in
        memory."""
        self._remote_rows = int(rows)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            _release(self.uri)
