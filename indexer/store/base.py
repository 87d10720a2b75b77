"""What the index writer and its readers share: the folder's stores and FAISS in memory,
catching FAISS up with what SQL committed, the model check, and the reads a search, the
server and `status` make (the writer's statements are in indexer/store/sql_writes.py)."""

from __future__ import annotations

import json
import threading
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from indexer.errors import IndexStoreError
from indexer.paths import from_stored
from indexer.search.request import SearchFilters
from indexer.store.database import Database, default_url
from indexer.store.model_check import check_same_model
from indexer.store.records import (
    EMBEDDINGS_FILE,
    FAISS_FILE,
    LATENTS_FILE,
    PATCHES_FILE,
    RERANK_FILE,
    THUMBNAILS_DIR,
    IndexLayout,
    IndexStats,
    KnownVideo,
    SegmentInfo,
    layout_of,
)
from indexer.store.row_store import RowStore, read_tag
from indexer.store.schema import IndexInfo, Segment, Video, VideoStatus
from indexer.store.sql_filters import path_matches
from indexer.store.thumbnails import ThumbnailStore
from indexer.store.vectors.choice import MILVUS_META_FILE, VectorSettings, load_saved_vectors, new_vectors
from indexer.store.vectors.faiss_index import DEFAULT_APPROX_THRESHOLD, VectorIndex
from indexer.store.windows_record import read_windows, reindex_pending
from pvl_search.media.windows import Windows


class StoreBase(ABC):
    """An open index folder (+ database); use as a context manager. Subclasses open it:
    `IndexStore` (the one writer) or `IndexReader` (any number, read-only)."""

    read_only = False

    def __init__(
        self,
        directory: str | Path,
        db_url: str | None = None,
        *,
        approx_threshold: int = DEFAULT_APPROX_THRESHOLD,
        nprobe: int | None = None,
        ef_search: int | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.db_url = db_url or default_url(self.directory)
        self.approx_threshold = approx_threshold
        self._search_params = {"nprobe": nprobe, "ef_search": ef_search}
        self.thumbnails = ThumbnailStore(self.directory / THUMBNAILS_DIR, read_only=self.read_only)
        self._view_lock = threading.RLock()  # refresh vs search in a threaded reader
        self._data_layout: IndexLayout | None = None  # layout the open stores were made for
        self.db: Database | None = None
        self._info: IndexInfo | None = None
        self._uuid = ""
        self._rows = 0  # committed rows this view reflects
        self.embedding_store: RowStore | None = None
        self.rerank_store: RowStore | None = None
        self.latent_store: RowStore | None = None
        self.patch_store: RowStore | None = None
        self.vectors: VectorIndex | None = None
        self._faiss_rows = 0  # committed rows the in-memory FAISS reflects
        self._faiss_seq = 0  # removal_seq the in-memory FAISS reflects
        self._faiss_valid = False
        self._dirty = False  # in-memory FAISS differs from the file
        self._needs_recovery = False
        try:
            self._open()
        except BaseException:
            self._release()
            raise

    @abstractmethod
    def _open(self) -> None:
        """Open the database, the stores and FAISS as the subclass needs them."""

    # -- layout, stores, FAISS ----------------------------------------------------------

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

    @property
    def layout(self) -> IndexLayout | None:
        """The stored layout, or None while no model has been set."""
        return layout_of(self._info)

    def _store_paths(self, layout: IndexLayout) -> list[tuple[Path, int]]:
        paths = [
            (self.directory / EMBEDDINGS_FILE, layout.embedding_dim),
            (self.directory / RERANK_FILE, layout.rerank_width),
        ]
        if layout.latent_shape is not None:
            tokens, dim = layout.latent_shape
            paths.append((self.directory / LATENTS_FILE, tokens * dim))
        if layout.patch_shape is not None:
            tokens, dim = layout.patch_shape
            paths.append((self.directory / PATCHES_FILE, tokens * dim))
        return paths

    def _stores(self) -> list[RowStore]:
        stores = (self.embedding_store, self.rerank_store, self.latent_store, self.patch_store)
        return [s for s in stores if s is not None]

    def _adopt_stores(self, stores: list[RowStore], layout: IndexLayout) -> None:
        """Name the opened stores (in `_store_paths` order) by what they hold."""
        by_name = {store.path.name: store for store in stores}
        self.embedding_store, self.rerank_store = stores[0], stores[1]
        self.latent_store, self.patch_store = by_name.get(LATENTS_FILE), by_name.get(PATCHES_FILE)
        self._data_layout = layout

    def _vector_settings(self) -> VectorSettings:
        # The row store, not `rerank_states`: Milvus reads rows while `committed_rows` moves.
        return VectorSettings(self._uuid, self.read_only, lambda ids: self.rerank_store.get(np.asarray(ids, np.int64)),
                              self.approx_threshold, self._search_params)

    def _new_vectors(self, layout: IndexLayout) -> VectorIndex:
        if self.vectors is not None:
            self.vectors.close()  # replaced by a rebuild: its Milvus connection is let go
        return new_vectors(self._vector_settings(), layout)  # FAISS, or Milvus where the index records it

    def _load_vectors(self, layout: IndexLayout) -> VectorIndex | None:
        """The saved vector index if it belongs here; None means rebuild (it is derived)."""
        loaded = load_saved_vectors(self.directory, self._vector_settings(), layout)
        if loaded is None:
            return None
        vectors, meta = loaded
        self._faiss_rows, self._faiss_seq = int(meta.get("rows", -1)), int(meta.get("removal_seq", -1))
        self._faiss_valid = self._faiss_rows >= 0
        return vectors

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

    def windows(self) -> Windows | None:
        """The windows this index cuts videos into; None: not recorded (an older index)."""
        return read_windows(self.directory)

    def reindex_pending(self) -> bool:
        """Whether a `--reindex` to those windows was interrupted (store/windows_record.py)."""
        return reindex_pending(self.directory)

    def check_model(self, model_config: str, weights_fingerprint: str) -> None:
        """Raise ModelMismatchError unless this index was built with this model."""
        check_same_model(self.directory, *self.model(), model_config, weights_fingerprint)

    def _require_layout(self) -> IndexLayout:
        layout = self.layout
        if layout is None:
            raise IndexStoreError(f"index {self.directory} has no model set: call set_model first")
        return layout

    # -- reads --------------------------------------------------------------------------

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
        if self.vectors is not None and (states := self.vectors.fetched_states(self._committed_ids(ids))) is not None:
            return states  # Milvus returned them with the hits
        return self._require(self.rerank_store).get(self._committed_ids(ids))

    def latents(self, ids: Any) -> np.ndarray:
        """Full latents of segments `ids`, float32 (K, N, D); only if the index keeps them."""
        return self._token_rows(ids, self.latent_store, self._require_layout().latent_shape, "latents")

    def patch_tokens(self, ids: Any) -> np.ndarray:
        """Patch tokens of segments `ids`, float32 (K, M, D); only if the index keeps them."""
        return self._token_rows(ids, self.patch_store, self._require_layout().patch_shape, "patch tokens")

    def _token_rows(self, ids: Any, store: RowStore | None, shape: tuple[int, int] | None, what: str) -> np.ndarray:
        if shape is None or store is None:
            raise IndexStoreError(f"index {self.directory} keeps no {what}")
        rows = store.get(self._committed_ids(ids))
        return rows.reshape(len(rows), *shape)

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
            model_config=json.loads(self._info.model_config) if self._info.model_config else {},
            fingerprint=self._info.weights_fingerprint,
            encode_dtype=self._info.encode_dtype, windows=self.windows(),
        )

    def known_videos(self) -> dict[str, KnownVideo]:
        """Every video the index knows: path -> (size, mtime, fingerprint, status)."""
        with self.db.sessions() as s:
            rows = s.execute(
                select(Video.path, Video.path_bytes, Video.size, Video.mtime, Video.fingerprint, Video.status)
            )
            return {
                from_stored(r.path, r.path_bytes): KnownVideo(r.size, r.mtime, r.fingerprint, r.status) for r in rows
            }

    def filtered_segment_ids(self, filters: SearchFilters) -> np.ndarray:
        """Ids of live segments whose video passes the filters (applied in SQL), ascending."""
        query = (
            select(Segment.id)
            .join(Video, Segment.video_id == Video.id)
            .where(Segment.removed.is_(False), Video.status == VideoStatus.INDEXED.value)
        )
        if filters.path_glob:
            query = query.where(path_matches(Video.path, filters.path_glob, self.db.engine.dialect.name))
        if filters.min_duration is not None:
            query = query.where(Video.duration >= filters.min_duration)
        if filters.max_duration is not None:
            query = query.where(Video.duration <= filters.max_duration)
        if filters.added_since is not None:
            query = query.where(Video.created_at >= filters.added_since)
        with self.db.sessions() as s:
            return np.asarray(s.scalars(query.order_by(Segment.id)).all(), dtype=np.int64)

    def counts(self) -> tuple[int, int]:
        """(indexed videos, searchable segments) as SQL has them now."""
        with self.db.sessions() as s:
            videos = s.scalar(select(func.count()).select_from(Video).where(Video.status == VideoStatus.INDEXED.value))
            segments = s.scalar(select(func.count()).select_from(Segment).where(Segment.removed.is_(False)))
        return int(videos or 0), int(segments or 0)

    def segment_ids(self) -> np.ndarray:
        """Ids of searchable segments, ascending."""
        query = select(Segment.id).where(Segment.removed.is_(False)).order_by(Segment.id)
        with self.db.sessions() as s:
            return np.asarray(s.scalars(query).all(), dtype=np.int64)

    # -- closing ------------------------------------------------------------------------

    def _close_data(self) -> None:
        for store in self._stores():
            store.close()
        if self.vectors is not None:
            self.vectors.close()  # a Milvus client lets go of its connection
        self.embedding_store = self.rerank_store = self.latent_store = self.patch_store = None
        self.vectors = None
        self._data_layout = None
        self._faiss_valid = self._dirty = False

    def _release(self) -> None:
        self._close_data()
        if self.db is not None:
            self.db.close()
            self.db = None

    def close(self) -> None:
        """Close the stores and the database."""
        if self.db is not None:
            self._release()

    def __enter__(self):  # noqa: ANN204 - the subclass itself
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
