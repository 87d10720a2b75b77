"""A segment's thumbnail: one of the frames the encoder already decoded, as a small JPEG.

The indexer keeps one per segment (see indexer/store/thumbnails.py); taking it from the
clip's frames costs a JPEG encode, never a second decode. The frames are the model's
input (square, `frame_size` pixels, centre-cropped), so a thumbnail shows what the model saw.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

THUMBNAIL_WIDTH = 160  # pixels at most; smaller frames are kept as they are (no upscaling)
JPEG_QUALITY = 80


def keyframe(frames: np.ndarray, mask: np.ndarray) -> np.ndarray | None:
    """The middle real frame of a clip ((F, S, S, 3) uint8 frames, (F,) bool mask), or None
    when every frame is padding."""
    real = np.flatnonzero(np.asarray(mask, bool))
    if len(real) == 0:
        return None
    return np.asarray(frames[real[len(real) // 2]], np.uint8)


def encode_jpeg(frame: np.ndarray, width: int = THUMBNAIL_WIDTH, quality: int = JPEG_QUALITY) -> bytes:
    """An (H, W, 3) uint8 RGB frame as JPEG bytes, scaled down to `width` if it is wider."""
    image = Image.fromarray(np.ascontiguousarray(frame, np.uint8), "RGB")
    if image.width > width:
        height = max(1, round(image.height * width / image.width))
        image = image.resize((width, height), Image.Resampling.BILINEAR, reducing_gap=2.0)
    out = io.BytesIO()
    image.save(out, "JPEG", quality=quality, optimize=True)
    return out.getvalue()


def clip_thumbnail(frames: np.ndarray, mask: np.ndarray, width: int = THUMBNAIL_WIDTH) -> bytes | None:
    """The thumbnail of one decoded clip (None when it has no real frame)."""
    frame = keyframe(frames, mask)
    return None if frame is None else encode_jpeg(frame, width)
