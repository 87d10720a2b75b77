"""Durable files: what makes a write survive a power cut, shared by the index's stores
(indexer/store) and the shard writer (pvl_search/shards)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def fsync_dir(path: Path) -> None:
    """Make a file's creation or rename durable (the directory entry is data too)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write through PATH.tmp and rename: readers (and a rerun) see the whole file or none."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())  # a power cut must not leave a renamed but empty file
    os.replace(tmp, path)
