"""A read-only view of an index (searchers, the HTTP server): see `indexer.store` (its __init__) for
the crash-safety protocol the writer keeps.

Readers take no lock, so any number of them
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

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from alembic.script import ScriptDirectory
from sqlalchemy import select
from sqlalchemy.engine import make_url

from indexer.errors import IndexReplacedError, IndexStoreError, RowStoreError, SchemaTooNewError
from indexer.paths import from_stored
from indexer.store.base import StoreBase
from indexer.store.database import Database, alembic_config, current_revisions, read_only_engine, session_factory
from indexer.store.records import (
    EMBEDDINGS_FILE,
    LATENTS_FILE,
    PATCHES_FILE,
    RERANK_FILE,
    SegmentInfo,
    VideoSegments,
    layout_of,
)
from indexer.store.row_store import RowStore
from indexer.store.schema import IndexInfo, Segment, Video, VideoStatus
from pvl_search.media.windows import Windows


class IndexReader(StoreBase):
    """A read-only view of an index; use as a context manager. Takes no lock, writes
    nothing, and sees newly committed videos after `refresh()` (see the module doc)."""

    read_only = True
    # Rows read under one view stay true until it moves: segment rows change only by removal,
    # which bumps removal_seq; a video's segment list also by new commits. Kept, so a search's
    # candidates and result videos cost no SQL once seen (3 ms of a served tiny search's 12:
    # BENCHMARKS.md, "Served queries"); each cache bounded, then emptied.
    CACHE_ENTRIES = 200_000

    def _cache(self, name: str, key: tuple) -> dict:
        """The cache `name` of rows read under view `key` (emptied when the key moves or it is full)."""
        held = self._caches.get(name)
        if held is None or held[0] != key or len(held[1]) > self.CACHE_ENTRIES:
            held = self._caches[name] = (key, {})
        return held[1]

    def windows(self) -> Windows | None:
        """`StoreBase.windows`, read once per view: every search answer names them, and the
        writer records them before its first segment commits, so only a new view can differ."""
        cache = self._cache("windows", (self._uuid, self._faiss_seq, self._rows))
        if "windows" not in cache:
            cache["windows"] = super().windows()
        return cache["windows"]

    def segments(self, ids: Any) -> dict[int, SegmentInfo]:
        """`StoreBase.segments`, answered from the rows already read while no removal committed."""
        wanted = {int(i) for i in np.asarray(ids).reshape(-1) if i >= 0}
        with self._view_lock:
            cache = self._cache("segments", (self._uuid, self._faiss_seq))
            missing = [i for i in wanted if i not in cache]
            if missing:
                cache.update(super().segments(missing))
            return {i: cache[i] for i in wanted if i in cache}

    def _no_index(self) -> IndexStoreError:
        return IndexStoreError(f"no index at {self.directory} (run `pvl-search index` first)")

    def _open(self) -> None:
        self._caches: dict[str, tuple[tuple, dict]] = {}
        if not self.directory.is_dir():
            raise self._no_index()
        # Taken before anything is read: a replacement during the open is seen next time.
        self._identity = self._file_identity()
        url = make_url(self.db_url)
        if url.get_backend_name() == "sqlite":
            # mode=ro never creates the file, but say clearly that there is no index here.
            if not url.database or url.database == ":memory:" or not Path(url.database).is_file():
                raise self._no_index()
        engine = read_only_engine(self.db_url)
        self.db = Database(engine=engine, sessions=session_factory(engine))
        self._check_schema()
        with self.db.sessions() as s:
            info = s.get(IndexInfo, 1)
        if info is None or layout_of(info) is None:
            raise self._no_index()
        self._info, self._uuid, self._rows = info, info.index_uuid, 0
        self._check_folder_owner()
        self._open_data()  # FAISS file read before the snapshot below: never ahead
        self._sync()

    def _check_schema(self) -> None:
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

    def _open_data(self) -> None:
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
        self._adopt_stores(stores, layout)
        self.vectors = self._load_vectors(layout)

    def _sync(self) -> bool:
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
                self._open_data()
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
        paths = [self.directory, *(self.directory / name for name in (EMBEDDINGS_FILE, RERANK_FILE, LATENTS_FILE,
                                                                          PATCHES_FILE))]
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
        """Whether the index on disk is no longer the one this store opened (the
        folder or its files were deleted, restored or rebuilt): then reopen it, since its
        open files and pooled connections may still show the old copy. Cheap (a few stats)."""
        return self._identity != self._file_identity()

    def refresh(self) -> bool:
        """See what writers have committed since the open or the last refresh (new videos
        searchable, removed ones gone); the in-memory FAISS is caught up, never saved. Cheap
        when nothing changed (one SQL query). Returns whether anything did."""
        if self.db is None:
            raise IndexStoreError(f"index {self.directory} is closed")
        return self._sync()


    def video_segments(self, video_ids: Iterable[int]) -> dict[int, VideoSegments]:
        """The live segments of each video in `video_ids`, in time order (one SQL read): what
        a search scores to find the moments inside its result videos."""
        with self._view_lock:
            cache = self._cache("video_segments", (self._uuid, self._faiss_seq, self._rows))
            wanted = {int(v) for v in video_ids}
            missing = sorted(wanted - cache.keys())
            if missing:
                cache.update(self._read_video_segments(missing))
            return {v: cache[v] for v in wanted}

    def _read_video_segments(self, wanted: list[int]) -> dict[int, VideoSegments]:
        rows: dict[int, list[tuple[int, float, float]]] = {v: [] for v in wanted}
        with self.db.sessions() as s:
            for lo in range(0, len(wanted), 5000):  # stay under the servers' parameter limits
                query = (select(Segment.video_id, Segment.id, Segment.start_s, Segment.end_s)
                         .where(Segment.video_id.in_(wanted[lo : lo + 5000]), Segment.removed.is_(False))
                         .order_by(Segment.video_id, Segment.start_s, Segment.id))
                for r in s.execute(query):
                    if r.id < self._rows:  # committed rows only, as every read of this view
                        rows[r.video_id].append((r.id, r.start_s, r.end_s))
        out = {}
        for video, segs in rows.items():
            ids, starts, ends = zip(*segs) if segs else ((), (), ())
            out[video] = VideoSegments(np.asarray(ids, np.int64), np.asarray(starts, np.float64),
                                       np.asarray(ends, np.float64))
        return out

    def video_details(self, video_id: int) -> dict | None:
        """Metadata of one video and its live segments; None when there is no such video.
        `path` is the readable form (indexer/paths.py)."""
        with self.db.sessions() as s:
            video = s.get(Video, video_id)
            if video is None:
                return None
            segments = s.scalars(
                select(Segment)
                .where(Segment.video_id == video_id, Segment.removed.is_(False))
                .order_by(Segment.start_s)
            ).all()
            return {
                "id": video.id, "path": video.path, "status": video.status, "duration": video.duration,
                "fps": video.fps, "width": video.width, "height": video.height, "error": video.error,
                "created_at": video.created_at.isoformat() if video.created_at else None,
                "segments": [{"id": seg.id, "start_s": seg.start_s, "end_s": seg.end_s} for seg in segments],
            }

    def video_file(self, video_id: int) -> tuple[str, str] | None:
        """(the video's exact path on disk, its status); None when there is no such video."""
        with self.db.sessions() as s:
            query = select(Video.path, Video.path_bytes, Video.status).where(Video.id == video_id)
            row = s.execute(query).one_or_none()
        return None if row is None else (from_stored(row.path, row.path_bytes), row.status)

    def is_live_segment(self, segment_id: int) -> bool:
        """Whether the segment is searchable: not removed, of an indexed video."""
        with self.db.sessions() as s:
            return s.scalar(
                select(Segment.id)
                .join(Video, Segment.video_id == Video.id)
                .where(Segment.id == segment_id, Segment.removed.is_(False), Video.status == VideoStatus.INDEXED.value)
            ) is not None
