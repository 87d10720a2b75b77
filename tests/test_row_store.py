"""Row stores on real files: append, reopen, truncate, torn rows, read-only."""


from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from indexer.errors import (
    RowStoreError,
)
from indexer.store.row_store import HEADER_SIZE, RowStore

# -- row store -------------------------------------------------------------------------


def test_row_store_append_get_reopen(tmp_path: Path) -> None:
    path = tmp_path / "rows.f16"
    rows = np.random.default_rng(0).normal(size=(50, 12)).astype(np.float32)
    with RowStore(path, 12) as store:
        assert store.append(rows[:20]) == 0
        assert store.append(rows[20:]) == 20
        store.flush()
        assert len(store) == 50
        got = store.get([49, 0, 7, 7])
        assert got.dtype == np.float32 and got.shape == (4, 12)
        np.testing.assert_allclose(got, rows[[49, 0, 7, 7]], rtol=1e-3, atol=1e-3)  # float16
    assert path.stat().st_size == HEADER_SIZE + 50 * 12 * 2
    with RowStore(path, 12, create=False) as store:
        assert len(store) == 50
        np.testing.assert_allclose(store.get(np.arange(50)), rows, rtol=1e-3, atol=1e-3)
        with pytest.raises(RowStoreError, match="row 50 does not exist"):
            store.get([50])


def test_row_store_refuses_wrong_width_and_foreign_files(tmp_path: Path) -> None:
    path = tmp_path / "rows.f16"
    RowStore(path, 8, tag=b"\x01\x02").close()
    with pytest.raises(RowStoreError, match="width 8.*width 9 was expected"):
        RowStore(path, 9)
    with pytest.raises(RowStoreError, match="another index"):
        RowStore(path, 8, tag=b"\x09")
    with pytest.raises(RowStoreError, match="does not exist"):
        RowStore(tmp_path / "missing.f16", 8, create=False)
    (tmp_path / "junk.f16").write_bytes(b"not a store at all" * 10)
    with pytest.raises(RowStoreError, match="not a pvl-search row store"):
        RowStore(tmp_path / "junk.f16", 8)
    with RowStore(path, 8) as store:
        with pytest.raises(ValueError, match="shape"):
            store.append(np.zeros((2, 7)))
        with pytest.raises(ValueError, match="range"):
            store.append(np.full((1, 8), 1e6))  # float16 overflow is refused, not stored as inf
        assert len(store) == 0


def test_row_store_truncate_and_torn_row(tmp_path: Path) -> None:
    path = tmp_path / "rows.f16"
    with RowStore(path, 4) as store:
        store.append(np.arange(40, dtype=np.float32).reshape(10, 4))
        store.get([9])  # maps the file, which truncate must drop
        store.truncate(6)
        assert len(store) == 6
        with pytest.raises(RowStoreError):
            store.get([6])
        assert store.append(np.ones((1, 4))) == 6
        np.testing.assert_array_equal(store.get([5, 6]), [[20, 21, 22, 23], [1, 1, 1, 1]])
    with open(path, "ab") as f:  # a crash in the middle of a row
        f.write(b"\x00\x3c\x00")
    with RowStore(path, 4) as store:
        assert len(store) == 7
        assert path.stat().st_size == HEADER_SIZE + 7 * 8
        assert store.append(np.full((1, 4), 2.0)) == 7
        np.testing.assert_array_equal(store.get([7]), [[2, 2, 2, 2]])


def test_row_store_read_only(tmp_path: Path) -> None:
    path = tmp_path / "rows.f16"
    writer = RowStore(path, 4, tag=b"\x07")
    writer.append(np.arange(24, dtype=np.float32).reshape(6, 4))
    writer.flush()
    with open(path, "ab") as f:  # an append in progress: half a row
        f.write(b"\x00\x3c\x00")
    size = path.stat().st_size
    with pytest.raises(RowStoreError, match="does not exist"):
        RowStore(tmp_path / "missing.f16", 4, read_only=True)  # never created
    assert not (tmp_path / "missing.f16").exists()
    with pytest.raises(RowStoreError, match="another index"):
        RowStore(path, 4, tag=b"\x08", read_only=True)
    reader = RowStore(path, 4, tag=b"\x07", read_only=True)
    assert len(reader) == 6 and path.stat().st_size == size  # torn row ignored, not cut
    np.testing.assert_array_equal(reader.get([5]), [[20, 21, 22, 23]])
    for write in (
        lambda: reader.append(np.ones((1, 4))),
        reader.flush,
        lambda: reader.truncate(2),
    ):
        with pytest.raises(RowStoreError, match="read-only"):
            write()
    assert reader.refresh(upto=4) == 4  # capped at what the caller knows is committed
    with pytest.raises(RowStoreError, match="row 4 does not exist"):
        reader.get([4])
    writer.close()
    writer = RowStore(path, 4)  # the writer's open cuts the torn row; it appends more
    writer.append(np.full((2, 4), 7.0))
    writer.flush()
    assert reader.refresh() == 8
    np.testing.assert_array_equal(reader.get([7, 0]), [[7] * 4, [0, 1, 2, 3]])
    writer.close()
    reader.close()


