"""Taking videos out of an index: a file that failed, a file that is gone. A mixin of the
writer (`IndexStore`): each removal is one SQL transaction, mirrored in FAISS after the commit
(the crash-safety protocol in indexer/index_store.py)."""

from __future__ import annotations

import os

import numpy as np
from sqlalchemy import select

from indexer.errors import IndexStoreError
from indexer.paths import to_stored
from indexer.schema import Video, VideoStatus
from indexer.store_records import pause_point, size_mtime
from indexer.store_sql import remove_video


class StoreRemovals:
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
                old_ids, seq = remove_video(s, video, VideoStatus.FAILED)
                video.error = error
                if stat is not None:
                    video.size, video.mtime = size_mtime(stat)
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
