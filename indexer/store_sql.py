"""The SQL statements a writer's transactions are made of (each runs inside the caller's
transaction, in session `s`)."""

from __future__ import annotations

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from indexer.paths import to_stored
from indexer.schema import IndexInfo, Segment, Video, VideoStatus


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
