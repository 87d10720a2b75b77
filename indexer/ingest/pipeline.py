"""Folder -> index: scan and plan (new / changed / unchanged / removed), then a producer
decodes and encodes (in local worker processes, or on Ray actors) and the one writer stores
each video as one atomic unit (with a thumbnail per segment, from the decoded frames; segments
indexed without one get it on the next run).

Running it again picks up only what changed. Killing it at any moment loses at most the
videos not yet written; the index stays consistent (the protocol in indexer/store/__init__.py).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

from indexer.encoding import ModelRunner
from indexer.errors import IndexStoreError
from indexer.ingest.local_producer import local_encoded, missing_thumbnails
from indexer.ingest.options import IndexOptions, IndexProgress, IndexSummary
from indexer.ingest.planning import plan
from indexer.ingest.produced import Produced
from indexer.ingest.writer import RunWriter
from indexer.store.index_store import IndexStore
from indexer.store.records import SegmentInfo
from indexer.store.vectors.choice import parse_vectors
from pvl_search.media.decode_pool import DecodePool

__all__ = ["IndexOptions", "IndexProgress", "IndexSummary", "build_index", "rebuild_vectors"]


def build_index(
    paths: Sequence[str | os.PathLike[str]],
    store: IndexStore,
    runner: ModelRunner,
    options: IndexOptions | None = None,
    *,
    progress: Callable[[IndexProgress], None] | None = None,
) -> IndexSummary:
    """Bring the index in line with the files under `paths`; see the module doc."""
    began = time.perf_counter()
    asked = options or IndexOptions()
    _check_vectors_option(store, asked.vectors, asked.faiss_factory)
    options = _continue_reindex(store, asked)
    writer = RunWriter(store, progress)
    options = writer.prepare(runner, options)
    planned = plan(paths, store, retry_failed=options.retry_failed, reindex=options.reindex)
    missing = writer.start(planned, runner.dtype_name)
    redo = {str(path) for path, _, _ in planned.todo}
    backfill = _by_video(missing, redo) if options.thumbnails else {}
    writer.expect(len(planned.todo) + len(planned.bad) + len(backfill))
    # On CPU the decoder workers need cores too: torch threads beyond the rest spin on
    # OpenMP barriers while a decoder holds the core (measured 7x slower on 2 cores).
    threads = torch.get_num_threads()
    if runner.device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) - options.workers))
    try:
        with DecodePool(options.workers, options.timeout_s, options.backend) as pool:
            for item in _produced(pool, planned.todo, runner, options):
                writer.write(item, options)
            writer.save()  # the new videos are safe before the thumbnail pass
            for path, ids, images in missing_thumbnails(pool, backfill, runner.config):
                writer.write_thumbnails(path, ids, images)
        writer.finish()
    finally:
        torch.set_num_threads(threads)
        writer.save()
    summary = writer.summary
    summary.seconds = time.perf_counter() - began
    summary.continued_reindex = options.reindex and not asked.reindex
    return summary


def _produced(pool: DecodePool, todo: list, runner: ModelRunner, options: IndexOptions) -> Iterator[Produced]:
    """The planned files, encoded here or on Ray (this process stays the one writer)."""
    if options.ray is None:
        return local_encoded(pool, todo, runner, options)
    from indexer.ingest.ray_producer import ray_encoded

    return ray_encoded(todo, runner, options)


def _by_video(segments: list[SegmentInfo], skip: set[str]) -> dict[str, list[SegmentInfo]]:
    """Segments grouped by their video's path, in time order, leaving out paths in `skip`."""
    grouped: dict[str, list[SegmentInfo]] = {}
    for seg in segments:
        if seg.path not in skip:
            grouped.setdefault(seg.path, []).append(seg)
    return {path: sorted(segs, key=lambda s: s.start_s) for path, segs in grouped.items()}


def _continue_reindex(store: IndexStore, options: IndexOptions) -> IndexOptions:
    """A `--reindex` that was interrupted goes on by itself, to the windows it recorded: until it
    is done some videos may still be cut the old way."""
    if options.reindex or not store.reindex_pending() or (options.window_s, options.stride_s) != (None, None):
        return options
    windows = store.windows()
    assert windows is not None  # a pending re-cut always records its windows
    return dataclasses.replace(options, reindex=True, window_s=windows.window_s, stride_s=windows.stride_s)


def _check_vectors_option(store: IndexStore, option: str | None, factory: str | None = None) -> None:
    """An index run does not move an index's vectors (that is `rebuild_vectors`) nor change its
    FAISS factory (chosen when the index is made): another `--vectors` or `--faiss-factory`
    than the index records is refused rather than ignored."""
    current = store.layout
    if current is None:
        return
    if factory is not None and factory != current.faiss_factory:
        raise IndexStoreError(
            f"index {store.directory} uses the FAISS factory "
            f"{current.faiss_factory or 'chosen by size (exact, then IVF)'}; --faiss-factory applies when an "
            f"index is made: index into a new folder to use {factory}"
        )
    if option is None:
        return
    wanted = parse_vectors(option)
    if wanted != current.vectors:
        raise IndexStoreError(
            f"index {store.directory} keeps its vectors in {current.vectors or 'faiss'}; to move them to "
            f"{wanted or 'faiss'} run `pvl-search index --index {store.directory} --rebuild --vectors {option}` first"
        )


def rebuild_vectors(index_dir: str | Path, db_url: str | None = None, vectors: str | None = None) -> int:
    """Recreate the FAISS index (or the Milvus collection) from the stored embeddings alone;
    returns its size. `vectors` ("faiss", "milvus:URI") moves the index to that store: built
    there first, then recorded; a move that fails leaves the index on its old store.

    The writer lock comes first: while another process writes the index this refuses
    (IndexLockedError) and touches nothing."""
    if not (Path(index_dir).is_dir()):
        raise IndexStoreError(f"no index at {index_dir}")
    with IndexStore(index_dir, db_url) as store:
        layout = store.layout
        if vectors is not None and layout is None:
            raise IndexStoreError(f"index {index_dir} has no model set: index some videos first")
        if vectors is None or parse_vectors(vectors) == layout.vectors:
            return store.rebuild_vectors()
        config, fingerprint = store.model()
        store.set_model(config, fingerprint, dataclasses.replace(layout, vectors=parse_vectors(vectors)))
        return store.vectors.ntotal  # just built there from the stored embeddings
