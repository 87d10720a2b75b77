"""The single-stream rerank's inputs: candidate segments decoded again from their files and
scored by the joint encoder in batches. The searcher and `pvl-search eval` both use it, so
eval measures exactly the search's decode and batching."""

from __future__ import annotations

import time
from collections import OrderedDict

import numpy as np

from indexer.encoding import ModelRunner
from indexer.store.records import SegmentInfo
from pvl_search.media.video import VideoDecodeError, read_clips

SINGLE_BATCH = 8  # joint-encoder pairs per call

Clip = tuple[np.ndarray, np.ndarray]  # frames (T, H, W, 3) uint8, mask (T,) bool


def read_segment_clip(seg: SegmentInfo, frames: int, size: int) -> Clip | None:
    """The segment's frames as the model takes them; None when the file no longer decodes."""
    try:
        clip = read_clips(seg.path, [(seg.start_s, max(seg.end_s, seg.start_s + 1e-3))], frames, size)[0]
    except VideoDecodeError:
        return None
    return clip.frames, clip.mask


def single_stream_scores(runner: ModelRunner, text: str, clips: list[Clip | None]) -> np.ndarray:
    """Joint-encoder logits of `text` with each clip; -inf where a clip is missing (a file that
    went bad after indexing ranks last among the reranked)."""
    scores = np.full(len(clips), -np.inf, dtype=np.float64)
    rows = [row for row, clip in enumerate(clips) if clip is not None]
    for start in range(0, len(rows), SINGLE_BATCH):
        part = rows[start : start + SINGLE_BATCH]
        frames = np.stack([clips[row][0] for row in part])
        masks = np.stack([clips[row][1] for row in part])
        scores[part] = runner.single_scores(frames, masks, text)
    return scores


class ClipCache:
    """Decoded clips per segment, least recently used first out past `max_bytes`. Remembers
    how long each segment took to decode (also after eviction) and which ones failed."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.clips: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self.decode_ms: dict[int, float] = {}
        self.failed: set[int] = set()

    def get(self, seg, frames: int, size: int) -> tuple[np.ndarray, np.ndarray] | None:
        if seg.id in self.failed:
            return None
        clip = self.clips.get(seg.id)
        if clip is not None:
            self.clips.move_to_end(seg.id)
            return clip
        started = time.perf_counter()
        clip = read_segment_clip(seg, frames, size)  # exactly the searcher's read
        self.decode_ms.setdefault(seg.id, (time.perf_counter() - started) * 1000)
        if clip is None:
            self.failed.add(seg.id)
            return None
        self.clips[seg.id] = clip
        self.bytes += clip[0].nbytes
        while self.bytes > self.max_bytes and len(self.clips) > 1:
            _, (old, _) = self.clips.popitem(last=False)
            self.bytes -= old.nbytes
        return clip


def single_pass(
    runner: ModelRunner, cache: ClipCache, info: dict, segment_ids: np.ndarray, text: str, cand: np.ndarray,
    bounds: list[int],
) -> tuple[np.ndarray, dict[int, float]]:
    """Single-stream logits of the candidates (positions, in retrieval order) and, for each
    bound n, the milliseconds a search reranking the first n would spend (decode + encoder)."""
    config = runner.config
    logits = np.full(len(cand), -np.inf, dtype=np.float64)
    cost: dict[int, float] = {0: 0.0}
    spent, lo = 0.0, 0
    for hi in bounds:
        clips = []
        for row in range(lo, hi):
            seg = info[int(segment_ids[cand[row]])]
            clips.append(cache.get(seg, config.frames, config.frame_size))
            spent += cache.decode_ms[seg.id]
        started = time.perf_counter()
        logits[lo:hi] = single_stream_scores(runner, text, clips)
        spent += (time.perf_counter() - started) * 1000
        cost[hi] = spent
        lo = hi
    return logits, cost
