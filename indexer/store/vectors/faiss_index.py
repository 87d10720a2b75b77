"""FAISS inner-product index over segment embeddings, ids = segment ids.

Derived data: an index can always be rebuilt from the embedding store (`rebuild_from`).

- Small indexes are exact (``IDMap2,Flat``). Past ``approx_threshold`` vectors the index
  switches by itself to ``IVF{nlist},Flat`` with nlist ~ 4 sqrt(n), trained on a sample,
  and retrains when it has grown 4x since. A user-given factory string replaces that
  choice: used from the start when it needs no training (e.g. ``HNSW32``), otherwise from
  the threshold on. IVF indexes keep their own ids (IDMap's id compaction would corrupt
  them on removal); everything else is wrapped in IndexIDMap2.
- Filtered search (`allowed_ids`) passes an IDSelectorBatch in the search parameters. An
  approximate index may find fewer than k allowed vectors under a selective filter (IVF
  probes few lists, HNSW walks few nodes), so small allowed sets are searched exactly over
  their reconstructed vectors and any short row is redone that way: k results come back
  whenever k allowed ids are in the index.
- `save` writes one self-contained file, atomically (indexer/store/vectors/faiss_file.py).
- With GPUs visible (faiss-gpu), unfiltered searches run on a GPU copy of the index; the
  CPU index stays the master for adds, removals, filters and saving.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from indexer.errors import IndexStoreError
from indexer.store.vectors.faiss_file import read_index_file, write_index_file

# Measured (BENCHMARKS.md, "Measured facts"): batched exact queries ran 5-6x faster with BLAS from 20 queries on.
# FAISS keeps this process-wide; it is set where searches run, not on import.
BLAS_THRESHOLD = 20

DEFAULT_APPROX_THRESHOLD = 50_000
EXACT_FILTER_LIMIT = 20_000  # allowed sets up to this size are searched exactly
_CHUNK = 65_536


def _as_f32(x: np.ndarray, dim: int) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != dim:
        raise ValueError(f"expected vectors of shape (n, {dim}), got {x.shape}")
    return x


def _as_ids(ids: Any) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(ids, dtype=np.int64).reshape(-1))


def auto_nlist(n: int) -> int:
    # ~4 sqrt(n) lists, but at least 39 training points per centroid (FAISS's own minimum).
    return max(1, min(int(4 * math.sqrt(n)), n // 39))


class VectorIndex:
    """Inner-product search over vectors of size `dim`, addressed by int64 ids."""

    def __init__(
        self,
        dim: int,
        *,
        factory: str | None = None,
        approx_threshold: int = DEFAULT_APPROX_THRESHOLD,
        nprobe: int | None = None,
        ef_search: int | None = None,
        exact_filter_limit: int = EXACT_FILTER_LIMIT,
    ) -> None:
        self.dim = int(dim)
        self.exact_filter_limit = exact_filter_limit
        self.factory = factory  # None: automatic (Flat, then IVF past the threshold)
        self.approx_threshold = int(approx_threshold)
        self.nprobe = nprobe  # None: nlist // 8
        self.ef_search = ef_search  # None: max(128, 2k)
        self.meta: dict[str, Any] = {}  # caller data saved with the index
        self._trained_on = 0  # vectors the current approximate index was built from
        self._index = self._exact()
        self._needs_training = False
        self._stay_exact = False  # factory "Flat": exact whatever the size
        if factory is not None:
            target = self._make(factory)
            self._needs_training = not target.is_trained
            self._stay_exact = self._is_exact(target)
            if not self._stay_exact and target.is_trained:
                self._index = target  # e.g. HNSW: usable from the first vector
        self._sorted_ids: np.ndarray | None = None  # cache for filters, reset on change
        self._gpu_res: Any = None
        self._gpu: Any = None

    # -- construction -------------------------------------------------------------------

    def _exact(self) -> faiss.Index:
        return faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))

    def _make(self, factory: str) -> faiss.Index:
        try:
            index = faiss.index_factory(self.dim, factory, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as exc:
            raise IndexStoreError(f"bad FAISS factory string {factory!r}: {exc}") from exc
        ivf = faiss.try_extract_index_ivf(index)
        if ivf is not None:
            ivf.set_direct_map_type(faiss.DirectMap.Hashtable)  # reconstruct by id
            return index
        if isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2)):
            return index
        return faiss.IndexIDMap2(index)

    @staticmethod
    def _inner(index: faiss.Index) -> faiss.Index | None:
        """The index an IDMap wraps, as its concrete class (SWIG hands back a base Index)."""
        if isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2)):
            return faiss.downcast_index(index.index)
        return None

    @classmethod
    def _is_exact(cls, index: faiss.Index) -> bool:
        return isinstance(cls._inner(index), faiss.IndexFlat)

    def _target_factory(self, n: int) -> str | None:
        """The approximate index to use for `n` vectors, or None to stay exact."""
        if self._stay_exact:
            return None
        if self.factory is not None and (n >= self.approx_threshold or not self._needs_training):
            return self.factory
        if self.factory is None and n >= self.approx_threshold:
            return f"IVF{auto_nlist(n)},Flat"
        return None

    def _build(self, factory: str | None, xb: np.ndarray, ids: np.ndarray) -> None:
        index = self._exact() if factory is None else self._make(factory)
        if not index.is_trained and len(xb) == 0:
            index = self._exact()  # nothing to train on yet
        if not index.is_trained:
            # A fixed seed keeps rebuilds reproducible; FAISS samples further if needed.
            rng = np.random.default_rng(0)
            ivf = faiss.try_extract_index_ivf(index)
            per_list = 64 * (ivf.nlist if ivf is not None else 256)
            sample = rng.choice(len(xb), size=min(len(xb), per_list), replace=False)
            try:
                index.train(np.asarray(xb[np.sort(sample)], dtype=np.float32))
            except RuntimeError as exc:
                raise IndexStoreError(
                    f"cannot train FAISS index {factory!r} on {len(xb)} vectors: {exc}"
                ) from exc
        for lo in range(0, len(xb), _CHUNK):
            index.add_with_ids(_as_f32(xb[lo : lo + _CHUNK], self.dim), ids[lo : lo + _CHUNK])
        self._index = index
        self._trained_on = len(xb) if factory is not None else 0
        self._changed()

    def rebuild_from(self, embeddings: np.ndarray, ids: np.ndarray) -> None:
        """Replace the contents with `embeddings` (n, dim; any float dtype) under `ids`."""
        ids = _as_ids(ids)
        if embeddings.ndim != 2 or embeddings.shape != (len(ids), self.dim):
            raise ValueError(
                f"expected embeddings of shape ({len(ids)}, {self.dim}), got {embeddings.shape}"
            )
        if len(np.unique(ids)) != len(ids):
            raise ValueError("ids must be unique")
        self._build(self._target_factory(len(ids)), embeddings, ids)

    def _changed(self) -> None:
        self._sorted_ids = None
        self._gpu = None

    # -- properties ---------------------------------------------------------------------

    @property
    def ntotal(self) -> int:
        return int(self._index.ntotal)

    @property
    def is_approximate(self) -> bool:
        return not self._is_exact(self._index)

    @property
    def description(self) -> str:
        """What the index is now, as a factory-like string (``Flat``, ``IVF894,Flat``, ...)."""
        if not self.is_approximate:
            return "Flat"
        ivf = faiss.try_extract_index_ivf(self._index)
        if self.factory is None and ivf is not None:
            return f"IVF{ivf.nlist},Flat"
        return str(self.factory)

    def ids(self) -> np.ndarray:
        """Every id in the index (int64, unordered)."""
        ivf = faiss.try_extract_index_ivf(self._index)
        if ivf is None:
            return faiss.vector_to_array(self._index.id_map).astype(np.int64)
        parts = []
        invlists = ivf.invlists
        for list_no in range(ivf.nlist):
            size = invlists.list_size(list_no)
            if size:
                ptr = invlists.get_ids(list_no)
                parts.append(faiss.rev_swig_ptr(ptr, size).copy())
                invlists.release_ids(list_no, ptr)
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)

    def _all_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        ids = self.ids()
        xb = np.zeros((len(ids), self.dim), np.float32)
        for lo in range(0, len(ids), _CHUNK):
            xb[lo : lo + _CHUNK] = self._index.reconstruct_batch(ids[lo : lo + _CHUNK])
        return xb, ids

    # -- updates ------------------------------------------------------------------------

    def add(self, xb: np.ndarray, ids: Any) -> None:
        """Add vectors under new ids (the caller guarantees the ids are not present)."""
        xb, ids = _as_f32(xb, self.dim), _as_ids(ids)
        if len(xb) != len(ids):
            raise ValueError(f"{len(xb)} vectors but {len(ids)} ids")
        if len(ids) == 0:
            return
        n = self.ntotal + len(ids)
        target = self._target_factory(n)
        switch = target is not None and not self.is_approximate
        retrain = self.factory is None and self._trained_on and n >= 4 * self._trained_on
        if switch or retrain:
            # Crossing the threshold (or outgrowing nlist): rebuild from every vector.
            old_xb, old_ids = self._all_vectors()
            self._build(target, np.concatenate([old_xb, xb]), np.concatenate([old_ids, ids]))
            return
        self._index.add_with_ids(xb, ids)
        self._changed()

    def remove_ids(self, ids: Any) -> int:
        """Remove `ids` (absent ones are ignored); returns how many were removed."""
        ids = _as_ids(ids)
        if len(ids) == 0 or self.ntotal == 0:
            return 0
        # An IVF with a hashtable direct map removes only with (and fast with) an
        # IDSelectorArray; elsewhere Array would be O(ntotal * len(ids)), Batch is hashed.
        ivf = faiss.try_extract_index_ivf(self._index)
        sel = faiss.IDSelectorArray(ids) if ivf is not None else faiss.IDSelectorBatch(ids)
        try:
            removed = int(self._index.remove_ids(sel))
        except RuntimeError:
            # Kinds without removal (HNSW): rebuild from the vectors that stay.
            xb, kept = self._all_vectors()
            keep = ~np.isin(kept, ids)
            removed = int((~keep).sum())
            self._build(self._target_factory(int(keep.sum())), xb[keep], kept[keep])
        self._changed()
        return removed

    # -- search -------------------------------------------------------------------------

    def _params(self, k: int, sel: Any = None, nprobe: int | None = None) -> Any:
        kw: dict[str, Any] = {} if sel is None else {"sel": sel}
        ivf = faiss.try_extract_index_ivf(self._index)
        if ivf is not None:
            return faiss.SearchParametersIVF(nprobe=nprobe or self._nprobe(ivf), **kw)
        inner = self._inner(self._index)
        if isinstance(inner, faiss.IndexHNSW):
            # FAISS's default (16) gave recall@10 ~0.75 on clustered data; 128 gave 0.99+.
            ef = self.ef_search or max(128, 2 * k)
            return faiss.SearchParametersHNSW(efSearch=ef, **kw)
        return faiss.SearchParameters(**kw) if kw else None

    def _nprobe(self, ivf: Any) -> int:
        return max(1, min(ivf.nlist, self.nprobe or ivf.nlist // 8))

    def search(
        self, xq: np.ndarray, k: int, allowed_ids: Any = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k inner products: D (nq, k) float32, I (nq, k) int64 ids, -1 where none.

        With `allowed_ids`, only those ids can come back, and k of them do whenever the
        index holds at least k of them.
        """
        xq = _as_f32(np.atleast_2d(xq), self.dim)
        if k <= 0:
            raise ValueError(f"k must be positive, got {k}")
        faiss.cvar.distance_compute_blas_threshold = BLAS_THRESHOLD
        if allowed_ids is None:
            gpu = self._gpu_index()
            if gpu is not None:
                return gpu.search(xq, k)
            return self._index.search(xq, k, params=self._params(k))
        allowed = np.unique(_as_ids(allowed_ids))
        if not self.is_approximate:
            sel = faiss.IDSelectorBatch(allowed)
            return self._index.search(xq, k, params=self._params(k, sel))
        present = self._present(allowed)
        if len(present) <= self.exact_filter_limit:
            return self._search_subset(xq, k, present)
        sel = faiss.IDSelectorBatch(present)
        nprobe = None
        ivf = faiss.try_extract_index_ivf(self._index)
        if ivf is not None:  # probe enough lists to expect ~4k allowed hits
            nprobe = max(self._nprobe(ivf), math.ceil(ivf.nlist * 4 * k / len(present)))
            nprobe = min(nprobe, ivf.nlist)
        D, I = self._index.search(xq, k, params=self._params(k, sel, nprobe))
        short = (I == -1).any(axis=1)
        if short.any():
            D[short], I[short] = self._search_subset(xq[short], k, present)
        return D, I

    def _present(self, allowed: np.ndarray) -> np.ndarray:
        if self._sorted_ids is None:
            self._sorted_ids = np.sort(self.ids())
        pos = np.searchsorted(self._sorted_ids, allowed)
        pos[pos == len(self._sorted_ids)] = 0
        return allowed[self._sorted_ids[pos] == allowed] if len(self._sorted_ids) else allowed[:0]

    def _search_subset(
        self, xq: np.ndarray, k: int, ids: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact search over the vectors of `ids` (all present in the index)."""
        D = np.full((len(xq), k), -np.finfo(np.float32).max, np.float32)
        I = np.full((len(xq), k), -1, np.int64)
        if len(ids) == 0:
            return D, I
        xb = self._index.reconstruct_batch(ids)
        kk = min(k, len(ids))
        d_sub, i_sub = faiss.knn(xq, xb, kk, metric=faiss.METRIC_INNER_PRODUCT)
        D[:, :kk], I[:, :kk] = d_sub, ids[i_sub]
        return D, I

    def _gpu_index(self) -> Any:
        if self._gpu is None:
            self._gpu = False
            if faiss.get_num_gpus() > 0 and hasattr(faiss, "index_cpu_to_gpu") and self.ntotal:
                try:
                    self._gpu_res = self._gpu_res or faiss.StandardGpuResources()
                    gpu = faiss.index_cpu_to_gpu(self._gpu_res, 0, self._index)
                    ivf = faiss.try_extract_index_ivf(self._index)
                    if ivf is not None:
                        space = faiss.GpuParameterSpace()
                        space.set_index_parameter(gpu, "nprobe", self._nprobe(ivf))
                    self._gpu = gpu
                except (RuntimeError, AttributeError):
                    pass  # this kind of index has no GPU version: stay on the CPU
        return self._gpu or None

    def set_search_params(self, *, nprobe: int | None = None, ef_search: int | None = None) -> None:
        """Speed/recall knobs: IVF lists probed, HNSW candidate list size (None = default)."""
        self.nprobe, self.ef_search = nprobe, ef_search
        self._gpu = None

    # -- files --------------------------------------------------------------------------

    def fetched_states(self, ids: np.ndarray) -> np.ndarray | None:
        """Rerank states that came back with the last hits: FAISS keeps none (the row store
        serves them); a Milvus collection returns them with its hits."""
        return None

    def close(self) -> None:
        """Nothing to let go of in process (a Milvus collection closes its connection)."""

    def save(self, path: str | Path) -> None:
        """Write the index and `self.meta` to `path` atomically (tmp file, fsync, rename)."""
        header = {"dim": self.dim, "factory": self.factory, "approx_threshold": self.approx_threshold,
                  "trained_on": self._trained_on, "meta": self.meta}
        write_index_file(Path(path), header, self._index)

    @classmethod
    def load(cls, path: str | Path) -> VectorIndex:
        """Read an index written by `save`; IndexStoreError if it is missing or damaged."""
        header, index = read_index_file(Path(path))
        self = cls(header["dim"], factory=header["factory"], approx_threshold=header["approx_threshold"])
        self._index = index
        self._trained_on = header["trained_on"]
        self.meta = header["meta"]
        return self
