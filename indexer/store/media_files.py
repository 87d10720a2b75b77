"""The files a viewer may fetch from an index, looked up by id, never by path: a video's file
(only while it is indexed and present on disk) and a live segment's thumbnail."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from indexer.store.index_reader import IndexReader
from indexer.store.schema import VideoStatus
from indexer.store.thumbnails import MEDIA_TYPE as THUMBNAIL_MEDIA_TYPE

# By extension (the indexer's list, pvl_search.media.video): Python's mimetypes depends on the
# machine's tables and misses several of these.
MEDIA_TYPES = {
    ".mp4": "video/mp4", ".m4v": "video/mp4", ".mkv": "video/x-matroska", ".webm": "video/webm",
    ".avi": "video/x-msvideo", ".mov": "video/quicktime", ".mpg": "video/mpeg", ".mpeg": "video/mpeg",
    ".ts": "video/mp2t", ".wmv": "video/x-ms-wmv", ".flv": "video/x-flv", ".3gp": "video/3gpp",
    ".ogv": "video/ogg", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png",
    ".bmp": "image/bmp", ".webp": "image/webp",
}  # fmt: skip
FALLBACK_MEDIA_TYPE = "application/octet-stream"


class MediaNotFound(LookupError):
    """Nothing to serve for this id; the message says why (unknown, removed, failed, gone)."""


@dataclass(frozen=True)
class MediaFile:
    path: Path
    media_type: str


def media_type(path: str | os.PathLike[str]) -> str:
    """The MIME type a browser needs to decide whether it can play the file."""
    return MEDIA_TYPES.get(Path(path).suffix.lower(), FALLBACK_MEDIA_TYPE)


def video_file(store: IndexReader, video_id: int) -> MediaFile:
    """The file of an indexed video that is still on disk, else MediaNotFound."""
    found = store.video_file(video_id)
    if found is None:
        raise MediaNotFound(f"no video with id {video_id}")
    stored_path, status = found
    if status != VideoStatus.INDEXED.value:
        raise MediaNotFound(f"video {video_id} is {status}, not served")
    path = Path(stored_path)  # a non-UTF-8 name: its exact bytes
    if not path.is_file():
        raise MediaNotFound(f"the file of video {video_id} is gone")
    return MediaFile(path, media_type(path))


def thumbnail_file(store: IndexReader, segment_id: int) -> MediaFile:
    """The thumbnail of a live segment of an indexed video, else MediaNotFound."""
    if not store.is_live_segment(segment_id):
        raise MediaNotFound(f"no live segment with id {segment_id}")
    path = store.thumbnails.path(segment_id)
    if not path.is_file():
        raise MediaNotFound(f"segment {segment_id} has no thumbnail (run `pvl-search index` to make it)")
    return MediaFile(path, THUMBNAIL_MEDIA_TYPE)


def has_thumbnail(store: IndexReader, segment_id: int) -> bool:
    """Whether a thumbnail file exists (for a segment a search just returned as live)."""
    return store.thumbnails.exists(segment_id)
