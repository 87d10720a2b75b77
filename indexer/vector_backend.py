"""Which vector store an index uses, from what the index records (``index_info.vector_store``):
None is the FAISS file in the index folder, ``milvus:URI[#INDEX_TYPE]`` a Milvus collection.

The choice is made once, at index time (`pvl-search index --vectors milvus:URI`), and is
stored in SQL beside the model and the FAISS factory, so that `search`, `serve`, `eval` and
`status` follow it without being told. Changing it on an index rebuilds the vectors in the
new store from the stored embeddings (they are derived data).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from indexer.errors import IndexStoreError
from indexer.vector_index import VectorIndex

if TYPE_CHECKING:
    from indexer.index_store import IndexStore
    from indexer.store_base import StoreBase
    from indexer.store_records import IndexLayout

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


def _milvus_parts(spec: str) -> tuple[str, str]:
    uri, _, index_type = spec[len(MILVUS):].partition("#")
    return uri, index_type or "FLAT"


def vectors_path(directory: Path, layout: IndexLayout) -> Path:
    """The file in the index folder that records the vectors (FAISS itself, or Milvus' meta)."""
    from indexer.store_records import FAISS_FILE

    return directory / (MILVUS_META_FILE if layout.vectors else FAISS_FILE)


def _milvus(store: StoreBase, layout: IndexLayout) -> Any:
    from indexer.milvus_vectors import MilvusVectors, collection_name

    require_cluster_extra("--vectors milvus:", "pymilvus")
    uri, index_type = _milvus_parts(layout.vectors)
    # The row store, not IndexStore.rerank_states: rows are read while `committed_rows` moves.
    return MilvusVectors(layout.embedding_dim, layout.rerank_width, uri, collection_name(store._uuid),
                         lambda ids: store.rerank_store.get(np.asarray(ids, np.int64)),
                         index_type=index_type, read_only=store.read_only)


def new_vectors(store: StoreBase, layout: IndexLayout) -> Any:
    """An empty vector store for `layout` (FAISS in memory, or the Milvus collection)."""
    if store.vectors is not None:
        store.vectors.close()  # replaced by a rebuild: its Milvus connection is let go
    if not layout.vectors:
        return VectorIndex(layout.embedding_dim, factory=layout.faiss_factory,
                           approx_threshold=store.approx_threshold, **store._search_params)
    return _milvus(store, layout)


def load_vectors(store: StoreBase, layout: IndexLayout) -> tuple[Any, dict[str, Any]] | None:
    """(the saved vectors, their meta) for a Milvus index; None means rebuild. FAISS files
    are loaded by the store itself (its original code path)."""
    from indexer.milvus_vectors import MilvusVectors

    header = MilvusVectors.read_meta(vectors_path(store.directory, layout))
    if header is None or header.get("dim") != layout.embedding_dim:
        return None
    uri, index_type = _milvus_parts(layout.vectors)
    if (header.get("uri"), header.get("index_type")) != (uri, index_type):
        return None
    vectors = _milvus(store, layout)
    meta = header.get("meta", {})
    if not vectors.exists():
        vectors.close()
        return None
    rows = int(meta.get("rows", -1))
    if rows < 0 or meta.get("index_uuid") != store._uuid:
        vectors.close()
        return None
    if store.read_only:
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


def switch_vectors(store: IndexStore, option: str) -> None:
    """Writer: make the index record `option` as its vector store (rebuilt there when it
    changes; nothing happens when it does not)."""
    layout = store.layout
    if layout is None:
        raise IndexStoreError(f"index {store.directory} has no model set: index some videos first")
    wanted = parse_vectors(option)
    if wanted != layout.vectors:
        config, fingerprint = store.model()
        store.set_model(config, fingerprint, dataclasses.replace(layout, vectors=wanted))
