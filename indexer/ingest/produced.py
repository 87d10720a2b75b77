"""What a producer (local decode + encode, or Ray actors) hands the one writer for each planned
file: the encoded video, or why it failed, and meanwhile how far a long one is. Producers never
touch the index."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class EncodedVideo:
    """One file, decoded and encoded: everything the index stores for it."""

    path: str
    stat: os.stat_result
    fingerprint: str
    spans: list[tuple[float, float]] | None  # None: the file was decoded whole (an image)
    info: Any  # pvl_search.media.video.VideoInfo, or None
    embeddings: np.ndarray  # (n, d)
    rerank_states: np.ndarray  # (n, D + H)
    latents: np.ndarray | None  # (n, N * D) or (n, N, D) when the index keeps them
    thumbnails: list[bytes | None] | None  # one JPEG per segment, when asked for
    dtype: str  # what the model ran in for this file
    decoder_lines: int = 0  # lines FFmpeg / decord wrote to stderr while decoding it (warnings)
    decoder_log: str = ""  # those lines (the first 64 KB)
    patches: np.ndarray | None = None  # (n, M * D) when the index keeps patch tokens


@dataclass
class FailedVideo:
    """One file that could not be decoded; `reason` is recorded in the index."""

    path: str
    stat: os.stat_result
    fingerprint: str
    reason: str


@dataclass
class Underway:
    """A file still being decoded and encoded, and how far it is: the progress bar moves
    within a long film instead of waiting for its last segment."""

    path: str
    decoded: int  # clips decoded so far
    encoded: int  # clips encoded so far
    planned: int  # clips (segments) the file is cut into

    @property
    def share(self) -> float:
        """How much of the file is done. Decoding weighs 3/4: a 20-minute film took 54 s to
        decode and 20 s to encode on 2 cores with the shipped model (less on a GPU)."""
        return (3 * self.decoded + self.encoded) / (4 * max(1, self.planned))


Produced = EncodedVideo | FailedVideo | Underway
