"""Append-only file of fixed-width float rows, memory-mapped for reads.

An index keeps one per kind of per-segment data: embeddings (d), rerank states (D + H) and,
optionally, full latents (N * D). Row i is segment i. Reads map the file, so fetching the K
rows a reranker needs touches K rows, not the whole store.

File layout: a 64-byte header, then rows back to back::

    magic "PVLROWS\\0" | version u32 | width u32 | dtype (numpy str, 8 bytes) | tag (16 B) | 0s

The tag is an opaque owner id (the index's uuid), checked on open when the caller gives one.
A row cut short by a crash is not counted and is cut off on the next open; whole rows past
what the database knows are cut by the index store's recovery with `truncate`.

A store opened with ``read_only=True`` (a search process following a writer) never writes:
the file is opened ``rb``, a torn last row is only left uncounted, and `refresh` re-reads the
length as the writer appends, capped at the rows the caller knows are committed.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from indexer.errors import RowStoreError
from pvl_search.durable import fsync_dir

MAGIC = b"PVLROWS\x00"
VERSION = 1
HEADER_SIZE = 64
_HEADER = struct.Struct("<8sII8s16s")


def read_tag(path: str | Path) -> bytes:
    """The owner tag in a row store's header (to check a file before touching it)."""
    with open(path, "rb") as f:
        raw = f.read(HEADER_SIZE)
    if len(raw) < HEADER_SIZE or raw[:8] != MAGIC:
        raise RowStoreError(f"{path} is not a pvl-search row store (bad header)")
    return _HEADER.unpack(raw[: _HEADER.size])[4].rstrip(b"\x00")


class RowStore:
    """Rows of `width` numbers stored as `dtype` (float16 by default), addressed by row id."""

    def __init__(
        self,
        path: str | Path,
        width: int,
        *,
        dtype: np.dtype | type | str = np.float16,
        tag: bytes = b"",
        create: bool = True,
        read_only: bool = False,
    ) -> None:
        self.path = Path(path)
        self.read_only = read_only
        self.width = int(width)
        self.dtype = np.dtype(dtype)
        if self.width <= 0:
            raise ValueError(f"row width must be positive, got {width}")
        if self.dtype.kind != "f":
            raise ValueError(f"row stores hold floats, got dtype {self.dtype}")
        if len(tag) > 16:
            raise ValueError("tag is at most 16 bytes")
        self.row_bytes = self.width * self.dtype.itemsize
        if not self.path.exists():
            if read_only or not create:
                raise RowStoreError(f"row store {self.path} does not exist")
            self._create(tag)
        # Unbuffered: mapped reads see appends.
        self._fh = open(self.path, "rb" if read_only else "r+b", buffering=0)
        try:
            self.tag = self._check_header(tag)
            self._rows = self._rows_on_disk()
            if not read_only and self._file_size() != HEADER_SIZE + self._rows * self.row_bytes:
                # A partial row from an interrupted append: never acknowledged, drop it.
                os.ftruncate(self._fh.fileno(), HEADER_SIZE + self._rows * self.row_bytes)
        except BaseException:
            self._fh.close()
            raise
        self._map: np.memmap | None = None

    def _file_size(self) -> int:
        return os.fstat(self._fh.fileno()).st_size

    def _rows_on_disk(self) -> int:
        """Whole rows in the file now (a partial last row is not counted)."""
        return max(0, (self._file_size() - HEADER_SIZE) // self.row_bytes)

    def _writable(self) -> None:
        if self.read_only:
            raise RowStoreError(f"row store {self.path} is opened read-only")

    def _create(self, tag: bytes) -> None:
        header = _HEADER.pack(MAGIC, VERSION, self.width, self.dtype.str.encode(), tag)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(header.ljust(HEADER_SIZE, b"\x00"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)  # a store file either has a full header or does not exist
        fsync_dir(self.path.parent)

    def _check_header(self, tag: bytes) -> bytes:
        raw = self._fh.read(HEADER_SIZE)
        if len(raw) < HEADER_SIZE or raw[:8] != MAGIC:
            raise RowStoreError(f"{self.path} is not a pvl-search row store (bad header)")
        _, version, width, dtype, stored_tag = _HEADER.unpack(raw[: _HEADER.size])
        dtype_str = dtype.rstrip(b"\x00").decode(errors="replace")
        stored_tag = stored_tag.rstrip(b"\x00")
        if version != VERSION:
            raise RowStoreError(
                f"{self.path} has row store format version {version}; this version of "
                f"pvl-search reads version {VERSION}"
            )
        if width != self.width:
            raise RowStoreError(
                f"{self.path} holds rows of width {width}, but width {self.width} was "
                "expected: the index was built with a different model or layout"
            )
        if dtype_str != self.dtype.str:
            raise RowStoreError(
                f"{self.path} holds {np.dtype(dtype_str)} rows, expected {self.dtype}"
            )
        if tag and stored_tag != tag.rstrip(b"\x00"):
            raise RowStoreError(
                f"{self.path} belongs to another index (tag {stored_tag.hex()}, expected "
                f"{tag.hex()}): the index folder and its database do not match"
            )
        return stored_tag

    def __len__(self) -> int:
        return self._rows

    def __enter__(self) -> RowStore:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    @property
    def nbytes(self) -> int:
        """Bytes on disk, header included."""
        return HEADER_SIZE + self._rows * self.row_bytes

    def append(self, rows: np.ndarray) -> int:
        """Write `rows` (n, width) after the last row; returns the id of the first one.

        Not durable until `flush()`.
        """
        self._writable()
        rows = np.asarray(rows)
        if rows.ndim != 2 or rows.shape[1] != self.width:
            raise ValueError(
                f"{self.path.name}: expected rows of shape (n, {self.width}), got {rows.shape}"
            )
        if not np.isfinite(rows).all():
            raise ValueError(f"{self.path.name}: rows contain NaN or infinite values")
        with np.errstate(over="ignore"):  # overflow is checked just below
            stored = np.ascontiguousarray(rows, dtype=self.dtype)
        if not np.isfinite(stored).all():
            raise ValueError(f"{self.path.name}: values exceed the range of {self.dtype}")
        first = self._rows
        # Write at the end of the last whole row (not at EOF), so nothing is ever misaligned.
        os.pwrite(self._fh.fileno(), stored.tobytes(), HEADER_SIZE + first * self.row_bytes)
        self._rows += len(stored)
        return first

    def flush(self) -> None:
        """Make every appended row durable (fsync)."""
        self._writable()
        os.fsync(self._fh.fileno())

    def _mapped(self, upto: int) -> np.memmap:
        if self._map is None or len(self._map) < upto:
            shape = (self._rows, self.width)
            self._map = np.memmap(self.path, self.dtype, mode="r", offset=HEADER_SIZE, shape=shape)
        return self._map

    def get(self, ids: Iterable[int] | np.ndarray) -> np.ndarray:
        """Rows `ids` as float32 (K, width), in the order given."""
        idx = np.asarray(ids, dtype=np.int64).reshape(-1)
        if idx.size == 0:
            return np.zeros((0, self.width), dtype=np.float32)
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= self._rows:
            bad = lo if lo < 0 else hi
            raise RowStoreError(f"{self.path.name}: row {bad} does not exist ({self._rows} rows)")
        return np.array(self._mapped(hi + 1)[idx], dtype=np.float32)

    def truncate(self, n: int) -> None:
        """Drop every row from `n` on (crash recovery) and make that durable."""
        self._writable()
        if n < 0 or n > self._rows:
            raise RowStoreError(f"{self.path.name}: cannot truncate {self._rows} rows to {n}")
        self._map = None  # a mapping past the new end would fault on access
        os.ftruncate(self._fh.fileno(), HEADER_SIZE + n * self.row_bytes)
        os.fsync(self._fh.fileno())
        self._rows = n

    def refresh(self, upto: int | None = None) -> int:
        """Re-read how many whole rows the file holds, counting at most `upto`; returns the
        new length. For a read-only store following a writer: rows past what the database
        has committed may be an append in progress (or one that never commits and is
        truncated later), so the caller caps the count at its committed rows."""
        rows = self._rows_on_disk()
        if upto is not None:
            rows = min(rows, int(upto))
        if rows < self._rows:
            self._map = None  # never touch a mapping past a shorter count
        self._rows = rows
        return rows

    def close(self) -> None:
        self._map = None
        if not self._fh.closed:
            self._fh.close()
