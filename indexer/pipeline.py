"""Folder -> index: scan, classify (new / changed / unchanged / removed), decode in worker
processes, encode in batches, and write each video as one atomic unit (with a thumbnail per
segment, from the decoded frames; segments indexed without one get it on the next run).

Running it again picks up only what changed. Killing it at any moment loses at most the
videos not yet written; the index stays consistent (see indexer.index_store).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from indexer.encoding import EncodedClips, ModelRunner
from indexer.errors import IndexStoreError
from indexer.index_store import IndexStore
from indexer.paths import shown
from indexer.planning import Plan, plan
from indexer.ray_indexing import RayOptions, RemoteVideo
from indexer.store_records import IndexLayout, SegmentInfo, VideoMeta
from indexer.vector_backend import resolve_vectors, switch_vectors
from pvl_search.media.backends import Backend
from pvl_search.media.decode_pool import DecodedVideo, DecodePool
from pvl_search.media.thumbnails import clip_thumbnail
from pvl_search.media.video import VideoDecodeError, Windows
from pvl_search.model.config import ModelConfig


@dataclass(kw_only=True)
class IndexOptions:
    window_s: float = 10.0  # segment length; shorter videos are one segment
    stride_s: float = 5.0  # at most this far between segment starts
    batch_size: int = 8  # clips per encoder call
    workers: int = 2  # decoder processes
    timeout_s: float = 60.0  # a decoder making no progress this long is killed
    backend: Backend = "auto"
    # Keep the full N x D latents per segment; None: when the model has a latent reranker
    # (which reads them at search time), or as an existing index already does.
    store_latents: bool | None = None
    faiss_factory: str | None = None  # None: exact, switching to IVF past a size threshold
    retry_failed: bool = False  # try files that failed before even if they did not change
    save_every: int = 200  # videos between FAISS saves (it is derived: only restart cost)
    thumbnails: bool = True  # a small JPEG per segment, from the frames the encoder decoded
    vectors: str | None = None  # "faiss" or "milvus:URI"; None: what the index records (indexer/vector_backend.py)
    ray: RayOptions | None = None  # decode + encode on a Ray cluster (indexer/ray_indexing.py)


@dataclass
class IndexProgress:
    done: int  # videos finished (indexed or failed) in this run
    total: int  # videos to process in this run
    segments: int  # segments written so far
    path: str  # the video just finished


@dataclass
class IndexSummary:
    scanned: int = 0
    indexed: int = 0
    unchanged: int = 0
    removed: int = 0
    segments: int = 0
    failed: dict[str, str] = field(default_factory=dict)  # path (as shown) -> reason
    seconds: float = 0.0
    thumbnails_added: int = 0  # thumbnails made for segments indexed without them
    dtype: str = "float32"  # what the model ran in (indexer/precision.py)

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass
class _Pending:
    """A decoded video whose clips are being encoded."""

    path: str
    stat: os.stat_result
    fingerprint: str
    decoded: DecodedVideo
    parts: list[EncodedClips] = field(default_factory=list)
    encoded: int = 0


def _prepare_store(store: IndexStore, runner: ModelRunner, options: IndexOptions) -> IndexOptions:
    """Record the model and layout on a new index, or check them on an existing one; returns
    the options with `store_latents` resolved (the workers need it)."""
    config = runner.config
    keep_latents = options.store_latents
    if keep_latents is None:
        keep_latents = config.latent_reranker if store.layout is None else store.layout.keeps_latents
        options = dataclasses.replace(options, store_latents=keep_latents)
    layout = IndexLayout(
        config.embed_dim,
        config.rerank_state_width,
        (config.latents, config.hidden) if keep_latents else None,
        options.faiss_factory,
        resolve_vectors(options.vectors, store.layout),
    )
    if store.layout is None:
        store.set_model(config.to_json(), runner.fingerprint, layout)
    else:
        store.check_model(config.to_json(), runner.fingerprint)
        if store.layout.keeps_latents != keep_latents:
            keeps = "keeps" if store.layout.keeps_latents else "does not keep"
            raise IndexStoreError(f"index {store.directory} {keeps} latents; "
                                  f"{'add' if store.layout.keeps_latents else 'drop'} --store-latents")
    return options


def _record_removed_and_bad(store: IndexStore, planned: Plan) -> IndexSummary:
    """Files gone from disk are marked removed, unreadable entries failed; the run's summary."""
    summary = IndexSummary(scanned=planned.scanned, unchanged=planned.unchanged)
    for path in planned.gone:
        store.mark_removed(path)
        summary.removed += 1
    for entry in planned.bad:
        store.mark_failed(str(entry.path), entry.reason, entry.stat)
        summary.failed[shown(entry.path)] = entry.reason
    return summary


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
    config = runner.config
    options = _prepare_store(store, runner, options or IndexOptions())
    planned = plan(paths, store, retry_failed=options.retry_failed)
    todo = planned.todo
    summary = _record_removed_and_bad(store, planned)
    # Before anything is added: row ids of an add a crash cut short are reused, so their
    # leftover thumbnails must go first. Changed files get new segments (and thumbnails).
    missing = store.sync_thumbnails()
    redo = {str(path) for path, _, _ in todo}
    backfill = _by_video(missing, redo) if options.thumbnails else {}
    windows = Windows(options.window_s, options.stride_s)
    backfilled = 0  # videos whose missing thumbnails were made in this run

    def report(path: str) -> None:
        if progress:
            done = summary.indexed + len(summary.failed) + backfilled
            progress(IndexProgress(done, len(todo) + len(planned.bad) + len(backfill), summary.segments, path))

    jobs = ((i, str(path), windows, config.frames, config.frame_size) for i, (path, _, _) in enumerate(todo))
    # On CPU the decoder workers need cores too: torch threads beyond the rest spin on
    # OpenMP barriers while a decoder holds the core (measured 7x slower on 2 cores).
    summary.dtype = runner.dtype_name
    if todo:  # recorded before the first segment of this dtype is committed
        store.record_dtype(runner.dtype_name)
    threads = torch.get_num_threads()
    if runner.device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) - options.workers))
    try:
        with DecodePool(options.workers, options.timeout_s, options.backend) as pool:
            written = 0
            if options.ray is None:
                videos = _encode_batches(_decoded(pool.imap(jobs), todo, store, summary, report), runner, options)
            else:  # decoded and encoded by Ray actors; this process stays the one writer
                from indexer.ray_indexing import ray_encoded

                videos = ray_encoded(todo, runner, options, store, summary, report)
            for video in videos:
                _write(video, store, options)
                summary.indexed += 1
                summary.segments += sum(len(part.embeddings) for part in video.parts)
                written += 1
                if written % options.save_every == 0:
                    store.save_faiss()
                report(video.path)
            store.save_faiss()  # the new videos are safe before the thumbnail pass
            for path in _add_thumbnails(pool, backfill, store, config, summary):
                backfilled += 1
                report(path)
    finally:
        torch.set_num_threads(threads)
        store.save_faiss()
    summary.seconds = time.perf_counter() - began
    return summary


def _by_video(segments: list[SegmentInfo], skip: set[str]) -> dict[str, list[SegmentInfo]]:
    """Segments grouped by their video's path, in time order, leaving out paths in `skip`."""
    grouped: dict[str, list[SegmentInfo]] = {}
    for seg in segments:
        if seg.path not in skip:
            grouped.setdefault(seg.path, []).append(seg)
    return {path: sorted(segs, key=lambda s: s.start_s) for path, segs in grouped.items()}


def _add_thumbnails(
    pool: DecodePool,
    missing: dict[str, list[SegmentInfo]],
    store: IndexStore,
    config: ModelConfig,
    summary: IndexSummary,
) -> Iterator[str]:
    """Decode the segments that have no thumbnail (the same frames indexing took) and write
    theirs; yields each video's path when done. A file that cannot be decoded any more keeps
    its segments, without thumbnails (the next run tries again)."""

    def spans(segs: list[SegmentInfo]) -> list[tuple[float, float]] | None:
        if len(segs) == 1 and segs[0].end_s <= segs[0].start_s:
            return None  # an image, or a video without a duration: decoded whole
        return [(seg.start_s, seg.end_s) for seg in segs]

    jobs = ((path, path, spans(segs), config.frames, config.frame_size) for path, segs in missing.items())
    for path, result in pool.imap(jobs):
        if not isinstance(result, VideoDecodeError) and len(result.clips) == len(missing[path]):
            images = [clip_thumbnail(clip.frames, clip.mask) for clip in result.clips]
            summary.thumbnails_added += store.thumbnails.write([seg.id for seg in missing[path]], images)
        yield path


def _decoded(
    results: Iterator,
    todo: list[tuple[Path, os.stat_result, str]],
    store: IndexStore,
    summary: IndexSummary,
    report: Callable[[str], None],
) -> Iterator[_Pending]:
    """Decoded videos in order; failures are recorded in the index and the summary."""
    for key, result in results:
        path, stat, fingerprint = todo[key]
        if isinstance(result, VideoDecodeError):
            store.mark_failed(str(path), result.reason, stat, fingerprint)
            summary.failed[shown(path)] = result.reason
            report(str(path))
            continue
        yield _Pending(str(path), stat, fingerprint, result)


def _encode_batches(videos: Iterator[_Pending], runner: ModelRunner, options: IndexOptions) -> Iterator[_Pending]:
    """Encode clips in batches that may span several videos; yield each video once all of
    its clips are encoded, in order."""
    waiting: list[_Pending] = []
    queue: list[tuple[_Pending, int]] = []  # (video, clip index) not yet encoded

    def run_batch() -> None:
        batch, queue[:] = queue[: options.batch_size], queue[options.batch_size :]
        frames = np.stack([v.decoded.clips[i].frames for v, i in batch])
        masks = np.stack([v.decoded.clips[i].mask for v, i in batch])
        encoded = runner.encode_clips(frames, masks, keep_latents=bool(options.store_latents))
        for row, (video, _) in enumerate(batch):
            video.parts.append(_rows(encoded, row))
            video.encoded += 1

    def finished() -> Iterator[_Pending]:
        while waiting and waiting[0].encoded == len(waiting[0].decoded.clips):
            yield waiting.pop(0)

    for video in videos:
        waiting.append(video)
        queue.extend((video, i) for i in range(len(video.decoded.clips)))
        while len(queue) >= options.batch_size:
            run_batch()
        yield from finished()
    while queue:
        run_batch()
    yield from finished()


def _rows(encoded: EncodedClips, row: int) -> EncodedClips:
    latents = None if encoded.latents is None else encoded.latents[row : row + 1]
    return EncodedClips(encoded.embeddings[row : row + 1], encoded.rerank_states[row : row + 1], latents)


def _write(video: _Pending, store: IndexStore, options: IndexOptions) -> None:
    decoded = video.decoded
    info = decoded.info
    spans = decoded.spans or [(0.0, float(info.duration or 0.0) if info else 0.0)]
    latents = np.concatenate([p.latents for p in video.parts]) if options.store_latents else None
    store.add_video(
        video.path,
        video.stat,
        video.fingerprint,
        VideoMeta(info.duration, info.fps, info.width, info.height) if info else VideoMeta(),
        spans,
        np.concatenate([p.embeddings for p in video.parts]),
        np.concatenate([p.rerank_states for p in video.parts]),
        latents,
        thumbnails=_thumbnails(decoded) if options.thumbnails else None,
    )


def _thumbnails(decoded: DecodedVideo | RemoteVideo) -> list[bytes | None]:
    if isinstance(decoded, DecodedVideo):
        return [clip_thumbnail(clip.frames, clip.mask) for clip in decoded.clips]
    return decoded.thumbnails  # a Ray worker made them beside the frames (RemoteVideo)


def rebuild_vectors(index_dir: str | Path, db_url: str | None = None, vectors: str | None = None) -> int:
    """Recreate the FAISS index (or the Milvus collection) from the stored embeddings alone;
    returns its size. `vectors` ("faiss", "milvus:URI") moves the index to that store first.

    The writer lock comes first: while another process writes the index this refuses
    (IndexLockedError) and touches nothing."""
    if not (Path(index_dir).is_dir()):
        raise IndexStoreError(f"no index at {index_dir}")
    with IndexStore(index_dir, db_url) as store:
        if vectors is not None:
            switch_vectors(store, vectors)
        return store.rebuild_vectors()
