"""The SQL statements a writer's transactions are made of (each runs inside the caller's
transaction, in session `s`)."""

from __future__ import annotations

import os

import numpy as np
from sqlalchemy import insert, select, update
from sqlalchemy.orm import Session

from indexer.paths import to_stored
from indexer.store.records import VideoMeta, size_mtime
from indexer.store.schema import IndexInfo, Segment, Video, VideoStatus


def bump_rows(s: Session, rows: int, *, removed: bool) -> int:
    """Set the committed rows (bumping removal_seq when segments were removed); returns it."""
    info = s.get(IndexInfo, 1)
    info.committed_rows = rows
    if removed:
        info.removal_seq += 1
    return info.removal_seq


def upsert_video(s: Session, path: str) -> tuple[Video, list[int]]:
    """The video row for `path` (new if needed) and the ids of its live segments, which
    this transaction flags removed."""
    text, raw = to_stored(path)
    video = s.scalars(select(Video).where(Video.path == text)).one_or_none()
    if video is None:
        video = Video(path=text, path_bytes=raw)
        s.add(video)
        return video, []
    return video, take_out_segments(s, video.id)


def take_out_segments(s: Session, video_id: int) -> list[int]:
    """Flag the live segments of a video removed; returns their ids."""
    live = (Segment.video_id == video_id, Segment.removed.is_(False))
    ids = list(s.scalars(select(Segment.id).where(*live)))
    if ids:
        s.execute(update(Segment).where(*live).values(removed=True))
    return ids


def remove_video(s: Session, video: Video, status: VideoStatus) -> tuple[list[int], int]:
    """Take a video's segments out (status failed or removed); returns their ids and the
    removal_seq this transaction leaves."""
    old_ids = take_out_segments(s, video.id)
    video.status = status.value
    info = s.get(IndexInfo, 1, with_for_update=True)
    if old_ids:
        info.removal_seq += 1
    return old_ids, info.removal_seq


def record_failure(
    s: Session, path: str, error: str, stat: os.stat_result | tuple[int, float] | None, fingerprint: str | None
) -> tuple[int, list[int], int]:
    """Mark `path` failed with its reason (a new video row if needed), taking out the segments
    of an earlier version; returns (video id, removed segment ids, removal_seq)."""
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
    return video.id, old_ids, seq


def insert_indexed_video(
    s: Session, path: str, stat: os.stat_result | tuple[int, float], fingerprint: str, info: VideoMeta,
    spans: np.ndarray, first: int,
) -> tuple[int, list[int]]:
    """The video row of `path`, indexed, with one segment per span whose ids start at store row
    `first`; returns (video id, ids of its previous segments, now flagged removed)."""
    video, old_ids = upsert_video(s, path)
    video.size, video.mtime = size_mtime(stat)
    video.fingerprint = fingerprint
    video.duration, video.fps = info.duration, info.fps
    video.width, video.height = info.width, info.height
    video.status, video.error = VideoStatus.INDEXED.value, None
    s.flush()  # assigns video.id
    if len(spans):
        s.execute(insert(Segment), [{"id": first + i, "video_id": video.id, "start_s": a, "end_s": b}
                                    for i, (a, b) in enumerate(spans.tolist())])
    return video.id, old_ids
