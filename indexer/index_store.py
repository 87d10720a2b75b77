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

Readers are `indexer.index_reader.IndexReader`; what both share is `indexer.store_base`.
"""

from __future__ import annotations

import fcntl
import os
import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np
from sqlalchemy import insert
from sqlalchemy.orm import Session

from indexer.database import open_database
from indexer.errors import IndexLockedError, IndexStoreError, ModelMismatchError, RowStoreError
from indexer.row_store import RowStore, fsync_dir
from indexer.schema import IndexInfo, Segment, VideoStatus
from indexer.store_base import StoreBase
from indexer.store_records import (
    EMBEDDINGS_FILE,
    FAISS_FILE,
    LATENTS_FILE,
    LOCK_FILE,
    RERANK_FILE,
    IndexLayout,
    SegmentInfo,
    VideoMeta,
    pause_point,
    size_mtime,
)
from indexer.store_removals import StoreRemovals
from indexer.store_sql import bump_rows, upsert_video
from indexer.vector_backend import MILVUS_META_FILE, vectors_path


class IndexStore(StoreRemovals, StoreBase):
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

    def refresh(self) -> bool:
        """A writer is always up to date with what it committed: nothing to do (readers
        catch up in `IndexReader.refresh`)."""
        if self.db is None:
            raise IndexStoreError(f"index {self.directory} is closed")
        return False

    # -- model / layout -----------------------------------------------------------------

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
                if self.vectors is not None:
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
    ) -> int:
        """Store one indexed video and its segments as one atomic unit; returns its id.

        A path already in the index (changed file, earlier failure) is updated in place
        and its previous segments are removed. `segments` are (start_s, end_s) pairs, one
        per row of `embeddings` (n, d), `rerank_states` (n, D + H) and, when the layout
        keeps latents, `latents` (n, N, D) or (n, N * D). `thumbnails`: one JPEG (or None)
        per segment, written with the store rows; the old segments' thumbnails are deleted.
        """
        self._ready_for_writes()
        spans = np.asarray(segments, dtype=np.float64).reshape(-1, 2)
        n = len(spans)
        rows = self._checked_rows(path, spans, embeddings, rerank_states, latents, thumbnails)
        stores = self._stores()
        size, mtime = size_mtime(stat)
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
                video, old_ids = upsert_video(s, path)
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
                seq = bump_rows(s, first + n, removed=bool(old_ids))
                video_id = video.id
        except BaseException:
            self._recover_after_failure()
            raise
        self._rows = first + n
        pause_point("sql_committed")
        self.thumbnails.delete(old_ids)
        self._apply(old_ids, rows[0], np.arange(first, first + n, dtype=np.int64), seq)
        return video_id

    def _checked_rows(
        self, path: str, spans: np.ndarray, embeddings: np.ndarray, rerank_states: np.ndarray,
        latents: np.ndarray | None, thumbnails: Sequence[bytes | None] | None,
    ) -> list[np.ndarray]:
        """The video's rows for each store, float32, after checking every shape (ValueError)."""
        layout = self._require_layout()
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
        for store, block in zip(self._stores(), rows):
            if block.shape != (n, store.width):
                raise ValueError(
                    f"{path}: expected {store.path.name} rows of shape ({n}, {store.width}), "
                    f"got {block.shape}"
                )
        return rows

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

    def save_faiss(self) -> None:
        """Write the FAISS index if it changed (call at batch boundaries and at the end)."""
        if self.vectors is None or not self._dirty or not self._faiss_valid:
            return
        self.vectors.meta = {
            "index_uuid": self._uuid,
            "rows": self._faiss_rows,
            "removal_seq": self._faiss_seq,
            "factory": self.layout.faiss_factory if self.layout else None,
        }
        self.vectors.save(vectors_path(self.directory, self.layout))
        self._dirty = False

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
                self.save_faiss()
        finally:
            self._release()
