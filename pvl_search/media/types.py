"""The media types every decoding module shares: spans, decoded clips, header facts and the
one decode error. The readers (decoders.py), the public decoding functions (video.py) and the
decode pool all build on them, so they sit below all three.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np

Span = tuple[float, float]  # [start, end) in seconds from the start of the video
Fit = Literal["crop", "pad"]


class VideoDecodeError(Exception):
    """The one error for a file that cannot be decoded, whatever the reason or the backend.

    Callers (the indexer, the CLI) report `str(error)` = "path: reason" and go on with the
    next file. Picklable, so worker processes can send it back.
    """

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        super().__init__(str(path), reason)
        self.path = str(path)
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


@dataclass(frozen=True)
class VideoInfo:
    """What the container header says (no frame is decoded to get it)."""

    duration: float  # seconds; 0.0 for an image
    fps: float  # average frame rate; 0.0 for an image
    width: int
    height: int
    num_frames: int  # from the header, or duration x fps where the container has no count


class Clip(NamedTuple):
    """Decoded frames of one span: unpacks as `frames, mask = clip`."""

    frames: np.ndarray  # (F, S, S, 3) uint8 RGB; padding frames are black
    mask: np.ndarray  # (F,) bool; False marks a padding frame
