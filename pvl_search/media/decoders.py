"""The per-file frame readers behind `video.iter_clips`: decord first, PyAV as the fallback.

Each reader turns a span of one open file into the frames to keep (`_span_indices` picks
them); `FileReaders` chooses the backend and packs the frames into a `Clip`. Failures are
raised as `VideoDecodeError`, whatever the backend. The frame rules the readers share (which
frames to keep, the output size, the square crop) and the PyAV opener are here too; video.py
builds on this module, never the other way round.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from pathlib import Path

import torch  # noqa: F401  imported before decord: decord first, then torch, can crash (dmlc/decord #251)

# isort: split
import av
import decord
import numpy as np

from pvl_search.media.backends import Backend
from pvl_search.media.types import Clip, Fit, Span, VideoDecodeError, VideoInfo

# Formats ffmpeg will "decode" from files that are not videos (tty renders text as ANSI art).
_NOT_VIDEO_FORMATS = {"tty"}
_DECORD_LOG_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: (Error: )?")


def open_pyav(path: Path) -> av.container.InputContainer:
    """Open with PyAV, turning every failure into VideoDecodeError."""
    try:
        container = av.open(str(path), "r")
    except (av.error.FFmpegError, OSError) as error:
        raise VideoDecodeError(path, f"not a readable video: {short_error(error)}") from None
    if container.format.name in _NOT_VIDEO_FORMATS or not container.streams.video:
        container.close()
        raise VideoDecodeError(path, "no video stream")
    return container


def short_error(error: BaseException) -> str:
    """One short line for an error: no errno, no repeated file name, no decord log prefix."""
    if isinstance(error, (av.error.FFmpegError, OSError)) and error.strerror:
        return str(error.strerror)
    lines = str(error).strip().splitlines()
    text = _DECORD_LOG_PREFIX.sub("", lines[0]) if lines else type(error).__name__
    return text[:200]


def sample_positions(available: int, num_frames: int) -> np.ndarray:
    """Which of `available` frames (in time order) to keep: all if few, else evenly spread.

    Each kept frame is the middle one of `num_frames` equal runs, so the samples sit at the
    centres of equal sub-intervals of the span (time-uniform for constant frame rate).
    """
    if available <= num_frames:
        return np.arange(available)
    return ((np.arange(num_frames) + 0.5) * available / num_frames).astype(np.int64)


def scaled_size(width: int, height: int, size: int, fit: Fit) -> tuple[int, int]:
    """Decoder output size that keeps the aspect ratio before the square crop or pad."""
    side = min(width, height) if fit == "crop" else max(width, height)
    scale = size / side
    w, h = max(1, round(width * scale)), max(1, round(height * scale))
    if fit == "crop":
        w, h = max(w, size), max(h, size)
    else:
        w, h = min(w, size), min(h, size)
    return w, h


def square_crop(frame: np.ndarray, size: int) -> np.ndarray:
    """Centre-crop (if larger) and centre-pad with black (if smaller) to (size, size, 3)."""
    h, w = frame.shape[:2]
    top, left = max(0, (h - size) // 2), max(0, (w - size) // 2)
    frame = frame[top : top + size, left : left + size]
    h, w = frame.shape[:2]
    if (h, w) == (size, size):
        return frame
    out = np.zeros((size, size, 3), dtype=np.uint8)
    top, left = (size - h) // 2, (size - w) // 2
    out[top : top + h, left : left + w] = frame
    return out


def _pack(frames: list[np.ndarray], num_frames: int, size: int) -> Clip:
    """Stack real frames first, then black padding frames, with the matching mask."""
    out = np.zeros((num_frames, size, size, 3), dtype=np.uint8)
    for i, frame in enumerate(frames[:num_frames]):
        out[i] = square_crop(frame, size)
    mask = np.zeros(num_frames, dtype=bool)
    mask[: min(len(frames), num_frames)] = True
    return Clip(out, mask)


def _span_indices(times: np.ndarray, span: Span, num_frames: int) -> np.ndarray:
    """Indices of the frames to decode for `span`, given every frame's start time.

    A frame shows from its time until the next frame's, so a span gets the frames whose
    interval overlaps [start, end): that includes the frame on screen at `start`, and a span
    shorter than one frame interval still gets that one frame.
    """
    start, end = span
    first = max(0, int(np.searchsorted(times, start, side="right")) - 1)
    stop = max(first + 1, int(np.searchsorted(times, end, side="left")))
    stop = min(stop, len(times))
    if first >= stop:  # the span starts after the last frame
        return np.zeros(0, dtype=np.int64)
    return first + sample_positions(stop - first, num_frames)


def image_clips(path: Path, count: int, num_frames: int, size: int, fit: Fit) -> Iterator[Clip]:
    """An image is a 1-frame video: frame 0 real, the rest masked."""
    with open_pyav(path) as container:
        try:
            frame = next(container.decode(video=0))
            w, h = scaled_size(frame.width, frame.height, size, fit)
            pixels = frame.to_ndarray(width=w, height=h, format="rgb24")
        except (av.error.FFmpegError, StopIteration, ValueError) as error:
            raise VideoDecodeError(path, f"cannot decode image: {short_error(error)}") from None
    clip = _pack([pixels], num_frames, size)
    for _ in range(count):
        yield Clip(clip.frames.copy(), clip.mask.copy())


class FileReaders:
    """The per-file decoders behind `iter_clips`: decord first, PyAV once decord has failed.

    With backend="auto" a decord failure (on open or on any span) switches the rest of the
    file to PyAV, so one bad packet in a film does not lose its other segments.
    """

    def __init__(self, path: Path, info: VideoInfo, size: int, fit: Fit, threads: int,
                 backend: Backend) -> None:  # fmt: skip
        self.path, self.info, self.size, self.threads, self.backend = path, info, size, threads, backend
        self.scaled = scaled_size(info.width, info.height, size, fit)
        self.decord: DecordReader | None = None
        self.pyav: _PyAVReader | None = None
        self.decord_failed: VideoDecodeError | None = None

    def read(self, span: Span, num_frames: int) -> Clip:
        if self.backend in ("auto", "decord") and self.decord_failed is None:
            try:
                if self.decord is None:
                    self.decord = DecordReader(self.path, self.scaled, self.threads)
                return _pack(self.decord.read(span, num_frames), num_frames, self.size)
            except VideoDecodeError as error:
                if self.backend == "decord":
                    raise
                self.decord_failed = error
        if self.pyav is None:
            self.pyav = _PyAVReader(self.path, self.info, self.scaled, self.threads)
        try:
            return _pack(self.pyav.read(span, num_frames), num_frames, self.size)
        except VideoDecodeError as error:
            if self.decord_failed is not None:  # say why both failed
                raise VideoDecodeError(self.path, f"{self.decord_failed.reason}; {error.reason}") from None
            raise

    def close(self) -> None:
        if self.pyav is not None:
            self.pyav.close()
        self.decord = None


class DecordReader:
    """decord with output scaling done by its own ffmpeg filter (cheaper than numpy).

    decord 0.6 fails ("DECORDArrayCopyFromTo: The size must exactly match") for some small
    output widths: measured here, widths 2, 4, 6, 8, 12, 16, 24, 48 and 72 failed and every
    other width up to 800 worked, whatever the source size. Below `_MIN_WIDTH` it therefore
    decodes at an integer multiple of the size and averages blocks down.
    """

    _MIN_WIDTH = 96

    def __init__(self, path: Path, scaled: tuple[int, int], threads: int) -> None:
        self.path = path
        self.factor = math.ceil(self._MIN_WIDTH / scaled[0]) if scaled[0] < self._MIN_WIDTH else 1
        width, height = scaled[0] * self.factor, scaled[1] * self.factor
        try:
            self.reader = decord.VideoReader(
                str(path), ctx=decord.cpu(0), width=width, height=height, num_threads=threads
            )
            count = len(self.reader)
            if count == 0:
                raise VideoDecodeError(path, "decord: no frames")
            stamps = self.reader.get_frame_timestamp(np.arange(count))[:, 0]
        except (decord.DECORDError, RuntimeError) as error:
            raise VideoDecodeError(path, f"decord: {short_error(error)}") from None
        except UnicodeEncodeError:  # a file name that is not UTF-8: PyAV opens those
            raise VideoDecodeError(path, "decord: cannot open a file name that is not UTF-8") from None
        self.times = np.asarray(stamps, dtype=np.float64) - float(stamps[0])

    def read(self, span: Span, num_frames: int) -> list[np.ndarray]:
        indices = _span_indices(self.times, span, num_frames)
        if len(indices) == 0:
            return []
        try:
            frames = self.reader.get_batch(indices.tolist()).asnumpy()
        except (decord.DECORDError, RuntimeError) as error:
            raise VideoDecodeError(self.path, f"decord: {short_error(error)}") from None
        if self.factor > 1:
            n, h, w, c, k = *frames.shape, self.factor
            blocks = frames.reshape(n, h // k, k, w // k, k, c).mean(axis=(2, 4))
            frames = np.rint(blocks).astype(np.uint8)
        return list(frames)


class _PyAVReader:
    """Seek-and-decode with PyAV: for each sampled time, seek to the keyframe before it
    (unless it is close ahead) and decode forward to the frame on screen at that time.

    PyAV has no frame index, so frame times come from the header's rate and count (exact for
    constant-frame-rate files, the common case); a frame past the real end is left out.
    """

    _SEEK_AHEAD_S = 2.0  # closer targets are reached by decoding on, not by seeking

    def __init__(self, path: Path, info: VideoInfo, scaled: tuple[int, int], threads: int) -> None:
        self.path, self.info, self.scaled = path, info, scaled
        self.container = open_pyav(path)
        self.stream = self.container.streams.video[0]
        self.stream.thread_count = threads
        self.stream.thread_type = "FRAME" if threads > 1 else "SLICE"
        self.offset = float(self.stream.start_time * self.stream.time_base) if self.stream.start_time else 0.0
        self.times = np.arange(info.num_frames) / info.fps
        self.frames: Iterator[av.VideoFrame] | None = None
        self.current: av.VideoFrame | None = None

    def read(self, span: Span, num_frames: int) -> list[np.ndarray]:
        out, seen = [], set()
        half = 0.5 / self.info.fps
        for index in _span_indices(self.times, span, num_frames):
            frame = self._frame_at(self.times[index], half)
            if frame is None or frame.pts in seen or self._time(frame) >= span[1]:
                continue
            seen.add(frame.pts)
            out.append(frame.to_ndarray(width=self.scaled[0], height=self.scaled[1], format="rgb24"))
        return out

    def _time(self, frame: av.VideoFrame) -> float:
        return float(frame.pts * frame.time_base) - self.offset

    def _frame_at(self, target: float, half: float) -> av.VideoFrame | None:
        """The first frame at or after `target` (within half a frame), or None past the end."""
        try:
            current = self.current
            if current is None or not (self._time(current) - half <= target
                                       <= self._time(current) + self._SEEK_AHEAD_S):  # fmt: skip
                self._seek(target)
            elif self._time(current) >= target - half:
                return current
            for frame in self.frames:
                if frame.pts is None:
                    continue
                self.current = frame
                if self._time(frame) >= target - half:
                    return frame
        except av.error.FFmpegError as error:
            raise VideoDecodeError(self.path, f"pyav: {short_error(error)}") from None
        self.current = None
        return None

    def _seek(self, target: float) -> None:
        pts = int((target + self.offset) / self.stream.time_base)
        self.container.seek(pts, stream=self.stream, backward=True, any_frame=False)
        self.frames = self.container.decode(self.stream)
        self.current = None

    def close(self) -> None:
        self.container.close()
