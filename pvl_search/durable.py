"""Durable files: what makes a write survive a power cut, shared by the index's stores
(indexer/store) and the shard writer (pvl_search/shards)."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Make a file's creation or rename durable (the directory entry is data too)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
