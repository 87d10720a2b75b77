"""The FAISS wrapper on real FAISS indexes: exact then approximate, filters, removal, atomic saves."""


from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pytest
from store_helpers import clustered, recall_at

from indexer.errors import (
    IndexStoreError,
)
from indexer.store.vectors.faiss_index import VectorIndex

# -- FAISS -----------------------------------------------------------------------------


def test_exact_while_small() -> None:
    xb, xq = clustered(800, 32), clustered(20, 32, seed=1)
    ids = np.arange(800) * 3 + 1
    index = VectorIndex(32, approx_threshold=1000)
    index.add(xb, ids)
    assert not index.is_approximate and index.description == "Flat"
    D, I = index.search(xq, 10)
    gt_D, gt_I = faiss.knn(xq, xb, 10, metric=faiss.METRIC_INNER_PRODUCT)
    np.testing.assert_array_equal(I, ids[gt_I])
    np.testing.assert_allclose(D, gt_D, rtol=1e-5)


def test_switches_to_approximate_past_the_threshold_with_good_recall() -> None:
    n, d = 20_000, 32
    xb, xq = clustered(n, d), clustered(200, d, seed=1)
    ids = np.arange(n, dtype=np.int64) + 100
    index = VectorIndex(d, approx_threshold=5_000)
    for lo in range(0, n, 2_500):  # grows past the threshold one batch at a time
        index.add(xb[lo : lo + 2_500], ids[lo : lo + 2_500])
        assert index.is_approximate == (lo + 2_500 >= 5_000)
    assert index.ntotal == n and index.description.startswith("IVF")
    assert sorted(index.ids().tolist()) == ids.tolist()
    _, gt = faiss.knn(xq, xb, 10, metric=faiss.METRIC_INNER_PRODUCT)
    _, I = index.search(xq, 10)
    assert recall_at(I, ids[gt]) >= 0.9


def test_user_factory_hnsw() -> None:
    n, d = 4_000, 32
    xb, xq = clustered(n, d), clustered(100, d, seed=1)
    index = VectorIndex(d, factory="HNSW32")
    index.add(xb, np.arange(n))
    assert index.is_approximate and index.description == "HNSW32"
    _, gt = faiss.knn(xq, xb, 10, metric=faiss.METRIC_INNER_PRODUCT)
    assert recall_at(index.search(xq, 10)[1], gt) >= 0.9
    assert index.remove_ids(np.arange(0, n, 2)) == n // 2  # HNSW cannot remove: rebuilt
    assert (index.search(xq, 10)[1] % 2 == 1).all()


@pytest.mark.parametrize("kind", ["exact", "ivf", "ivf-selector", "hnsw"])
def test_filtered_search_returns_k_allowed_results(kind: str) -> None:
    n, d, k = 12_000, 32, 10
    xb, xq = clustered(n, d), clustered(30, d, seed=2)
    ids = np.arange(n, dtype=np.int64) * 2
    index = VectorIndex(
        d,
        factory="HNSW32" if kind == "hnsw" else None,
        approx_threshold=1_000 if kind != "exact" else 50_000,
        exact_filter_limit=0 if kind == "ivf-selector" else 20_000,  # force the selector path
    )
    index.add(xb, ids)
    assert index.is_approximate == (kind != "exact")
    rng = np.random.default_rng(3)
    for size in (25, 3_000):  # very selective, then moderately
        rows = np.sort(rng.choice(n, size, replace=False))
        allowed = np.concatenate([ids[rows], [-5, 10**9]])  # ids not in the index are ignored
        D, I = index.search(xq, k, allowed_ids=allowed)
        assert (I >= 0).all(), "fewer than k results under a filter"
        assert np.isin(I, ids[rows]).all()
        _, gt = faiss.knn(xq, xb[rows], k, metric=faiss.METRIC_INNER_PRODUCT)
        if size == 25 or kind == "exact":
            np.testing.assert_array_equal(np.sort(I, axis=1), np.sort(ids[rows][gt], axis=1))
        else:
            assert recall_at(I, ids[rows][gt]) >= 0.9
    D, I = index.search(xq, k, allowed_ids=ids[:3])  # fewer allowed than k: -1 padding
    assert (I[:, :3] >= 0).all() and (I[:, 3:] == -1).all()


def test_remove_ids() -> None:
    xb = clustered(6_000, 16)
    for threshold in (100_000, 2_000):  # Flat, then IVF
        index = VectorIndex(16, approx_threshold=threshold)
        index.add(xb, np.arange(6_000))
        assert index.remove_ids(np.arange(0, 6_000, 3)) == 2_000
        assert index.remove_ids([0, 3]) == 0  # already gone
        assert index.ntotal == 4_000
        _, I = index.search(xb[:50], 20)
        assert (I % 3 != 0).all()


def test_save_is_atomic_and_load_checks(tmp_path: Path) -> None:
    path = tmp_path / "v.faiss"
    xb = clustered(3_000, 16)
    index = VectorIndex(16, approx_threshold=1_000)
    index.add(xb, np.arange(3_000) + 7)
    index.meta = {"rows": 3_007}
    Path(str(path) + ".tmp").write_bytes(b"half-written garbage from a crash")
    index.save(path)
    assert not Path(str(path) + ".tmp").exists()
    Path(str(path) + ".tmp").write_bytes(b"another crash, after the last save")
    loaded = VectorIndex.load(path)  # the leftover .tmp is ignored
    assert loaded.meta == {"rows": 3_007} and loaded.ntotal == 3_000
    assert loaded.description == index.description
    np.testing.assert_array_equal(loaded.search(xb[:20], 5)[1], index.search(xb[:20], 5)[1])
    path.write_bytes(path.read_bytes()[:1000])  # damaged
    with pytest.raises(IndexStoreError, match="damaged"):
        VectorIndex.load(path)
    with pytest.raises(IndexStoreError):
        VectorIndex.load(tmp_path / "missing.faiss")


