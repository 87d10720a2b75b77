"""Folder -> index: scan, classify (new / changed / unchanged / removed), decode in worker
processes, encode in batches, and write each video as one atomic unit.

Running it again picks up only what changed. Killing it at any moment loses at most the
videos not yet written; the index stays consistent (see indexer.index_store).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from indexer.encoding import EncodedClips, ModelRunner
from indexer.errors import IndexStoreError
from indexer.index_store import FAISS_FILE, IndexLayout, IndexStore, VideoInfo, fingerprint_file
from indexer.schema import VideoStatus
from pvl_search.decode_pool import DecodedVideo, DecodePool
from pvl_search.video import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, Backend, VideoDecodeError, Windows

MEDIA_EXTENSIONS = frozenset(VIDEO_EXTENSIONS) | frozenset(IMAGE_EXTENSIONS)


@dataclass
class IndexOptions:
    window_s: float = 10.0  # segment length; shorter videos are one segment
    stride_s: float = 5.0  # at most this far between segment starts
    batch_size: int = 8  # clips per encoder call
    workers: int = 2  # decoder processes
    timeout_s: float = 60.0  # a decoder making no progress this long is killed
    backend: Backend = "auto"
    store_latents: bool = False  # keep the full N x D latents per segment
    faiss_factory: str | None = None  # None: exact, switching to IVF past a size threshold
    retry_failed: bool = False  # try files that failed before even if they did not change
    save_every: int = 200  # videos between FAISS saves (it is derived: only restart cost)


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
    failed: dict[str, str] = field(default_factory=dict)  # path -> reason
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def scan(paths: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Media files under `paths` (files or folders, recursively), absolute and sorted;
    hidden files and folders are skipped. A path that does not exist is an error."""
    found: set[Path] = set()
    for raw in paths:
        root = Path(raw).expanduser().absolute()
        if not root.exists():
            raise FileNotFoundError(f"{raw}: no such file or folder")
        if root.is_file():
            found.add(root)  # named explicitly: indexed whatever its extension says
            continue
        for folder, dirs, files in os.walk(root):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            for name in files:
                if not name.startswith(".") and Path(name).suffix.lower() in MEDIA_EXTENSIONS:
                    found.add(Path(folder) / name)
    return sorted(found)


def _under(path: str, roots: Sequence[Path]) -> bool:
    return any(path == str(r) or path.startswith(str(r) + os.sep) for r in roots)


@dataclass
class _Pending:
    """A decoded video whose clips are being encoded."""

    path: str
    stat: os.stat_result
    fingerprint: str
    decoded: DecodedVideo
    parts: list[EncodedClips] = field(default_factory=list)
    encoded: int = 0


def plan(
    paths: Sequence[str | os.PathLike[str]], store: IndexStore, options: IndexOptions
) -> tuple[list[tuple[Path, os.stat_result, str]], list[str], int, int]:
    """(to index: (path, stat, fingerprint)), known paths gone from disk, unchanged, scanned."""
    roots = [Path(p).expanduser().absolute() for p in paths]
    files = scan(paths)
    known = store.known_videos()
    todo, unchanged = [], 0
    for path in files:
        stat = path.stat()
        seen = known.get(str(path))
        if seen is not None and (seen.status != VideoStatus.FAILED.value or not options.retry_failed):
            if seen.status != VideoStatus.REMOVED.value and seen.size == stat.st_size and seen.mtime == stat.st_mtime:
                unchanged += 1  # same size and mtime: not even read
                continue
        fingerprint = fingerprint_file(path)
        if (
            seen is not None
            and seen.status == VideoStatus.INDEXED.value
            and seen.fingerprint == fingerprint
            and seen.size == stat.st_size
        ):
            unchanged += 1  # touched, not changed
            continue
        todo.append((path, stat, fingerprint))
    on_disk = {str(p) for p in files}
    gone = [
        p for p, seen in known.items()
        if seen.status != VideoStatus.REMOVED.value and _under(p, roots) and p not in on_disk and not Path(p).exists()
    ]
    return todo, gone, unchanged, len(files)


def build_index(
    paths: Sequence[str | os.PathLike[str]],
    store: IndexStore,
    runner: ModelRunner,
    options: IndexOptions | None = None,
    *,
    progress: Callable[[IndexProgress], None] | None = None,
) -> IndexSummary:
    """Bring the index in line with the files under `paths`; see the module doc."""
    options = options or IndexOptions()
    began = time.perf_counter()
    config = runner.config
    layout = IndexLayout(
        config.embed_dim,
        config.rerank_state_width,
        (config.latents, config.hidden) if options.store_latents else None,
        options.faiss_factory,
    )
    if store.layout is None:
        store.set_model(config.to_json(), runner.fingerprint, layout)
    else:
        store.check_model(config.to_json(), runner.fingerprint)
        if (store.layout.latent_shape is not None) != options.store_latents:
            keeps = "keeps" if store.layout.latent_shape is not None else "does not keep"
            raise IndexStoreError(f"index {store.directory} {keeps} latents; "
                                  f"{'drop' if store.layout.latent_shape is None else 'add'} --store-latents")
    todo, gone, unchanged, scanned = plan(paths, store, options)
    summary = IndexSummary(scanned=scanned, unchanged=unchanged)
    for path in gone:
        store.mark_removed(path)
        summary.removed += 1
    windows = Windows(options.window_s, options.stride_s)

    def report(path: str) -> None:
        if progress:
            progress(IndexProgress(summary.indexed + len(summary.failed), len(todo), summary.segments, path))

    jobs = ((i, str(path), windows, config.frames, config.frame_size) for i, (path, _, _) in enumerate(todo))
    # On CPU the decoder workers need cores too: torch threads beyond the rest spin on
    # OpenMP barriers while a decoder holds the core (measured 7x slower on 2 cores).
    threads = torch.get_num_threads()
    if runner.device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) - options.workers))
    try:
        with DecodePool(options.workers, options.timeout_s, options.backend) as pool:
            written = 0
            decoded = _decoded(pool.imap(jobs), todo, store, summary, report)
            for video in _encode_batches(decoded, runner, options):
                _write(video, store, options)
                summary.indexed += 1
                summary.segments += len(video.decoded)
                written += 1
                if written % options.save_every == 0:
                    store.save_faiss()
                report(video.path)
    finally:
        torch.set_num_threads(threads)
        store.save_faiss()
    summary.seconds = time.perf_counter() - began
    return summary


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
            summary.failed[str(path)] = result.reason
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
        frames = np.stack([v.decoded[i].frames for v, i in batch])
        masks = np.stack([v.decoded[i].mask for v, i in batch])
        encoded = runner.encode_clips(frames, masks, keep_latents=options.store_latents)
        for row, (video, _) in enumerate(batch):
            video.parts.append(_rows(encoded, row))
            video.encoded += 1

    def finished() -> Iterator[_Pending]:
        while waiting and waiting[0].encoded == len(waiting[0].decoded):
            yield waiting.pop(0)

    for video in videos:
        waiting.append(video)
        queue.extend((video, i) for i in range(len(video.decoded)))
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
        VideoInfo(info.duration, info.fps, info.width, info.height) if info else VideoInfo(),
        spans,
        np.concatenate([p.embeddings for p in video.parts]),
        np.concatenate([p.rerank_states for p in video.parts]),
        latents,
    )


def rebuild_vectors(index_dir: str | Path, db_url: str | None = None) -> int:
    """Recreate the FAISS index from the stored embeddings alone; returns its size."""
    path = Path(index_dir) / FAISS_FILE
    if not (Path(index_dir).is_dir()):
        raise IndexStoreError(f"no index at {index_dir}")
    path.unlink(missing_ok=True)  # derived data: opening the store rebuilds it
    with IndexStore(index_dir, db_url) as store:
        return store.vectors.ntotal if store.vectors is not None else 0
