"""The FAISS index file of an index folder: one self-contained file, a JSON header (the
index's settings and the caller's metadata) then the serialised FAISS index. Written to
``path.tmp``, fsynced and renamed over ``path``: a reader sees the old file or the new one,
never half of one; a leftover ``.tmp`` is simply overwritten."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from indexer.errors import IndexStoreError
from pvl_search.durable import fsync_dir

MAGIC = b"PVLFAISS"
FORMAT_VERSION = 1
_LEN = struct.Struct("<Q")


def write_index_file(path: Path, header: dict[str, Any], index: faiss.Index) -> None:
    """Write `header` (JSON-able) and `index` to `path` atomically."""
    data = json.dumps({"version": FORMAT_VERSION, **header}).encode()
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(MAGIC + _LEN.pack(len(data)) + data)
        f.write(faiss.serialize_index(index).tobytes())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def read_index_file(path: Path) -> tuple[dict[str, Any], faiss.Index]:
    """(header, FAISS index) of a file written by `write_index_file`; IndexStoreError if it is
    missing or damaged."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise IndexStoreError(f"cannot read FAISS index {path}: {exc}") from exc
    start = len(MAGIC) + _LEN.size
    if raw[: len(MAGIC)] != MAGIC or len(raw) < start:
        raise IndexStoreError(f"{path} is not a pvl-search FAISS index file")
    (hlen,) = _LEN.unpack(raw[len(MAGIC) : start])
    try:
        header = json.loads(raw[start : start + hlen])
        if header["version"] != FORMAT_VERSION:
            raise IndexStoreError(f"{path} has format version {header['version']}, expected {FORMAT_VERSION}")
        index = faiss.deserialize_index(np.frombuffer(raw, np.uint8, offset=start + hlen))
    except (ValueError, KeyError, RuntimeError) as exc:
        raise IndexStoreError(f"FAISS index {path} is damaged: {exc}") from exc
    if index.d != header["dim"]:
        raise IndexStoreError(f"FAISS index {path} is damaged: dimension mismatch")
    return header, index
