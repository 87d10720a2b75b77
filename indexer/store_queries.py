"""The SQL reads an index answers beside search: which videos it knows, which segments pass
the filters, counts, one video's details, the file behind a video id and whether a segment is
live. A mixin of `StoreBase`: every method reads `self.db` only."""

from __future__ import annotations

import numpy as np
from sqlalchemy import func, select

from indexer.database import Database
from indexer.paths import from_stored
from indexer.request import SearchFilters
from indexer.schema import Segment, Video, VideoStatus
from indexer.sql_filters import path_matches
from indexer.store_records import KnownVideo


class StoreQueries:
    db: Database | None

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

    def segment_ids(self) -> np.ndarray:
        """Ids of searchable segments, ascending."""
        query = select(Segment.id).where(Segment.removed.is_(False)).order_by(Segment.id)
        with self.db.sessions() as s:
            return np.asarray(s.scalars(query).all(), dtype=np.int64)
