"""Thumbnails of an index: one small JPEG per segment, named by the segment id, in the
index folder (``thumbnails/<id // 1000>/<id>.jpg``: no folder holds more than 1000 files).

SQL says which segments exist (indexer/store/__init__.py); the thumbnails follow it:

- a video's thumbnails are written (and fsynced) with its store rows, before its SQL commit,
  so every segment a thumbnail-making run commits has its thumbnail;
- the thumbnails of segments a commit removes are deleted right after that commit;
- what a crash leaves between those steps (files of ids that never committed, or of segments
  removed since) is deleted by `prune`, which the indexer runs at the start of every run,
  before anything is added: a row id reused after a crash never shows an old picture.

A missing thumbnail is not an error anywhere: the page shows a placeholder and the next
`pvl-search index` run makes it. Readers (the server) only open files of segments SQL says
are live, so they never show a thumbnail that is being pruned.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from indexer.errors import IndexStoreError
from pvl_search.durable import fsync_dir

SHARD = 1000  # files per folder
SUFFIX = ".jpg"
MEDIA_TYPE = "image/jpeg"


class ThumbnailStore:
    """The ``thumbnails`` folder of an index. Writes are refused when opened read-only."""

    def __init__(self, directory: str | Path, *, read_only: bool = False) -> None:
        self.directory = Path(directory)
        self.read_only = read_only

    def path(self, segment_id: int) -> Path:
        segment_id = int(segment_id)
        if segment_id < 0:
            raise ValueError(f"segment ids are not negative, got {segment_id}")
        return self.directory / str(segment_id // SHARD) / f"{segment_id}{SUFFIX}"

    def exists(self, segment_id: int) -> bool:
        return self.path(segment_id).is_file()

    def _refuse_read_only(self) -> None:
        if self.read_only:
            raise IndexStoreError(f"thumbnails opened read-only: {self.directory}")

    def write(self, ids: Sequence[int], images: Sequence[bytes | None]) -> int:
        """Store `images[i]` as the thumbnail of segment `ids[i]` (None: none for it), each
        durably (tmp + fsync + rename); returns how many were written."""
        self._refuse_read_only()
        if len(ids) != len(images):
            raise ValueError(f"{len(ids)} segment ids but {len(images)} thumbnails")
        folders: set[Path] = set()
        written = 0
        for segment_id, image in zip(ids, images):
            if image is None:
                continue
            path = self.path(segment_id)
            if path.parent not in folders:
                path.parent.mkdir(parents=True, exist_ok=True)
                folders.add(path.parent)
            tmp = path.with_name(path.name + ".tmp")
            with open(tmp, "wb") as f:
                f.write(image)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            written += 1
        for folder in folders:
            fsync_dir(folder)
        if folders:
            fsync_dir(self.directory)
        return written

    def delete(self, ids: Iterable[int]) -> None:
        """Delete the thumbnails of `ids` (those that have none are skipped)."""
        self._refuse_read_only()
        for segment_id in ids:
            self.path(segment_id).unlink(missing_ok=True)

    def _files(self) -> Iterable[tuple[int | None, os.DirEntry]]:
        """(segment id, entry) of every file; id None for anything that is not a thumbnail
        (a temporary file a crash left behind)."""
        if not self.directory.is_dir():
            return
        with os.scandir(self.directory) as shards:
            for shard in shards:
                if not shard.is_dir(follow_symlinks=False):
                    continue
                with os.scandir(shard.path) as entries:
                    for entry in entries:
                        stem, suffix = os.path.splitext(entry.name)
                        ok = suffix == SUFFIX and stem.isdigit() and entry.is_file(follow_symlinks=False)
                        yield (int(stem) if ok else None), entry

    def ids(self) -> np.ndarray:
        """Ids of the segments that have a thumbnail, sorted."""
        return np.asarray(sorted(i for i, _ in self._files() if i is not None), dtype=np.int64)

    def prune(self, keep: Iterable[int]) -> int:
        """Delete every thumbnail whose id is not in `keep` (the live segments) and every
        leftover temporary file; returns how many files were deleted."""
        self._refuse_read_only()
        keep = set(int(i) for i in keep)
        deleted = 0
        for segment_id, entry in list(self._files()):
            if segment_id is None or segment_id not in keep:
                os.unlink(entry.path)
                deleted += 1
        return deleted

    def usage(self) -> tuple[int, int]:
        """(thumbnails, bytes on disk) for `pvl-search status`."""
        count = nbytes = 0
        for segment_id, entry in self._files():
            if segment_id is not None:
                count += 1
                nbytes += entry.stat(follow_symlinks=False).st_size
        return count, nbytes
