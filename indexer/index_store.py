"""One index on disk: SQL metadata + row stores + FAISS, kept consistent through crashes.

An index folder holds ``embeddings.f16`` (d per segment), ``rerank_states.f16`` (D + H),
optionally ``latents.f16`` (N * D), ``vectors.faiss``, ``index.lock``, ``thumbnails/`` (a
JPEG per segment, indexer/thumbnail_store.py) and, by default, the SQLite database
``index.sqlite`` (or any SQLAlchemy URL, e.g. PostgreSQL).

Crash-safety protocol (the process may be SIGKILLed at any instant):

1. SQL is the source of truth. ``index_info.committed_rows`` is the number of store rows
   that belong to committed segments; segment ids are store row numbers ``0..rows-1``.
2. ``add_video`` appends the video's rows to every store and fsyncs them FIRST, then commits
   ONE SQL transaction: video row (inserted or updated), its segments (ids = the new row
   numbers), ``committed_rows += n``. Rows appended but never committed are invisible: no
   segment points at them.
3. Removals (``mark_removed``, ``mark_failed``, re-indexing a changed file) only flag
   segments removed in SQL, in the same transaction bumping ``index_info.removal_seq``;
   store rows stay (append-only), only FAISS forgets the ids.
4. FAISS is derived. After a commit the in-memory index is updated; ``save_faiss`` writes it
   atomically (tmp + fsync + rename) with the ``committed_rows`` and ``removal_seq`` it
   reflects, and the index uuid.
5. On open (and after a write that failed half-way), recovery reads SQL and:
   - truncates every store to ``committed_rows`` (drops rows of an add that never
     committed; a torn last row is dropped by the store itself); a store SHORTER than that
     is damage, not a crash, and is refused;
   - loads the FAISS file; if it is missing, damaged, from another index or covers more
     rows than SQL, rebuilds it from the embedding store; otherwise adds the live segments
     in ``[file rows, committed_rows)`` and, if ``removal_seq`` differs, removes the ids of
     every removed segment below the file's rows. Ids are only ever added above the rows
     the file covers, so nothing is added twice.
   So after any crash: every FAISS id has its SQL row and its store rows, stores hold
   exactly the committed rows, and committed videos are known (``known_videos``) and are
   not redone.

A second writer on the same folder is refused (``index.lock``, flock: released by the
kernel when a process dies). The store headers and the FAISS file carry the index uuid
from SQL, so a folder paired with the wrong database is refused rather than "recovered".

Readers (``read_only=True``: searchers, the HTTP server) take no lock, so any number of them
can be open, also while a writer runs, and they write nothing: no recovery, no truncation,
no FAISS save, no schema migration, no new index files (SQLite itself may add its
``-wal``/``-shm`` files next to a WAL database, which is how its readers and writers share
it). A reader sees what SQL had committed when it opened (or last `refresh`ed): it reads
store rows below ``committed_rows`` only, so rows a writer is appending, or that never
commit, are simply not seen; it uses the FAISS file when that file is from this index and
covers no more rows than SQL, catches it up in memory like recovery does (adds live rows
above the file's rows, removes removed ids), and otherwise builds it in memory from the
embedding store. `refresh` repeats that catch-up from the current FAISS in memory.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import signal
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import quote

import numpy as np
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event, func, insert, select, update
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from indexer.database import (
    Database,
    _sqlite_on_begin,
    alembic_config,
    current_revisions,
    default_url,
    one_line_errors,
    open_database,
    server_engine,
    session_factory,
)
from indexer.errors import (
    IndexLockedError,
    IndexReplacedError,
    IndexStoreError,
    ModelMismatchError,
    RowStoreError,
    SchemaTooNewError,
)
from indexer.paths import from_stored, to_stored
from indexer.row_store import RowStore, fsync_dir, read_tag
from indexer.thumbnail_store import ThumbnailStore
from indexer.schema import IndexInfo, Segment, Video, VideoStatus
from indexer.vector_backend import MILVUS_META_FILE, load_vectors, new_vectors, vectors_path
from indexer.vector_index import DEFAULT_APPROX_THRESHOLD, VectorIndex

EMBEDDINGS_FILE = "embeddings.f16"
RERANK_FILE = "rerank_states.f16"
LATENTS_FILE = "latents.f16"
FAISS_FILE = "vectors.faiss"
LOCK_FILE = "index.lock"
THUMBNAILS_DIR = "thumbnails"  # one JPEG per segment (indexer/thumbnail_store.py)
FINGERPRINT_CHUNK = 1 << 20
PAUSE_ENV = "PVL_TEST_PAUSE_AT"


def _pause_point(stage: str) -> None:
    """Test hook: with PVL_TEST_PAUSE_AT=<stage> the process stops itself (SIGSTOP) here, so
    a test can SIGKILL it inside a precise crash window. Stages: "stores_appended" (rows
    fsynced, SQL not committed), "sql_committed" (SQL committed, FAISS not updated/saved)."""
    if os.environ.get(PAUSE_ENV) == stage:
        os.kill(os.getpid(), signal.SIGSTOP)


def fingerprint_file(path: str | Path) -> str:
    """Content fingerprint: sha256 of the size and the first and last MiB (hex)."""
    path = Path(path)
    size = path.stat().st_size
    digest = hashlib.sha256(size.to_bytes(8, "little"))
    with open(path, "rb") as f:
        digest.update(f.read(FINGERPRINT_CHUNK))
        if size > FINGERPRINT_CHUNK:
            f.seek(max(FINGERPRINT_CHUNK, size - FINGERPRINT_CHUNK))
            digest.update(f.read(FINGERPRINT_CHUNK))
    return digest.hexdigest()


@dataclass(frozen=True)
class IndexLayout:
    """Widths of what the index stores per segment, fixed by the model."""

    embedding_dim: int  # d
    rerank_width: int  # D + H
    latent_shape: tuple[int, int] | None = None  # (N, D) to keep full latents, else None
    faiss_factory: str | None = None  # None: exact, then IVF past the size threshold
    vectors: str | None = None  # None: FAISS file; "milvus:URI" (indexer/vector_backend.py)


@dataclass(frozen=True)
class VideoInfo:
    duration: float | None = None  # seconds
    fps: float | None = None
    width: int | None = None
    height: int | None = None


class KnownVideo(NamedTuple):
    size: int | None
    mtime: float | None
    fingerprint: str | None
    status: str  # a VideoStatus value


@dataclass(frozen=True)
class SegmentInfo:
    id: int
    video_id: int
    path: str  # as Python opens it (indexer/paths.py: shown(path) for people)
    start_s: float
    end_s: float
    removed: bool
    duration: float | None = None  # of the video, seconds (read in the same query)


@dataclass
class IndexStats:
    videos: dict[str, int]  # count per status
    segments: int  # searchable
    removed_segments: int
    rows: int  # rows in each store (= committed segments, removed included)
    vectors: int  # ids in FAISS (= searchable segments)
    faiss: str  # what FAISS index is in use, e.g. "Flat" or "IVF894,Flat"
    bytes: dict[str, int] = field(default_factory=dict)  # on disk, per file
    recent_failures: list[tuple[str, str | None]] = field(default_factory=list)
    thumbnails: int = 0  # segments with a thumbnail (their bytes are bytes['thumbnails'])


def _size_mtime(stat: os.stat_result | tuple[int, float]) -> tuple[int, float]:
    if hasattr(stat, "st_size"):
        return int(stat.st_size), float(stat.st_mtime)
    size, mtime = stat
    return int(size), float(mtime)


def _layout_of(info: IndexInfo) -> IndexLayout | None:
    if info.embedding_dim is None or info.rerank_width is None:
        return None
    latent = None
    if info.latent_tokens is not None and info.latent_dim is not None:
        latent = (info.latent_tokens, info.latent_dim)
    return IndexLayout(info.embedding_dim, info.rerank_width, latent, info.faiss_factory, info.vector_store)


def _sqlite_read_only_on_connect(dbapi_conn: Any, _record: Any) -> None:
    dbapi_conn.isolation_level = None  # transactions begin with the "begin" event
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA query_only=ON")  # on top of mode=ro
    cursor.close()


def _read_only_engine(url: str) -> Engine:
    """An engine that cannot write: SQLite opened with ``mode=ro`` (never creates or
    modifies the database file), PostgreSQL sessions ``READ ONLY``. Each session reads one
    snapshot (SQLite transactions are snapshots; PostgreSQL gets REPEATABLE READ)."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        path = Path(parsed.database).resolve()
        query = {k: v for k, v in parsed.query.items() if k not in ("mode", "uri")}
        ro = parsed.set(
            database=f"file:{quote(str(path))}", query={**query, "mode": "ro", "uri": "true"}
        )
        engine = create_engine(ro, connect_args={"timeout": 30})
        event.listen(engine, "connect", _sqlite_read_only_on_connect)
        event.listen(engine, "begin", _sqlite_on_begin)
        return one_line_errors(engine)
    if parsed.get_backend_name() == "postgresql":
        return server_engine(
            url,
            pool_pre_ping=True,
            isolation_level="REPEATABLE READ",
            execution_options={"postgresql_readonly": True},
        )
    return server_engine(url, pool_pre_ping=True)


def _config_diff(stored: str, given: str) -> str:
    """The top-level config keys that differ, as 'key (stored vs given)'."""
    try:
        a, b = json.loads(stored), json.loads(given)
    except ValueError:
        return "config text differs"
    if not (isinstance(a, dict) and isinstance(b, dict)):
        return "config differs"
    keys = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    shown = ", ".join(f"{k} ({a.get(k)!r} vs {b.get(k)!r})" for k in keys[:5])
    return shown + (" ..." if len(keys) > 5 else "")


class IndexStore:
    """An open index folder (+ database); use as a context manager.

    One writer at a time (the default); with ``read_only=True`` any number of readers, also
    while a writer runs: they take no lock, write nothing, refuse every write method and
    see newly committed videos after `refresh()` (see the module doc).
    """

    def __init__(
        self,
        directory: str | Path,
        db_url: str | None = None,
        *,
        read_only: bool = False,
        approx_threshold: int = DEFAULT_APPROX_THRESHOLD,
        nprobe: int | None = None,
        ef_search: int | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.read_only = read_only
        if not read_only:
            self.directory.mkdir(parents=True, exist_ok=True)
        self.db_url = db_url or default_url(self.directory)
        self.approx_threshold = approx_threshold
        self._search_params = {"nprobe": nprobe, "ef_search": ef_search}
        self._lock_fd = None if read_only else self._lock()
        self.thumbnails = ThumbnailStore(self.directory / THUMBNAILS_DIR, read_only=read_only)
        self._view_lock = threading.RLock()  # refresh vs search in a threaded reader
        self._data_layout: IndexLayout | None = None  # layout the open stores were made for
        self.db: Database | None = None
        self.embedding_store: RowStore | None = None
        self.rerank_store: RowStore | None = None
        self.latent_store: RowStore | None = None
        self.vectors: VectorIndex | None = None
        self._faiss_rows = 0  # committed rows the in-memory FAISS reflects
        self._faiss_seq = 0  # removal_seq the in-memory FAISS reflects
        self._faiss_valid = False
        self._dirty = False  # in-memory FAISS differs from the file
        self._needs_recovery = False
        if read_only:
            try:
                self._open_read_only()
            except BaseException:
                self._release()
                raise
            return
        try:
            self.db = open_database(self.db_url)
            info = self._info_row()
            self._uuid = info.index_uuid
            self._rows = info.committed_rows
            self._check_folder_owner()
            if self.layout is not None:
                self._open_data()
        except BaseException:
            self._release()
            raise

    # -- opening, locking, recovery -----------------------------------------------------

    def _lock(self) -> int:
        fd = os.open(self.directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise IndexLockedError(f"index {self.directory} is open in another process") from None
        return fd

    def _check_folder_owner(self) -> None:
        # A fresh database pointed at a folder of another index must not adopt (and later
        # truncate or delete) that index's stores.
        path = self.directory / EMBEDDINGS_FILE
        # Tags are stored zero-padded and read back stripped: compare them the same way.
        if path.exists() and read_tag(path) != bytes.fromhex(self._uuid).rstrip(b"\x00"):
            raise IndexStoreError(
                f"folder {self.directory} holds the data of another index than database "
                f"{make_url(self.db_url).render_as_string(hide_password=True)}; "
                "use that index's database or a new folder"
            )

    def _info_row(self) -> IndexInfo:
        with self.db.sessions.begin() as s:
            info = s.get(IndexInfo, 1)
            if info is None:
                info = IndexInfo(id=1, index_uuid=uuid.uuid4().hex, committed_rows=0, removal_seq=0)
                s.add(info)
        self._info = info
        return info

    @property
    def layout(self) -> IndexLayout | None:
        """The stored layout, or None while no model has been set."""
        return _layout_of(self._info)

    def _store_paths(self, layout: IndexLayout) -> list[tuple[Path, int]]:
        paths = [
            (self.directory / EMBEDDINGS_FILE, layout.embedding_dim),
            (self.directory / RERANK_FILE, layout.rerank_width),
        ]
        if layout.latent_shape is not None:
            tokens, dim = layout.latent_shape
            paths.append((self.directory / LATENTS_FILE, tokens * dim))
        return paths

    def _open_data(self) -> None:
        layout = self.layout
        assert layout is not None
        tag = bytes.fromhex(self._uuid)
        stores = []
        try:
            for path, width in self._store_paths(layout):
                # Create missing stores only while nothing is committed: otherwise it is loss.
                stores.append(RowStore(path, width, tag=tag, create=self._rows == 0))
        except RowStoreError:
            for store in stores:
                store.close()
            raise
        self.embedding_store, self.rerank_store = stores[0], stores[1]
        self.latent_store = stores[2] if len(stores) > 2 else None
        self._data_layout = layout
        self.vectors = self._load_vectors(layout)
        self._reconcile()

    def _stores(self) -> list[RowStore]:
        stores = (self.embedding_store, self.rerank_store, self.latent_store)
        return [s for s in stores if s is not None]

    def _new_vectors(self, layout: IndexLayout) -> VectorIndex:
        return new_vectors(self, layout)  # FAISS, or Milvus where the index records it

    def _load_vectors(self, layout: IndexLayout) -> VectorIndex | None:
        """The saved FAISS index if it belongs here; None means rebuild (it is derived)."""
        if layout.vectors:
            loaded = load_vectors(self, layout)
            if loaded is None:
                return None
            vectors, meta = loaded
            self._faiss_rows, self._faiss_seq = int(meta.get("rows", -1)), int(meta.get("removal_seq", -1))
            self._faiss_valid = self._faiss_rows >= 0 and meta.get("index_uuid") == self._uuid
            return vectors
        path = self.directory / FAISS_FILE
        if not path.exists():
            return None
        try:
            vectors = VectorIndex.load(path)
        except IndexStoreError:
            return None
        meta = vectors.meta
        if (
            meta.get("index_uuid") != self._uuid
            or meta.get("factory") != layout.faiss_factory
            or vectors.dim != layout.embedding_dim
        ):
            return None
        vectors.approx_threshold = self.approx_threshold
        vectors.set_search_params(**self._search_params)
        self._faiss_rows = int(meta.get("rows", -1))
        self._faiss_seq = int(meta.get("removal_seq", -1))
        self._faiss_valid = self._faiss_rows >= 0
        return vectors

    def _reconcile(self) -> None:
        """Bring stores and FAISS in line with what SQL has committed (see module doc)."""
        info = self._info_row()
        if info.index_uuid != self._uuid:
            raise IndexStoreError(f"the database of index {self.directory} was replaced while open")
        rows, seq = info.committed_rows, info.removal_seq
        layout = self.layout
        assert layout is not None
        for store in self._stores():
            if len(store) < rows:
                raise IndexStoreError(
                    f"{store.path} has {len(store)} rows but the database has {rows} committed "
                    "segments: the store has lost data (copied while indexing?); rebuild the index"
                )
            if len(store) > rows:
                store.truncate(rows)  # rows of an add whose SQL transaction never committed
        self._rows = rows
        with self.db.sessions() as s:
            self._catch_up_vectors(s, layout, rows, seq)
        self._needs_recovery = False
        self.save_faiss()

    def _catch_up_vectors(self, s: Session, layout: IndexLayout, rows: int, seq: int) -> None:
        """Make the in-memory FAISS reflect `rows` committed rows and removal `seq`, read in
        session `s`: rebuilt from the embedding store when it is missing, invalid or ahead,
        otherwise caught up (removals, then the live rows above the ones it covers)."""
        vectors = self.vectors
        if vectors is None or not self._faiss_valid or self._faiss_rows > rows:
            ids = self._live_ids(s, 0, rows)
            vectors = self._new_vectors(layout)
            vectors.rebuild_from(self.embedding_store.get(ids), ids)
            self._dirty = True
        else:
            self._faiss_valid = False  # until it is caught up: a failure half-way rebuilds
            if self._faiss_seq != seq:
                removed = s.scalars(
                    select(Segment.id).where(Segment.removed, Segment.id < self._faiss_rows)
                ).all()
                vectors.remove_ids(np.asarray(removed, np.int64))
                self._dirty = True
            if self._faiss_rows < rows:
                ids = self._live_ids(s, self._faiss_rows, rows)
                vectors.add(self.embedding_store.get(ids), ids)
                self._dirty = True
        self.vectors = vectors
        self._faiss_rows, self._faiss_seq, self._faiss_valid = rows, seq, True

    # -- read-only opening and refresh --------------------------------------------------

    def _no_index(self) -> IndexStoreError:
        return IndexStoreError(f"no index at {self.directory} (run `pvl-search index` first)")

    def _open_read_only(self) -> None:
        if not self.directory.is_dir():
            raise self._no_index()
        # Taken before anything is read: a replacement during the open is seen next time.
        self._identity = self._file_identity()
        url = make_url(self.db_url)
        if url.get_backend_name() == "sqlite":
            # mode=ro never creates the file, but say clearly that there is no index here.
            if not url.database or url.database == ":memory:" or not Path(url.database).is_file():
                raise self._no_index()
        engine = _read_only_engine(self.db_url)
        self.db = Database(engine=engine, sessions=session_factory(engine))
        self._check_schema_read_only()
        with self.db.sessions() as s:
            info = s.get(IndexInfo, 1)
        if info is None or _layout_of(info) is None:
            raise self._no_index()
        self._info, self._uuid, self._rows = info, info.index_uuid, 0
        self._check_folder_owner()
        self._open_data_read_only()  # FAISS file read before the snapshot below: never ahead
        self._sync_read_only()

    def _check_schema_read_only(self) -> None:
        """A reader does not migrate: the schema must be at this version's head already."""
        script = ScriptDirectory.from_config(alembic_config())
        head = script.get_current_head()
        known = {rev.revision for rev in script.walk_revisions()}
        with self.db.engine.connect() as conn:
            revisions = current_revisions(conn)
        where = make_url(self.db_url).render_as_string(hide_password=True)
        if not revisions:
            raise self._no_index()
        unknown = [rev for rev in revisions if rev not in known]
        if unknown:
            raise SchemaTooNewError(
                f"database {where} has schema revision {', '.join(unknown)}, which this "
                f"version of pvl-search does not know (newest known: {head}); it was written "
                "by a newer version, upgrade pvl-search to open it"
            )
        if revisions != (head,):
            raise IndexStoreError(
                f"database {where} of index {self.directory} has schema revision "
                f"{', '.join(revisions)}, older than this version's {head}; a read-only open "
                "does not migrate: open it for writing first (e.g. run `pvl-search index`)"
            )

    def _open_data_read_only(self) -> None:
        """Open the stores read-only and load the FAISS file (if usable); no catch-up."""
        layout = self.layout
        assert layout is not None
        tag = bytes.fromhex(self._uuid)
        stores: list[RowStore] = []
        try:
            for path, width in self._store_paths(layout):
                stores.append(RowStore(path, width, tag=tag, read_only=True))
        except RowStoreError:
            for store in stores:
                store.close()
            if self._info.committed_rows == 0 and not all(
                path.exists() for path, _ in self._store_paths(layout)
            ):
                return  # nothing committed, the writer is (re)creating the stores: empty
            raise
        self.embedding_store, self.rerank_store = stores[0], stores[1]
        self.latent_store = stores[2] if len(stores) > 2 else None
        self._data_layout = layout
        self.vectors = self._load_vectors(layout)

    def _sync_read_only(self) -> bool:
        """Bring the reader's view to what SQL has committed now; False if nothing changed."""
        with self._view_lock, self.db.sessions() as s:  # one session: one snapshot
            info = s.get(IndexInfo, 1)
            if info is None or info.index_uuid != self._uuid:
                raise IndexReplacedError(
                    f"the database of index {self.directory} was replaced while open"
                )
            self._info = info
            layout = self.layout
            rows, seq = info.committed_rows, info.removal_seq
            if (
                layout == self._data_layout
                and self.vectors is not None
                and self._faiss_valid
                and (rows, seq) == (self._rows, self._faiss_seq)
            ):
                return False
            if layout is None:
                raise IndexStoreError(f"index {self.directory} has no model any more")
            if layout != self._data_layout:
                # Another model/layout on an empty index, or another FAISS factory.
                self._close_data()
                self._open_data_read_only()
            if self.embedding_store is None:  # stores not there yet (rows == 0)
                if rows > 0:
                    raise RowStoreError(
                        f"row store {self.directory / EMBEDDINGS_FILE} does not exist"
                    )
                self.vectors = self._new_vectors(layout)
                self._faiss_rows, self._faiss_seq, self._faiss_valid = 0, seq, True
                self._rows = 0
                return True
            for store in self._stores():
                if store.refresh(rows) < rows:
                    raise IndexStoreError(
                        f"{store.path} has {len(store)} rows but the database has {rows} "
                        "committed segments: the store has lost data (copied while "
                        "indexing?); rebuild the index"
                    )
            self._catch_up_vectors(s, layout, rows, seq)
            self._rows = rows
            return True

    def _file_identity(self) -> tuple[tuple[int, int] | None, ...]:
        """(device, inode) of the folder, its store files and a SQLite database (None where
        missing): what changes when the index is deleted and restored, or rebuilt."""
        url = make_url(self.db_url)
        paths = [self.directory, *(self.directory / name for name in (EMBEDDINGS_FILE, RERANK_FILE, LATENTS_FILE))]
        if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
            paths.append(Path(url.database))
        identity = []
        for path in paths:
            try:
                st = os.stat(path)
                identity.append((st.st_dev, st.st_ino))
            except OSError:
                identity.append(None)
        return tuple(identity)

    def replaced(self) -> bool:
        """Reader: whether the index on disk is no longer the one this store opened (the
        folder or its files were deleted, restored or rebuilt): then reopen it, since its
        open files and pooled connections may still show the old copy. Cheap (a few stats)."""
        return self.read_only and self._identity != self._file_identity()

    def refresh(self) -> bool:
        """Reader: see what writers have committed since the open or the last refresh (new
        videos searchable, removed ones gone); the in-memory FAISS is caught up, never
        saved. Cheap when nothing changed (one SQL query). Returns whether anything did.
        A writer is always up to date: there it does nothing and returns False."""
        if self.db is None:
            raise IndexStoreError(f"index {self.directory} is closed")
        if not self.read_only:
            return False
        return self._sync_read_only()

    @staticmethod
    def _live_ids(s: Session, lo: int, hi: int) -> np.ndarray:
        ids = s.scalars(
            select(Segment.id)
            .where(Segment.id >= lo, Segment.id < hi, Segment.removed.is_(False))
            .order_by(Segment.id)
        ).all()
        return np.asarray(ids, dtype=np.int64)

    # -- model / layout -----------------------------------------------------------------

    def model(self) -> tuple[str | None, str | None]:
        """(model config JSON, weights fingerprint) recorded for this index."""
        return self._info.model_config, self._info.weights_fingerprint

    def encode_dtype(self) -> str | None:
        """The dtype(s) the model ran in to encode this index's segments, e.g. "bfloat16" or
        "bfloat16,float32"; None for an index built before pvl-search recorded it."""
        return self._info.encode_dtype

    def record_dtype(self, dtype: str) -> None:
        """Writer: segments are about to be encoded in `dtype`; noted once per dtype. The
        stored vectors are float whatever the dtype, so this never refuses anything."""
        self._ready_for_writes()
        known = [name for name in (self._info.encode_dtype or "").split(",") if name]
        if dtype not in known:
            self._write_info(encode_dtype=",".join([*known, dtype]))

    def set_model(self, model_config: str, weights_fingerprint: str, layout: IndexLayout) -> None:
        """Record the model (and layout) an index is built with.

        On an index without segments this (re)defines it; on one with segments the model
        and the widths must match (ModelMismatchError otherwise); only the FAISS factory
        may change there, which rebuilds the FAISS index.
        """
        self._ready_for_writes()
        current = self.layout
        if self._rows > 0 and current is not None:
            self.check_model(model_config, weights_fingerprint)
            if (current.embedding_dim, current.rerank_width, current.latent_shape) != (
                layout.embedding_dim,
                layout.rerank_width,
                layout.latent_shape,
            ):
                raise ModelMismatchError(
                    f"index {self.directory} stores {current}, the model gives {layout}"
                )
            if (current.faiss_factory, current.vectors) != (layout.faiss_factory, layout.vectors):
                self._write_info(faiss_factory=layout.faiss_factory, vector_store=layout.vectors)
                if hasattr(self.vectors, "close"):
                    self.vectors.close()  # a Milvus collection is let go of
                self.vectors = None  # rebuilt below in the store the index records now
                self._faiss_valid = False
                self._reconcile()
            return
        # Nothing committed: old store files (if any) hold no data; drop them before the
        # new layout is committed, so a crash in between leaves nothing of the wrong width.
        self._close_data()
        for name in (EMBEDDINGS_FILE, RERANK_FILE, LATENTS_FILE, FAISS_FILE, MILVUS_META_FILE):
            (self.directory / name).unlink(missing_ok=True)
        fsync_dir(self.directory)
        latent = layout.latent_shape
        self._write_info(
            model_config=model_config,
            weights_fingerprint=weights_fingerprint,
            embedding_dim=layout.embedding_dim,
            rerank_width=layout.rerank_width,
            latent_tokens=latent[0] if latent else None,
            latent_dim=latent[1] if latent else None,
            faiss_factory=layout.faiss_factory,
            vector_store=layout.vectors,
            encode_dtype=None,  # nothing encoded with this model yet
        )
        self._open_data()

    def _write_info(self, **values: Any) -> None:
        with self.db.sessions.begin() as s:
            info = s.get(IndexInfo, 1, with_for_update=True)
            for key, value in values.items():
                setattr(info, key, value)
        self._info_row()

    def check_model(self, model_config: str, weights_fingerprint: str) -> None:
        """Raise ModelMismatchError unless this index was built with this model."""
        stored_config, stored_fp = self.model()
        if stored_config is None:
            raise IndexStoreError(
                f"index {self.directory} has no model recorded: nothing indexed yet"
            )
        problems = []
        if stored_fp != weights_fingerprint:
            problems.append(
                f"weights fingerprint {stored_fp[:12]}... vs {weights_fingerprint[:12]}..."
            )
        if json.loads(stored_config) != json.loads(model_config):
            problems.append("config: " + _config_diff(stored_config, model_config))
        if problems:
            raise ModelMismatchError(
                f"index {self.directory} was built with a different model ({'; '.join(problems)}, "
                "index vs given); use the index's model or re-index into a new folder"
            )

    # -- writes -------------------------------------------------------------------------

    def _refuse_read_only(self) -> None:
        if self.read_only:
            raise IndexStoreError(f"index opened read-only: {self.directory}")

    def _ready_for_writes(self) -> None:
        self._refuse_read_only()
        if self.db is None:
            raise IndexStoreError(f"index {self.directory} is closed")
        if self._needs_recovery:
            self._reconcile()

    def _require_layout(self) -> IndexLayout:
        layout = self.layout
        if layout is None:
            raise IndexStoreError(f"index {self.directory} has no model set: call set_model first")
        return layout

    def add_video(
        self,
        path: str,
        stat: os.stat_result | tuple[int, float],
        fingerprint: str,
        info: VideoInfo,
        segments: Sequence[tuple[float, float]],
        embeddings: np.ndarray,
        rerank_states: np.ndarray,
        latents: np.ndarray | None = None,
        thumbnails: Sequence[bytes | None] | None = None,
    ) -> int:
        """Store one indexed video and its segments as one atomic unit; returns its id.

        A path already in the index (changed file, earlier failure) is updated in place
        and its previous segments are removed. `segments` are (start_s, end_s) pairs, one
        per row of `embeddings` (n, d), `rerank_states` (n, D + H) and, when the layout
        keeps latents, `latents` (n, N, D) or (n, N * D). `thumbnails`: one JPEG (or None)
        per segment, written with the store rows; the old segments' thumbnails are deleted.
        """
        self._ready_for_writes()
        layout = self._require_layout()
        spans = np.asarray(segments, dtype=np.float64).reshape(-1, 2)
        n = len(spans)
        if (spans[:, 1] < spans[:, 0]).any():
            raise ValueError(f"{path}: a segment ends before it starts")
        rows = [np.asarray(embeddings, np.float32), np.asarray(rerank_states, np.float32)]
        if layout.latent_shape is not None:
            if latents is None:
                raise ValueError(f"{path}: this index keeps latents, none were given")
            rows.append(np.asarray(latents, np.float32).reshape(n, -1))
        elif latents is not None:
            raise ValueError(f"{path}: this index keeps no latents (layout.latent_shape is None)")
        if thumbnails is not None and len(thumbnails) != n:
            raise ValueError(f"{path}: {n} segments but {len(thumbnails)} thumbnails")
        stores = self._stores()
        for store, block in zip(stores, rows):
            if block.shape != (n, store.width):
                raise ValueError(
                    f"{path}: expected {store.path.name} rows of shape ({n}, {store.width}), "
                    f"got {block.shape}"
                )
        size, mtime = _size_mtime(stat)
        first = self._rows
        try:
            for store, block in zip(stores, rows):
                store.append(block)
            for store in stores:
                store.flush()
            if thumbnails is not None:  # ids >= committed rows: invisible until the commit
                self.thumbnails.write(range(first, first + n), thumbnails)
            _pause_point("stores_appended")
            with self.db.sessions.begin() as s:
                self._check_rows(s, first)
                video, old_ids = self._upsert_video(s, path)
                video.size, video.mtime, video.fingerprint = size, mtime, fingerprint
                video.duration, video.fps = info.duration, info.fps
                video.width, video.height = info.width, info.height
                video.status, video.error = VideoStatus.INDEXED.value, None
                s.flush()  # assigns video.id
                if n:
                    s.execute(
                        insert(Segment),
                        [
                            {"id": first + i, "video_id": video.id, "start_s": a, "end_s": b}
                            for i, (a, b) in enumerate(spans.tolist())
                        ],
                    )
                seq = self._bump_rows(s, first + n, removed=bool(old_ids))
                video_id = video.id
        except BaseException:
            self._recover_after_failure()
            raise
        self._rows = first + n
        _pause_point("sql_committed")
        self.thumbnails.delete(old_ids)
        self._apply(old_ids, rows[0], np.arange(first, first + n, dtype=np.int64), seq)
        return video_id

    def _check_rows(self, s: Session, first: int) -> None:
        info = s.get(IndexInfo, 1, with_for_update=True)  # row lock on servers
        if info.committed_rows != first or info.index_uuid != self._uuid:
            raise IndexStoreError(
                f"index {self.directory}: the database changed under this writer "
                f"(expected {first} committed rows, found {info.committed_rows})"
            )

    @staticmethod
    def _bump_rows(s: Session, rows: int, *, removed: bool) -> int:
        info = s.get(IndexInfo, 1)
        info.committed_rows = rows
        if removed:
            info.removal_seq += 1
        return info.removal_seq

    @staticmethod
    def _upsert_video(s: Session, path: str) -> tuple[Video, list[int]]:
        """The video row for `path` (new if needed) and the ids of its live segments, which
        this transaction flags removed."""
        text, raw = to_stored(path)
        video = s.scalars(select(Video).where(Video.path == text)).one_or_none()
        if video is None:
            video = Video(path=text, path_bytes=raw)
            s.add(video)
            return video, []
        return video, IndexStore._take_out_segments(s, video.id)

    @staticmethod
    def _take_out_segments(s: Session, video_id: int) -> list[int]:
        """Flag the live segments of a video removed; returns their ids."""
        live = (Segment.video_id == video_id, Segment.removed.is_(False))
        ids = list(s.scalars(select(Segment.id).where(*live)))
        if ids:
            s.execute(update(Segment).where(*live).values(removed=True))
        return ids

    def _recover_after_failure(self) -> None:
        # The write may or may not have committed (a lost commit acknowledgement): ask SQL.
        self._needs_recovery = True
        try:
            self._reconcile()
        except Exception:  # noqa: BLE001 - the original error is the one to report
            pass

    def _apply(self, remove: list[int], xb: np.ndarray | None, ids: np.ndarray, seq: int) -> None:
        """Mirror a committed transaction in the in-memory FAISS index."""
        try:
            if remove:
                self.vectors.remove_ids(np.asarray(remove, np.int64))
            if xb is not None and len(ids):
                self.vectors.add(xb, ids)
        except BaseException:
            self._faiss_valid = False  # rebuilt from the stores by the next recovery
            self._needs_recovery = True
            raise
        self._faiss_rows, self._faiss_seq = self._rows, seq
        self._dirty = True

    def _remove_video(self, s: Session, video: Video, status: VideoStatus) -> tuple[list[int], int]:
        old_ids = self._take_out_segments(s, video.id)
        video.status = status.value
        info = s.get(IndexInfo, 1, with_for_update=True)
        if old_ids:
            info.removal_seq += 1
        return old_ids, info.removal_seq

    def mark_failed(
        self,
        path: str,
        error: str,
        stat: os.stat_result | tuple[int, float] | None = None,
        fingerprint: str | None = None,
    ) -> int:
        """Record that `path` could not be indexed; returns its video id.

        Give `stat`/`fingerprint` when known so an unchanged failing file is not retried.
        A failed video has no searchable segments: segments of an earlier version of the
        file (which no longer matches it) are removed.
        """
        self._ready_for_writes()
        try:
            with self.db.sessions.begin() as s:
                text, raw = to_stored(path)
                video = s.scalars(select(Video).where(Video.path == text)).one_or_none()
                if video is None:
                    video = Video(path=text, path_bytes=raw, status=VideoStatus.FAILED.value)
                    s.add(video)
                    s.flush()
                old_ids, seq = self._remove_video(s, video, VideoStatus.FAILED)
                video.error = error
                if stat is not None:
                    video.size, video.mtime = _size_mtime(stat)
                video.fingerprint = fingerprint
                video_id = video.id
        except BaseException:
            self._recover_after_failure()
            raise
        self._forget_in_faiss(old_ids, seq)
        return video_id

    def _forget_in_faiss(self, old_ids: list[int], seq: int) -> None:
        """After a committed removal: take the ids out of the in-memory FAISS index (and
        delete their thumbnails)."""
        _pause_point("sql_committed")
        self.thumbnails.delete(old_ids)
        if self.vectors is not None:
            self._apply(old_ids, None, np.zeros(0, np.int64), seq)

    def mark_removed(self, video: int | str) -> int:
        """Flag a video (id or path) removed and take its segments out of search; returns
        how many segments were removed. Their store rows stay (append-only)."""
        self._ready_for_writes()
        try:
            with self.db.sessions.begin() as s:
                where = Video.id == video if isinstance(video, int) else Video.path == to_stored(video)[0]
                row = s.scalars(select(Video).where(where)).one_or_none()
                if row is None:
                    raise IndexStoreError(f"index {self.directory} has no video {video!r}")
                old_ids, seq = self._remove_video(s, row, VideoStatus.REMOVED)
        except IndexStoreError:
            raise
        except BaseException:
            self._recover_after_failure()
            raise
        self._forget_in_faiss(old_ids, seq)
        return len(old_ids)

    def rebuild_vectors(self) -> int:
        """Writer: build the FAISS index again from the stored embeddings alone (it is derived
        data) and save it; returns its size. Only a writer, which holds the index lock, may."""
        self._ready_for_writes()
        if self.layout is None:
            return 0
        self._faiss_valid = False  # makes the reconciliation rebuild it from the stores
        self._reconcile()
        return self.vectors.ntotal

    def save_faiss(self) -> None:
        """Write the FAISS index if it changed (call at batch boundaries and at the end)."""
        if self.vectors is None or not self._dirty or not self._faiss_valid:
            return
        self._refuse_read_only()
        self.vectors.meta = {
            "index_uuid": self._uuid,
            "rows": self._faiss_rows,
            "removal_seq": self._faiss_seq,
            "factory": self.layout.faiss_factory if self.layout else None,
        }
        self.vectors.save(vectors_path(self.directory, self.layout))
        self._dirty = False

    # -- reads --------------------------------------------------------------------------

    def known_videos(self) -> dict[str, KnownVideo]:
        """Every video the index knows: path -> (size, mtime, fingerprint, status)."""
        with self.db.sessions() as s:
            rows = s.execute(
                select(Video.path, Video.path_bytes, Video.size, Video.mtime, Video.fingerprint, Video.status)
            )
            return {
                from_stored(r.path, r.path_bytes): KnownVideo(r.size, r.mtime, r.fingerprint, r.status) for r in rows
            }

    def search(
        self, xq: np.ndarray, k: int, allowed_ids: Any = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """FAISS top-k by inner product: (D, I), I = segment ids, -1 where fewer than k."""
        with self._view_lock:  # a reader's refresh() changes the index in place
            if self.vectors is None:
                xq = np.atleast_2d(xq)  # no model set yet: nothing to find ("none" values)
                none = -np.finfo(np.float32).max
                D = np.full((len(xq), k), none, np.float32)
                return D, np.full((len(xq), k), -1, np.int64)
            return self.vectors.search(xq, k, allowed_ids)

    def segments(self, ids: Any) -> dict[int, SegmentInfo]:
        """Metadata of segments `ids` (unknown ids and -1 are left out)."""
        wanted = sorted({int(i) for i in np.asarray(ids).reshape(-1) if i >= 0})
        out: dict[int, SegmentInfo] = {}
        with self.db.sessions() as s:
            for lo in range(0, len(wanted), 5000):  # stay under the servers' parameter limits
                columns = (Segment.video_id, Video.path, Video.path_bytes, Segment.start_s, Segment.end_s)
                rows = s.execute(
                    select(Segment.id, *columns, Segment.removed, Video.duration)
                    .join(Video, Segment.video_id == Video.id)
                    .where(Segment.id.in_(wanted[lo : lo + 5000]))
                )
                for r in rows:
                    path = from_stored(r.path, r.path_bytes)
                    out[r.id] = SegmentInfo(r.id, r.video_id, path, r.start_s, r.end_s, r.removed, r.duration)
        return out

    def segment_ids(self, path_prefix: str | None = None) -> np.ndarray:
        """Ids of searchable segments, optionally of videos under `path_prefix` (for filters)."""
        query = select(Segment.id).where(Segment.removed.is_(False)).order_by(Segment.id)
        if path_prefix is not None:
            query = query.join(Video, Segment.video_id == Video.id).where(
                Video.path.startswith(to_stored(path_prefix)[0], autoescape=True)
            )
        with self.db.sessions() as s:
            return np.asarray(s.scalars(query).all(), dtype=np.int64)

    def sync_thumbnails(self) -> list[SegmentInfo]:
        """Writer: delete the thumbnails of segments that are not live (a crash between a
        write or a removal and its commit leaves them), and return the live segments that
        have none (to make them: an index built before thumbnails, or with them off)."""
        self._ready_for_writes()
        live = self.segment_ids()
        self.thumbnails.prune(live.tolist())
        missing = np.setdiff1d(live, self.thumbnails.ids(), assume_unique=True)
        info = self.segments(missing)
        return [info[i] for i in missing.tolist() if i in info]

    def _committed_ids(self, ids: Any) -> np.ndarray:
        idx = np.asarray(ids, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self._rows):
            raise IndexStoreError(
                f"index {self.directory}: segment ids must be in [0, {self._rows})"
            )
        return idx

    def embeddings(self, ids: Any) -> np.ndarray:
        """Stored embeddings of segments `ids`, float32 (K, d)."""
        return self._require(self.embedding_store).get(self._committed_ids(ids))

    def rerank_states(self, ids: Any) -> np.ndarray:
        """Rerank states of segments `ids`, float32 (K, D + H), read from the mapped store."""
        fetched = getattr(self.vectors, "fetched_states", None)  # Milvus returns them with the hits
        if fetched is not None and (states := fetched(self._committed_ids(ids))) is not None:
            return states
        return self._require(self.rerank_store).get(self._committed_ids(ids))

    def latents(self, ids: Any) -> np.ndarray:
        """Full latents of segments `ids`, float32 (K, N, D); only if the index keeps them."""
        layout = self._require_layout()
        if layout.latent_shape is None or self.latent_store is None:
            raise IndexStoreError(f"index {self.directory} keeps no latents")
        rows = self.latent_store.get(self._committed_ids(ids))
        return rows.reshape(len(rows), *layout.latent_shape)

    def _require(self, store: RowStore | None) -> RowStore:
        if store is None:
            if self.db is None:
                raise IndexStoreError(f"index {self.directory} is closed")
            self._require_layout()
            raise IndexStoreError(f"index {self.directory} holds no segments yet")
        return store

    def stats(self, recent_failures: int = 10) -> IndexStats:
        """Counts, bytes on disk per file and the most recent failures."""
        with self.db.sessions() as s:
            count = func.count()
            videos = dict(s.execute(select(Video.status, count).group_by(Video.status)).all())
            seg = dict(s.execute(select(Segment.removed, count).group_by(Segment.removed)).all())
            failures = s.execute(
                select(Video.path, Video.error)
                .where(Video.status == VideoStatus.FAILED.value)
                .order_by(Video.updated_at.desc(), Video.id.desc())
                .limit(recent_failures)
            ).all()
        sizes = {s.path.name: s.nbytes for s in self._stores()}
        files = [self.directory / FAISS_FILE, self.directory / MILVUS_META_FILE]
        url = make_url(self.db_url)
        if url.get_backend_name() == "sqlite" and url.database:
            files += [Path(url.database + suffix) for suffix in ("", "-wal")]
        sizes.update({f.name: f.stat().st_size for f in files if f.exists()})
        thumbnails, sizes[THUMBNAILS_DIR] = self.thumbnails.usage()
        return IndexStats(
            videos={status.value: int(videos.get(status.value, 0)) for status in VideoStatus},
            segments=int(seg.get(False, 0)),
            removed_segments=int(seg.get(True, 0)),
            rows=self._rows,
            vectors=self.vectors.ntotal if self.vectors is not None else 0,
            faiss=self.vectors.description if self.vectors is not None else "none",
            bytes=sizes,
            recent_failures=[(r.path, r.error) for r in failures],
            thumbnails=thumbnails,
        )

    # -- closing ------------------------------------------------------------------------

    def _close_data(self) -> None:
        for store in self._stores():
            store.close()
        if hasattr(self.vectors, "close"):  # a Milvus client lets go of its connection
            self.vectors.close()
        self.embedding_store = self.rerank_store = self.latent_store = None
        self.vectors = None
        self._data_layout = None
        self._faiss_valid = self._dirty = False

    def _release(self) -> None:
        self._close_data()
        if self.db is not None:
            self.db.close()
            self.db = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor drops the flock
            self._lock_fd = None

    def close(self) -> None:
        """Save FAISS if it changed, close the stores and the database, release the lock."""
        if self.db is None:
            return
        try:
            if not self._needs_recovery and not self.read_only:
                self.save_faiss()
        finally:
            self._release()

    def __enter__(self) -> IndexStore:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
