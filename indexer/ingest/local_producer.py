"""Decode in worker processes and encode in batches on this machine: the local producer of an
indexing run. It yields each planned file, in plan order, as an `EncodedVideo` or a
`FailedVideo`; a failure is yielded as soon as it is known (before videos still waiting for
their clips to be encoded), so the writer records it at once. Meanwhile it yields `Underway`
as clips of files not yet finished are decoded and encoded (the progress bar)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from indexer.encoding import EncodedClips, ModelRunner
from indexer.ingest.options import IndexOptions
from indexer.ingest.produced import EncodedVideo, FailedVideo, Produced, Underway
from indexer.store.records import SegmentInfo
from pvl_search.media.decode_dispatch import DecodedVideo, DecodeProgress
from pvl_search.media.decode_pool import DecodePool
from pvl_search.media.thumbnails import clip_thumbnail
from pvl_search.media.types import VideoDecodeError
from pvl_search.media.windows import Windows
from pvl_search.model.config import ModelConfig

Planned = tuple[Path, os.stat_result, str]  # (path, stat, fingerprint) of a file to index


@dataclass
class _Pending:
    """A decoded video whose clips are being encoded."""

    path: str
    stat: os.stat_result
    fingerprint: str
    decoded: DecodedVideo
    parts: list[EncodedClips] = field(default_factory=list)
    encoded: int = 0


def local_encoded(
    pool: DecodePool, todo: list[Planned], runner: ModelRunner, options: IndexOptions
) -> Iterator[Produced]:
    """Every planned file, decoded by `pool` and encoded by `runner`, in plan order."""
    config = runner.config
    windows = Windows(options.window_s, options.stride_s, options.shots)
    jobs = ((i, str(path), windows, config.frames, config.frame_size) for i, (path, _, _) in enumerate(todo))
    for item in _encode_batches(_decoded(pool.imap(jobs, progress=True), todo), runner, options):
        if isinstance(item, _Pending):
            yield _finished(item, runner, options)
        else:
            yield item


def _decoded(results: Iterator, todo: list[Planned]) -> Iterator[_Pending | FailedVideo | Underway]:
    for key, result in results:
        path, stat, fingerprint = todo[key]
        if isinstance(result, DecodeProgress):
            yield Underway(str(path), result.clips, 0, result.planned)
        elif isinstance(result, VideoDecodeError):
            yield FailedVideo(str(path), stat, fingerprint, result.reason)
        else:
            yield _Pending(str(path), stat, fingerprint, result)


def _encode_batches(
    videos: Iterator[_Pending | FailedVideo | Underway], runner: ModelRunner, options: IndexOptions
) -> Iterator[_Pending | FailedVideo | Underway]:
    """Encode clips in batches that may span several videos; yield each video once all of
    its clips are encoded, in order (failures and progress pass straight through), and the
    progress of a video whose clips are only partly encoded."""
    waiting: list[_Pending] = []
    queue: list[tuple[_Pending, int]] = []  # (video, clip index) not yet encoded

    def run_batch() -> Iterator[Underway]:
        batch, queue[:] = queue[: options.batch_size], queue[options.batch_size :]
        frames = np.stack([v.decoded.clips[i].frames for v, i in batch])
        masks = np.stack([v.decoded.clips[i].mask for v, i in batch])
        encoded = runner.encode_clips(frames, masks, keep_latents=bool(options.store_latents),
                                      keep_patches=bool(options.store_patches))
        for row, (video, _) in enumerate(batch):
            video.parts.append(_rows(encoded, row))
            video.encoded += 1
        for video in {id(v): v for v, _ in batch}.values():  # each once, in order
            clips = len(video.decoded.clips)
            if video.encoded < clips:
                yield Underway(video.path, clips, video.encoded, clips)

    def finished() -> Iterator[_Pending]:
        while waiting and waiting[0].encoded == len(waiting[0].decoded.clips):
            yield waiting.pop(0)

    threads = _EncoderThreads(runner)
    for video in threads.timed(videos):
        if not isinstance(video, _Pending):
            yield video
            continue
        waiting.append(video)
        queue.extend((video, i) for i in range(len(video.decoded.clips)))
        while len(queue) >= options.batch_size:
            began = time.perf_counter()
            yield from run_batch()
            threads.encoded(time.perf_counter() - began)
        yield from finished()
    while queue:
        yield from run_batch()
    yield from finished()


class _EncoderThreads:
    """Torch threads on a CPU: build_index leaves cores to the decoder processes (torch threads
    spin on OpenMP barriers while a decoder holds their core), which is right while decoding
    keeps up with encoding. Once the encoder is measured to be the bottleneck, waiting for
    decoded videos under a tenth of its encoding time over the first batches, the decoders
    are mostly idle and it takes every core: a base model indexed 1.9x faster on 2 cores, a
    tiny one (decode-bound) is left as it was (BENCHMARKS.md, "Indexing threads")."""

    BATCHES = 2  # batches measured before deciding

    def __init__(self, runner: ModelRunner) -> None:
        self.cores = os.cpu_count() or 1
        self.deciding = runner.device.type == "cpu" and torch.get_num_threads() < self.cores
        self.waited = self.encoding = 0.0
        self.batches = 0

    def timed(self, videos: Iterator[_Pending | FailedVideo | Underway]) -> Iterator:
        """`videos`, with the time spent waiting for each counted."""
        while True:
            began = time.perf_counter()
            try:
                video = next(videos)
            except StopIteration:
                return
            self.waited += time.perf_counter() - began
            yield video

    def encoded(self, seconds: float) -> None:
        if not self.deciding:
            return
        self.encoding += seconds
        self.batches += 1
        if self.batches >= self.BATCHES:
            self.deciding = False
            if self.waited < 0.1 * self.encoding:
                torch.set_num_threads(self.cores)  # build_index restores its own count at the end


def _rows(encoded: EncodedClips, row: int) -> EncodedClips:
    latents = None if encoded.latents is None else encoded.latents[row : row + 1]
    patches = None if encoded.patches is None else encoded.patches[row : row + 1]
    return EncodedClips(encoded.embeddings[row : row + 1], encoded.rerank_states[row : row + 1], latents, patches)


def _finished(video: _Pending, runner: ModelRunner, options: IndexOptions) -> EncodedVideo:
    decoded = video.decoded
    latents = np.concatenate([p.latents for p in video.parts]) if options.store_latents else None
    patches = np.concatenate([p.patches for p in video.parts]) if options.store_patches else None
    thumbnails = [clip_thumbnail(clip.frames, clip.mask) for clip in decoded.clips] if options.thumbnails else None
    return EncodedVideo(
        video.path, video.stat, video.fingerprint, decoded.spans, decoded.info,
        np.concatenate([p.embeddings for p in video.parts]),
        np.concatenate([p.rerank_states for p in video.parts]),
        latents, thumbnails, runner.dtype_name, decoded.log.lines, decoded.log.text, patches,
    )


def missing_thumbnails(
    pool: DecodePool, missing: dict[str, list[SegmentInfo]], config: ModelConfig
) -> Iterator[tuple[str, list[int], list[bytes | None] | None]]:
    """Decode the segments that have no thumbnail (the same frames indexing took): per video,
    (path, segment ids, their JPEGs), JPEGs None when the file cannot be decoded any more."""

    def spans(segs: list[SegmentInfo]) -> list[tuple[float, float]] | None:
        if len(segs) == 1 and segs[0].end_s <= segs[0].start_s:
            return None  # an image, or a video without a duration: decoded whole
        return [(seg.start_s, seg.end_s) for seg in segs]

    jobs = ((path, path, spans(segs), config.frames, config.frame_size) for path, segs in missing.items())
    for path, result in pool.imap(jobs):
        ids = [seg.id for seg in missing[path]]
        if not isinstance(result, VideoDecodeError) and len(result.clips) == len(missing[path]):
            yield path, ids, [clip_thumbnail(clip.frames, clip.mask) for clip in result.clips]
        else:
            yield path, ids, None
