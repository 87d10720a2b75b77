"""The one writer of an index folder: adds and removes videos, records the model and layout,
recovers after a crash and saves the vector index. The crash-safety protocol it keeps is
described in indexer/store/__init__.py."""

from __future__ import annotations

import fcntl
import os
import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from indexer.errors import IndexLockedError, IndexStoreError, ModelMismatchError, RowStoreError
from indexer.paths import to_stored
from indexer.store.base import StoreBase
from indexer.store.database import open_database
from indexer.store.records import (
    EMBEDDINGS_FILE,
    FAISS_FILE,
    LATENTS_FILE,
    LOCK_FILE,
    PATCHES_FILE,
    RERANK_FILE,
    IndexLayout,
    SegmentInfo,
    VideoMeta,
    checked_rows,
    layout_columns,
    pause_point,
)
from indexer.store.row_store import RowStore
from indexer.store.schema import IndexInfo, Video, VideoStatus
from indexer.store.sql_writes import bump_rows, insert_indexed_video, record_failure, remove_video
from indexer.store.vectors.choice import (
    MILVUS_META_FILE,
    build_saved_vectors,
    new_vectors,
    shares_collection,
    vectors_path,
)
from indexer.store.windows_record import write_windows
from pvl_search.durable import fsync_dir
from pvl_search.media.windows import Windows


class IndexStore(StoreBase):
    """The one writer of an index folder (+ database); use as a context manager. A second
    writer is refused (the folder's lock); readers are `IndexReader`."""

    _lock_fd: int | None = None  # the folder's lock, held while open

    def _open(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock_fd = self._lock()
        self.db = open_database(self.db_url)
        info = self._info_row()
        self._uuid = info.index_uuid
        self._rows = info.committed_rows
        self._check_folder_owner()
        if self.layout is not None:
            self._open_data()

    # -- opening, locking, recovery -----------------------------------------------------

    def _lock(self) -> int:
        fd = os.open(self.directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise IndexLockedError(f"index {self.directory} is open in another process") from None
        return fd

    def _info_row(self) -> IndexInfo:
        with self.db.sessions.begin() as s:
            info = s.get(IndexInfo, 1)
            if info is None:
                info = IndexInfo(id=1, index_uuid=uuid.uuid4().hex, committed_rows=0, removal_seq=0)
                s.add(info)
        self._info = info
        return info

    def _open_data(self) -> None:
        layout, tag = self._require_layout(), bytes.fromhex(self._uuid)
        stores = []
        try:
            for path, width in self._store_paths(layout):
                # Create missing stores only while nothing is committed: otherwise it is loss.
                stores.append(RowStore(path, width, tag=tag, create=self._rows == 0))
        except RowStoreError:
            for store in stores:
                store.close()
            raise
        self._adopt_stores(stores, layout)
        self.vectors = self._load_vectors(layout)
        self._reconcile()

    def _reconcile(self) -> None:
        """Bring stores and FAISS in line with what SQL has committed (the protocol in indexer/store/__init__.py)."""
        info = self._info_row()
        if info.index_uuid != self._uuid:
            raise IndexStoreError(f"the database of index {self.directory} was replaced while open")
        rows, seq = info.committed_rows, info.removal_seq
        layout = self._require_layout()
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
        self.save_vectors()

    def refresh(self) -> bool:
        """A writer is always up to date with what it committed: nothing to do (readers
        catch up in `IndexReader.refresh`)."""
        if self.db is None:
            raise IndexStoreError(f"index {self.directory} is closed")
        return False

    # -- model / layout -----------------------------------------------------------------

    def record_dtype(self, dtype: str, windows: Windows | None = None, *, reindexing: bool = False) -> None:
        """Writer: segments are about to be encoded in `dtype` (noted once per dtype; the vectors
        are float whatever it is), cut into `windows`, by a `--reindex` run or not (windows.json)."""
        self._ready_for_writes()
        if windows is not None and (self.windows(), self.reindex_pending()) != (windows, reindexing):
            write_windows(self.directory, windows, reindex_pending=reindexing)
        known = [name for name in (self._info.encode_dtype or "").split(",") if name]
        if dtype not in known:
            self._write_info(encode_dtype=",".join([*known, dtype]))

    def set_model(self, model_config: str, weights_fingerprint: str, layout: IndexLayout) -> None:
        """Record the model (and layout) an index is built with.

        On an index without segments this (re)defines it; on one with segments the model
        and the widths must match (ModelMismatchError otherwise); only the FAISS factory and
        the vector store may change there, which builds the vectors again (`_move_vectors`).
        """
        self._ready_for_writes()
        current = self.layout
        if self._rows > 0 and current is not None:
            self.check_model(model_config, weights_fingerprint)
            if current.row_shapes() != layout.row_shapes():
                raise ModelMismatchError(
                    f"index {self.directory} stores {current}, the model gives {layout}"
                )
            if (current.faiss_factory, current.vectors) != (layout.faiss_factory, layout.vectors):
                self._move_vectors(current, layout)
            return
        new_vectors(self._vector_settings(), layout).close()  # e.g. Milvus unreachable: refused, nothing recorded
        # Nothing committed: old store files (if any) hold no data; drop them before the
        # new layout is committed, so a crash in between leaves nothing of the wrong width.
        self._close_data()
        for name in (EMBEDDINGS_FILE, RERANK_FILE, LATENTS_FILE, PATCHES_FILE, FAISS_FILE, MILVUS_META_FILE):
            (self.directory / name).unlink(missing_ok=True)
        fsync_dir(self.directory)
        self._write_info(model_config=model_config, weights_fingerprint=weights_fingerprint,
                         encode_dtype=None, **layout_columns(layout))  # nothing encoded with this model yet
        self._open_data()

    def _move_vectors(self, current: IndexLayout, layout: IndexLayout) -> None:
        """Build the vectors in `layout`'s store from the stored embeddings, save them, and only then
        record `layout`: a move that fails (Milvus unreachable, a disk full) leaves the old store in use."""
        with self.db.sessions() as s:
            info = s.get(IndexInfo, 1)
            rows, seq = info.committed_rows, info.removal_seq
            ids = self._live_ids(s, 0, rows)
        if shares_collection(current, layout):
            # The build replaces the old store's collection: if it fails, the old one is rebuilt.
            (self.directory / MILVUS_META_FILE).unlink(missing_ok=True)
            self._faiss_valid, self._needs_recovery = False, True
        moved = build_saved_vectors(self.directory, self._vector_settings(), layout, self.embedding_store.get(ids),
                                    ids, self._vectors_meta(rows, seq, layout))
        try:
            self._write_info(faiss_factory=layout.faiss_factory, vector_store=layout.vectors)
        except BaseException:
            moved.close()
            raise
        if self.vectors is not None:
            self.vectors.close()  # a Milvus collection is let go of
        self.vectors, self._data_layout = moved, layout
        self._faiss_rows, self._faiss_seq, self._faiss_valid = rows, seq, True
        self._dirty = self._needs_recovery = False

    def _write_info(self, **values: Any) -> None:
        with self.db.sessions.begin() as s:
            info = s.get(IndexInfo, 1, with_for_update=True)
            for key, value in values.items():
                setattr(info, key, value)
        self._info_row()

    # -- writes -------------------------------------------------------------------------

    def _ready_for_writes(self) -> None:
        if self.db is None:
            raise IndexStoreError(f"index {self.directory} is closed")
        if self._needs_recovery:
            self._reconcile()

    def add_video(
        self,
        path: str,
        stat: os.stat_result | tuple[int, float],
        fingerprint: str,
        info: VideoMeta,
        segments: Sequence[tuple[float, float]],
        embeddings: np.ndarray,
        rerank_states: np.ndarray,
        latents: np.ndarray | None = None,
        thumbnails: Sequence[bytes | None] | None = None,
        patches: np.ndarray | None = None,
    ) -> int:
        """Store one indexed video and its segments as one atomic unit; returns its id.

        A path already in the index (changed file, earlier failure) is updated in place
        and its previous segments are removed. `segments` are (start_s, end_s) pairs, one
        per row of `embeddings` (n, d), `rerank_states` (n, D + H) and, when the layout
        keeps latents, `latents` (n, N, D) or (n, N * D); when it keeps patch tokens, `patches`
        (n, M, D) or (n, M * D). `thumbnails`: one JPEG (or None)
        per segment, written with the store rows; the old segments' thumbnails are deleted.
        """
        self._ready_for_writes()
        spans = np.asarray(segments, dtype=np.float64).reshape(-1, 2)
        n = len(spans)
        widths = [(store.path.name, store.width) for store in self._stores()]
        rows = checked_rows(path, self._require_layout(), widths, spans, embeddings, rerank_states, latents,
                            thumbnails, patches)
        stores = self._stores()
        first = self._rows
        try:
            for store, block in zip(stores, rows):
                store.append(block)
            for store in stores:
                store.flush()
            if thumbnails is not None:  # ids >= committed rows: invisible until the commit
                self.thumbnails.write(range(first, first + n), thumbnails)
            pause_point("stores_appended")
            with self.db.sessions.begin() as s:
                self._check_rows(s, first)
                video_id, old_ids = insert_indexed_video(s, path, stat, fingerprint, info, spans, first)
                seq = bump_rows(s, first + n, removed=bool(old_ids))
        except BaseException:
            self._recover_after_failure()
            raise
        self._rows = first + n
        pause_point("sql_committed")
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

    def rebuild_vectors(self) -> int:
        """Writer: build the FAISS index again from the stored embeddings alone (it is derived
        data) and save it; returns its size. Only a writer, which holds the index lock, may."""
        self._ready_for_writes()
        if self.layout is None:
            return 0
        self._faiss_valid = False  # makes the reconciliation rebuild it from the stores
        self._reconcile()
        return self.vectors.ntotal

    def save_vectors(self) -> None:
        """Write the FAISS index if it changed (call at batch boundaries and at the end)."""
        if self.vectors is None or not self._dirty or not self._faiss_valid:
            return
        self.vectors.meta = self._vectors_meta(self._faiss_rows, self._faiss_seq, self.layout)
        self.vectors.save(vectors_path(self.directory, self.layout))
        self._dirty = False

    def _vectors_meta(self, rows: int, seq: int, layout: IndexLayout | None) -> dict[str, Any]:
        """What a saved vector index records: whose it is and the rows and removals it reflects."""
        return {"index_uuid": self._uuid, "rows": rows, "removal_seq": seq,
                "factory": layout.faiss_factory if layout else None}

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
                video_id, old_ids, seq = record_failure(s, path, error, stat, fingerprint)
        except BaseException:
            self._recover_after_failure()
            raise
        self._forget_in_faiss(old_ids, seq)
        return video_id

    def _forget_in_faiss(self, old_ids: list[int], seq: int) -> None:
        """After a committed removal: take the ids out of the in-memory FAISS index (and
        delete their thumbnails)."""
        pause_point("sql_committed")
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
                old_ids, seq = remove_video(s, row, VideoStatus.REMOVED)
        except IndexStoreError:
            raise
        except BaseException:
            self._recover_after_failure()
            raise
        self._forget_in_faiss(old_ids, seq)
        return len(old_ids)

    # -- closing ------------------------------------------------------------------------

    def _release(self) -> None:
        super()._release()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor drops the flock
            self._lock_fd = None

    def close(self) -> None:
        """Save FAISS if it changed, close the stores and the database, release the lock."""
        if self.db is None:
            return
        try:
            if not self._needs_recovery:
                self.save_vectors()
        finally:
            self._release()
