"""Write small, real video and image files with PyAV and numpy, for tests and benchmarks.

Tests need real encoded files (no mocks of the decoder), in every codec and container the
project promises to read, and they must be able to tell which frames came back. So by default
frame i is a flat grey whose level encodes i (`frame_level`, inverted by `frame_index_of`):
flat frames survive lossy codecs, scaling and cropping, so the index survives decoding.
"""

from __future__ import annotations

from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

FrameFn = Callable[[int, int, int], np.ndarray]  # (index, width, height) -> (H, W, 3) uint8

# (codec, container extension) pairs covering every codec and every container at least once.
CODEC_CONTAINERS: tuple[tuple[str, str], ...] = (
    ("libx264", "mp4"),
    ("libx265", "mkv"),
    ("libvpx-vp9", "webm"),
    ("mpeg4", "avi"),
    ("mjpeg", "mov"),
    ("libx265", "mp4"),
    ("libx264", "mov"),
    ("mjpeg", "avi"),
    ("libvpx-vp9", "mkv"),
)

_LEVEL_BASE = 8
_LEVEL_STEP = 4  # grey levels between consecutive frames: survives yuv420 and lossy codecs
MAX_INDEXED_FRAMES = (255 - _LEVEL_BASE) // _LEVEL_STEP + 1

# Encoder options that keep tiny test encodes fast and quiet.
_CODEC_OPTIONS: dict[str, dict[str, str]] = {
    "libx264": {"preset": "ultrafast"},
    "libx265": {"preset": "ultrafast", "x265-params": "log-level=error"},
    "libvpx-vp9": {"deadline": "realtime", "cpu-used": "8", "lag-in-frames": "0"},
    "mpeg4": {"qmin": "1", "qmax": "1"},  # finest quantiser: grey levels stay within 1
    "mjpeg": {"qmin": "1", "qmax": "1"},
}
_PIX_FMT = {"mjpeg": "yuvj420p"}
_CODEC_TAG = {("libx265", "mp4"): "hvc1", ("libx265", "mov"): "hvc1"}


def frame_level(index: int) -> int:
    """Grey level of frame `index` in the default pattern (indices wrap past MAX_INDEXED_FRAMES)."""
    return _LEVEL_BASE + _LEVEL_STEP * (index % MAX_INDEXED_FRAMES)


def frame_index_of(frame: np.ndarray) -> int:
    """Recover the frame index from a decoded (H, W, 3) frame of the default pattern."""
    return int(round((float(frame.mean()) - _LEVEL_BASE) / _LEVEL_STEP))


def indexed_frame(index: int, width: int, height: int) -> np.ndarray:
    """The default pattern: a flat grey frame whose level encodes `index`."""
    return np.full((height, width, 3), frame_level(index), dtype=np.uint8)


def write_video(
    path: str | Path,
    *,
    codec: str = "libx264",
    width: int = 64,
    height: int = 48,
    fps: int = 4,
    seconds: float = 2.0,
    gop: int | None = None,
    frame_fn: FrameFn = indexed_frame,
    faststart: bool = False,
) -> Path:
    """Encode `round(fps * seconds)` frames from `frame_fn` into `path` (container from suffix).

    `gop` is the keyframe interval (None: the encoder's default). `faststart` moves the mp4/mov
    index to the front, which changes what a truncated file looks like to a decoder.
    """
    path = Path(path)
    count = max(1, round(fps * seconds))
    options = {"movflags": "+faststart"} if faststart else {}
    with av.open(str(path), "w", options=options) as container:
        stream = container.add_stream(codec, rate=fps, options=dict(_CODEC_OPTIONS.get(codec, {})))
        stream.width, stream.height = width, height
        stream.pix_fmt = _PIX_FMT.get(codec, "yuv420p")
        tag = _CODEC_TAG.get((codec, path.suffix.lstrip(".")))
        if tag:
            stream.codec_tag = tag
        if gop is not None:
            stream.codec_context.gop_size = gop
        for i in range(count):
            frame = av.VideoFrame.from_ndarray(frame_fn(i, width, height), format="rgb24")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


_IMAGE_CODEC = {".png": "png", ".bmp": "bmp", ".jpg": "mjpeg", ".jpeg": "mjpeg", ".webp": "libwebp"}
_IMAGE_PIX_FMT = {"png": "rgb24", "bmp": "bgr24", "mjpeg": "yuvj444p", "libwebp": "yuv420p"}


def write_image(path: str | Path, pixels: np.ndarray) -> Path:
    """Encode one (H, W, 3) uint8 RGB array as an image; the format comes from the suffix."""
    path = Path(path)
    codec = _IMAGE_CODEC[path.suffix.lower()]
    height, width = pixels.shape[:2]
    context = av.CodecContext.create(codec, "w")
    context.width, context.height = width, height
    context.pix_fmt = _IMAGE_PIX_FMT[codec]
    context.time_base = Fraction(1, 1)
    if codec == "mjpeg":
        context.options = {"qmin": "1", "qmax": "1"}
    frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(pixels), format="rgb24")
    frame = frame.reformat(format=context.pix_fmt)
    frame.pts = 0
    packets = list(context.encode(frame)) + list(context.encode(None))
    path.write_bytes(b"".join(bytes(packet) for packet in packets))
    return path


def truncate(path: str | Path, keep: float = 0.5) -> Path:
    """Cut a file down to the first `keep` share of its bytes, as an interrupted copy would."""
    path = Path(path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path
