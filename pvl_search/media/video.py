"""Decoding one video or image file into the model's fixed-size frame array.

Every file becomes `num_frames` RGB frames of `size` x `size` pixels plus a boolean mask: a
segment of a long film, a 2-second clip with 4 frames in it and a photo all look the same to
the model, with the padding frames masked out. Frames stay uint8 until `to_model_input`,
because they cross process boundaries (see `decode_pool`) and uint8 is 4x smaller than float.

Backends: decord decodes the sampled frames fastest (it keeps a frame index and seeks to the
nearest keyframe), PyAV is the fallback for files decord cannot open. `backend="auto"` tries
decord first. decord can crash the process (segfault) or spin forever on some damaged files,
which no Python-level timeout can stop: decode files you do not trust through
`decode_pool.DecodePool`, which runs this module in worker processes it can kill. The readers
themselves live in decoders.py.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch  # first, as always: decoders.py imports decord, and decord before torch can crash (dmlc/decord #251)

# isort: split
import av
import numpy as np

from pvl_search.media.backends import BACKENDS, Backend
from pvl_search.media.decoders import FileReaders, image_clips, open_pyav

# Re-exported ("x as x") from the readers: callers pick and size frames as they do (scene labels, benchmarks).
from pvl_search.media.types import Clip, Fit, Span, VideoDecodeError, VideoInfo

VIDEO_EXTENSIONS: tuple[str, ...] = (
    ".mp4", ".m4v", ".mkv", ".webm", ".avi", ".mov", ".mpg", ".mpeg", ".ts", ".wmv", ".flv",
    ".3gp", ".ogv",
)  # fmt: skip
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

# CLIP's pixel statistics: the model's frame tower may be initialised from CLIP (clip_init.py).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# (x / 255 - mean) / std as one multiply-add per channel on the uint8 value x.
_CLIP_SCALE = (1.0 / (255.0 * torch.tensor(CLIP_STD))).view(3, 1, 1)
_CLIP_SHIFT = (-torch.tensor(CLIP_MEAN) / torch.tensor(CLIP_STD)).view(3, 1, 1)

DEFAULT_NUM_FRAMES = 8  # the paper's frames per video (ModelConfig.frames)
DEFAULT_SIZE = 384  # the paper's frame size (ModelConfig.frame_size)

def is_image(path: str | os.PathLike[str]) -> bool:
    """Whether `path` is read as a still image (a 1-frame video), by its extension."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def check_readable(path: str | os.PathLike[str]) -> Path:
    """Reject, with a clear reason, what is not a readable, non-empty media file.

    Done before any decoder sees the file: decoders give vague messages ("Invalid data") for
    these cases, and a FIFO or device would block them forever.
    """
    path = Path(path)
    if path.suffix.lower() not in VIDEO_EXTENSIONS + IMAGE_EXTENSIONS:
        raise VideoDecodeError(path, f"unsupported file type {path.suffix or '(no extension)'!r}")
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        dangling = path.is_symlink()
        raise VideoDecodeError(path, "dangling symlink" if dangling else "no such file") from None
    except OSError as error:
        raise VideoDecodeError(path, f"cannot stat: {error.strerror}") from None
    if stat.S_ISDIR(mode):
        raise VideoDecodeError(path, "is a directory")
    if not stat.S_ISREG(mode):
        raise VideoDecodeError(path, "not a regular file")
    if not os.access(path, os.R_OK):
        raise VideoDecodeError(path, "permission denied")
    if path.stat().st_size == 0:
        raise VideoDecodeError(path, "empty file")
    return path


def probe(path: str | os.PathLike[str]) -> VideoInfo:
    """Duration, frame rate, size and frame count from the header (PyAV; decodes nothing)."""
    path = check_readable(path)
    with open_pyav(path) as container:
        return _pyav_info(path, container)


def read_clip(
    path: str | os.PathLike[str],
    span: Span | None = None,
    num_frames: int = DEFAULT_NUM_FRAMES,
    size: int = DEFAULT_SIZE,
    *,
    backend: Backend = "auto",
    fit: Fit = "crop",
    threads: int = 1,
) -> Clip:
    """`num_frames` frames sampled uniformly over `span` (None: the whole video), in-process."""
    return read_clips(path, None if span is None else [span], num_frames, size,
                      backend=backend, fit=fit, threads=threads)[0]  # fmt: skip


def read_clips(
    path: str | os.PathLike[str],
    spans: Sequence[Span] | None = None,
    num_frames: int = DEFAULT_NUM_FRAMES,
    size: int = DEFAULT_SIZE,
    *,
    backend: Backend = "auto",
    fit: Fit = "crop",
    threads: int = 1,
) -> list[Clip]:
    """One `Clip` per span, opening the file once. See `iter_clips`."""
    return list(iter_clips(path, spans, num_frames, size, backend=backend, fit=fit, threads=threads))


def iter_clips(
    path: str | os.PathLike[str],
    spans: Sequence[Span] | None = None,
    num_frames: int = DEFAULT_NUM_FRAMES,
    size: int = DEFAULT_SIZE,
    *,
    backend: Backend = "auto",
    fit: Fit = "crop",
    threads: int = 1,
) -> Iterator[Clip]:
    """Yield one `Clip` per span as it is decoded (a worker reports progress per span).

    Frames are resized so the short side is `size` and centre-cropped (`fit="crop"`, what
    CLIP does) or so the long side is `size` and centred on black (`fit="pad"`). A span gets
    the frames whose display interval overlaps it; fewer than `num_frames` of them are all
    kept and the rest padded and masked. An image yields frame 0 real and the rest masked,
    for every span. `threads` is the decoder's thread count (1 inside pool workers).
    Raises VideoDecodeError, and nothing else, for a file that cannot be decoded.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if fit not in ("crop", "pad"):
        raise ValueError(f"fit must be 'crop' or 'pad', got {fit!r}")
    if num_frames < 1 or size < 1:
        raise ValueError(f"num_frames and size must be positive, got {num_frames}, {size}")
    for span in spans or ():
        if not span[0] < span[1]:
            raise ValueError(f"span {span} is empty: start must be before end")
    path = check_readable(path)
    with open_pyav(path) as container:
        info = _pyav_info(path, container)
    if is_image(path):
        yield from image_clips(path, len(spans) if spans else 1, num_frames, size, fit)
        return
    spans = list(spans) if spans else [(0.0, max(info.duration, 1e-6))]
    readers = FileReaders(path, info, size, fit, threads, backend)
    try:
        for span in spans:
            yield readers.read(span, num_frames)
    finally:
        readers.close()


def to_model_input(
    frames: np.ndarray, mask: np.ndarray, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (..., F, S, S, 3) frames -> (..., F, 3, S, S) CLIP-normalised in `dtype`, and the mask.

    Padding frames come out as exact zeros, so a model that ignored the mask would at least
    see a constant. Works on one clip or a stacked batch. The arithmetic is float32 whatever
    `dtype` is (a bfloat16 result is the float32 one rounded once).

    One frame at a time, through a float32 buffer that stays in cache: 4-5x faster than
    whole-batch tensor arithmetic, which made five passes over a batch's floats (8 clips of 8
    frames at 384 px: 200 -> 43 ms to bfloat16, about a sixth of the bfloat16 base encoder's
    time; BENCHMARKS.md, "Where indexing's bfloat16 speed-up went").
    """
    pixels = torch.from_numpy(np.ascontiguousarray(frames))
    keep = torch.from_numpy(np.asarray(mask, dtype=bool))
    size = pixels.shape[-3:-1]
    flat = pixels.reshape(-1, *pixels.shape[-3:])
    out = torch.empty((flat.shape[0], 3, *size), dtype=dtype)
    frame = torch.empty((3, *size), dtype=torch.float32)
    for i in range(flat.shape[0]):
        frame.copy_(flat[i].movedim(-1, 0))
        out[i].copy_(frame.mul_(_CLIP_SCALE).add_(_CLIP_SHIFT))
    out = out.view(*pixels.shape[:-3], 3, *size)
    out[~keep] = 0
    return out, keep


# --- internals ---------------------------------------------------------------------------


def _pyav_info(path: Path, container: av.container.InputContainer) -> VideoInfo:
    stream = container.streams.video[0]
    width, height = stream.codec_context.width, stream.codec_context.height
    if width <= 0 or height <= 0:
        raise VideoDecodeError(path, "video stream has no frame size")
    if is_image(path):
        return VideoInfo(duration=0.0, fps=0.0, width=width, height=height, num_frames=1)
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    fps = float(rate) if rate else 0.0
    if stream.duration is not None and stream.time_base is not None:
        duration = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        duration = container.duration / av.time_base
    else:
        duration = 0.0
    num_frames = stream.frames or round(duration * fps)
    if fps <= 0 or num_frames <= 0:
        raise VideoDecodeError(path, "no frame rate or frame count in the header")
    if duration <= 0:
        duration = num_frames / fps
    return VideoInfo(duration=duration, fps=fps, width=width, height=height, num_frames=num_frames)
