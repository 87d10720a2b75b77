"""Which vector store an index uses, from what the index records (``index_info.vector_store``):
None is the FAISS file in the index folder, ``milvus:URI[#INDEX_TYPE]`` a Milvus collection.

The choice is made once, at index time (`pvl-search index --vectors milvus:URI`), and is
stored in SQL beside the model and the FAISS factory, so that `search`, `serve`, `eval` and
`status` follow it without being told. Changing it on an index (`--rebuild --vectors`) builds the
vectors in the new store from the stored embeddings (they are derived data) and records the new
store only once it holds them all: a move that fails leaves the index on its old store.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from indexer.errors import IndexStoreError
from indexer.store.records import FAISS_FILE, IndexLayout
from indexer.store.vectors.faiss_index import VectorIndex

MILVUS = "milvus:"
MILVUS_META_FILE = "vectors.milvus.json"  # what the collection reflects (rows, removal_seq)
MILVUS_INDEX_TYPES = ("FLAT", "HNSW", "IVF_FLAT", "IVF_SQ8", "AUTOINDEX")
CLUSTER_EXTRA = "pip install 'pvl-search[cluster]'"


def require_cluster_extra(option: str, module: str) -> None:
    """Raise a one-line error naming the extra when `module` (ray, pymilvus) is missing."""
    try:
        __import__(module)
    except ImportError:
        raise IndexStoreError(f"{option} needs the cluster extra: {CLUSTER_EXTRA}") from None


def parse_vectors(spec: str | None) -> str | None:
    """`--vectors` as the index records it: None or "faiss" -> None (the FAISS file);
    ``milvus:PATH.db`` with PATH made absolute (every process finds the same file);
    ``milvus:http(s)://HOST:PORT`` as given. ``#INDEX_TYPE`` (default FLAT: exact, what
    FAISS Flat gives) picks Milvus' index."""
    if spec is None or spec.strip().lower() in ("", "faiss"):
        return None
    if not spec.startswith(MILVUS):
        raise ValueError(f"--vectors must be faiss or milvus:URI, not {spec!r}")
    uri, _, index_type = spec[len(MILVUS):].partition("#")
    index_type = (index_type or "FLAT").upper()
    if index_type not in MILVUS_INDEX_TYPES:
        raise ValueError(f"--vectors {spec!r}: Milvus index type must be one of {', '.join(MILVUS_INDEX_TYPES)}")
    remote = uri.startswith(("http://", "https://", "tcp://", "grpc://"))
    if not remote and uri.endswith(".db"):
        uri = str(Path(uri).expanduser().absolute())
    elif not remote:
        raise ValueError(f"--vectors {spec!r}: the URI must be a Milvus Lite file ending in .db or http://HOST:PORT")
    require_cluster_extra("--vectors milvus:", "pymilvus")
    return f"{MILVUS}{uri}" + ("" if index_type == "FLAT" else f"#{index_type}")


@dataclass(frozen=True)
class VectorSettings:
    """What an open index tells its vector store: whose vectors they are, FAISS's search
    settings, whether it may write, and how to read rerank-state rows (Milvus keeps them too)."""

    index_uuid: str
    read_only: bool
    rerank_rows: Callable[[np.ndarray], np.ndarray]  # store row ids -> (K, D + H)
    approx_threshold: int
    search_params: dict[str, int | None] = field(default_factory=dict)  # nprobe, ef_search


def _milvus_parts(spec: str) -> tuple[str, str]:
    uri, _, index_type = spec[len(MILVUS):].partition("#")
    return uri, index_type or "FLAT"


def vectors_path(directory: Path, layout: IndexLayout) -> Path:
    """The file in the index folder that records the vectors (FAISS itself, or Milvus' meta)."""
    return directory / (MILVUS_META_FILE if layout.vectors else FAISS_FILE)


def _milvus(settings: VectorSettings, layout: IndexLayout) -> Any:
    from indexer.store.vectors.milvus import MilvusVectors, collection_name

    require_cluster_extra("--vectors milvus:", "pymilvus")
    uri, index_type = _milvus_parts(layout.vectors)
    return MilvusVectors(layout.embedding_dim, layout.rerank_width, uri, collection_name(settings.index_uuid),
                         settings.rerank_rows, index_type=index_type, read_only=settings.read_only)


def new_vectors(settings: VectorSettings, layout: IndexLayout) -> Any:
    """An empty vector store for `layout` (FAISS in memory, or the Milvus collection)."""
    if not layout.vectors:
        return VectorIndex(layout.embedding_dim, factory=layout.faiss_factory,
                           approx_threshold=settings.approx_threshold, **settings.search_params)
    return _milvus(settings, layout)


def build_saved_vectors(directory: Path, settings: VectorSettings, layout: IndexLayout, embeddings: np.ndarray,
                        ids: np.ndarray, meta: dict[str, Any]) -> Any:
    """A new vector store for `layout` holding `embeddings` under `ids`, saved in `directory`
    with `meta`: the store an index moves to. On any failure it is closed and the error raised;
    the caller records the move only after this returned (the old store is untouched, unless
    both are one Milvus collection: see `shares_collection`)."""
    vectors = new_vectors(settings, layout)
    try:
        vectors.rebuild_from(embeddings, ids)
        vectors.meta = meta
        vectors.save(vectors_path(directory, layout))
    except BaseException:
        vectors.close()
        raise
    return vectors


def shares_collection(a: IndexLayout, b: IndexLayout) -> bool:
    """Whether both layouts keep their vectors in the same Milvus collection (another index
    type at the same URI): building one replaces the other's contents."""
    return bool(a.vectors and b.vectors) and _milvus_parts(a.vectors)[0] == _milvus_parts(b.vectors)[0]


def load_saved_vectors(directory: Path, settings: VectorSettings, layout: IndexLayout
                       ) -> tuple[Any, dict[str, Any]] | None:
    """(the saved vectors, their meta: rows and removal_seq they reflect) when they belong
    to this index and layout; None means rebuild them (they are derived)."""
    if not layout.vectors:
        return _load_faiss(directory, settings, layout)
    return _load_milvus(directory, settings, layout)


def _load_faiss(directory: Path, settings: VectorSettings, layout: IndexLayout) -> tuple[Any, dict[str, Any]] | None:
    path = directory / FAISS_FILE
    if not path.exists():
        return None
    try:
        vectors = VectorIndex.load(path)
    except IndexStoreError:
        return None
    meta = vectors.meta
    if (
        meta.get("index_uuid") != settings.index_uuid
        or meta.get("factory") != layout.faiss_factory
        or vectors.dim != layout.embedding_dim
    ):
        return None
    vectors.approx_threshold = settings.approx_threshold
    vectors.set_search_params(**settings.search_params)
    return vectors, meta


def _load_milvus(directory: Path, settings: VectorSettings, layout: IndexLayout) -> tuple[Any, dict[str, Any]] | None:
    from indexer.store.vectors.milvus import MilvusVectors

    header = MilvusVectors.read_meta(vectors_path(directory, layout))
    if header is None or header.get("dim") != layout.embedding_dim:
        return None
    uri, index_type = _milvus_parts(layout.vectors)
    if (header.get("uri"), header.get("index_type")) != (uri, index_type):
        return None
    vectors = _milvus(settings, layout)
    meta = header.get("meta", {})
    if not vectors.exists():
        vectors.close()
        return None
    rows = int(meta.get("rows", -1))
    if rows < 0 or meta.get("index_uuid") != settings.index_uuid:
        vectors.close()
        return None
    if settings.read_only:
        vectors.start_reading_at(max(rows, 0))
    else:
        vectors.truncate(rows)  # upserts after the last save: recovery adds them again
    vectors.meta = meta
    return vectors, meta


def resolve_vectors(option: str | None, current: IndexLayout | None) -> str | None:
    """The vector store an index run uses: `option` as `parse_vectors` reads it, or, when
    None, what the index records already (a new index: FAISS)."""
    if option is None:
        return current.vectors if current is not None else None
    return parse_vectors(option)
