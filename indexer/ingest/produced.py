"""What a producer (local decode + encode, or Ray actors) hands the one writer for each planned
file: the encoded video, or why it failed. Producers never touch the index."""

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


@dataclass
class FailedVideo:
    """One file that could not be decoded; `reason` is recorded in the index."""

    path: str
    stat: os.stat_result
    fingerprint: str
    reason: str


Produced = EncodedVideo | FailedVideo
