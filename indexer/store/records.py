"""What an index stores and reports, as plain values: file names, the layout fixed by the
model, per-video and per-segment records, statistics, and the content fingerprint."""

from __future__ import annotations

import hashlib
import os
import signal
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from indexer.store.schema import IndexInfo
from pvl_search.media.windows import Windows

EMBEDDINGS_FILE = "embeddings.f16"
RERANK_FILE = "rerank_states.f16"
LATENTS_FILE = "latents.f16"
PATCHES_FILE = "patches.f16"
FAISS_FILE = "vectors.faiss"
LOCK_FILE = "index.lock"
THUMBNAILS_DIR = "thumbnails"  # one JPEG per segment (indexer/store/thumbnails.py)
FINGERPRINT_CHUNK = 1 << 20
PAUSE_ENV = "PVL_TEST_PAUSE_AT"


def pause_point(stage: str) -> None:
    """Test hook: with PVL_TEST_PAUSE_AT=<stage> the process stops itself (SIGSTOP) here, so
    a test can SIGKILL it inside a precise crash window. Stages: "stores_appended" (rows
    fsynced, SQL not committed), "sql_committed" (SQL committed, FAISS not updated/saved)."""
    if os.environ.get(PAUSE_ENV) == stage:
        os.kill(os.getpid(), signal.SIGSTOP)


def fingerprint_file(path: str | Path) -> str:
    """Content fingerprint: sha256 of the size and the first and last MiB (hex)."""
    path = Path(path)
    size = path.stat().st_size
    digest = hashlib.sha256(size.to_bytes(8, "little"))
    with open(path, "rb") as f:
        digest.update(f.read(FINGERPRINT_CHUNK))
        if size > FINGERPRINT_CHUNK:
            f.seek(max(FINGERPRINT_CHUNK, size - FINGERPRINT_CHUNK))
            digest.update(f.read(FINGERPRINT_CHUNK))
    return digest.hexdigest()


@dataclass(frozen=True)
class IndexLayout:
    """Widths of what the index stores per segment, fixed by the model."""

    embedding_dim: int  # d
    rerank_width: int  # D + H
    latent_shape: tuple[int, int] | None = None  # (N, D) to keep full latents, else None
    faiss_factory: str | None = None  # None: exact, then IVF past the size threshold
    vectors: str | None = None  # None: FAISS file; "milvus:URI" (indexer/store/vectors/choice.py)
    patch_shape: tuple[int, int] | None = None  # (M, D) to keep patch tokens (patch reranker), else None

    @property
    def keeps_latents(self) -> bool:
        return self.latent_shape is not None

    @property
    def keeps_patches(self) -> bool:
        return self.patch_shape is not None

    def row_shapes(self) -> tuple[int | tuple[int, int] | None, ...]:
        """What a segment's rows hold beside the vectors: the part a model change must keep."""
        return (self.embedding_dim, self.rerank_width, self.latent_shape, self.patch_shape)


@dataclass(frozen=True)
class VideoMeta:
    """What the decoder found out about a video file (None: unknown)."""

    duration: float | None = None  # seconds
    fps: float | None = None
    width: int | None = None
    height: int | None = None


class KnownVideo(NamedTuple):
    size: int | None
    mtime: float | None
    fingerprint: str | None
    status: str  # a VideoStatus value


@dataclass(frozen=True)
class SegmentInfo:
    id: int
    video_id: int
    path: str  # as Python opens it (indexer/paths.py: shown(path) for people)
    start_s: float
    end_s: float
    removed: bool
    duration: float | None = None  # of the video, seconds (read in the same query)


@dataclass(frozen=True)
class VideoSegments:
    """The live segments of one video, in time order (`IndexReader.video_segments`)."""

    ids: np.ndarray  # int64
    starts: np.ndarray  # float64 seconds
    ends: np.ndarray


@dataclass
class IndexStats:
    videos: dict[str, int]  # count per status
    segments: int  # searchable
    removed_segments: int
    rows: int  # rows in each store (= committed segments, removed included)
    vectors: int  # ids in FAISS (= searchable segments)
    faiss: str  # what FAISS index is in use, e.g. "Flat" or "IVF894,Flat"
    bytes: dict[str, int] = field(default_factory=dict)  # on disk, per file
    recent_failures: list[tuple[str, str | None]] = field(default_factory=list)
    thumbnails: int = 0  # segments with a thumbnail (their bytes are bytes['thumbnails'])
    model_config: dict = field(default_factory=dict)  # of the model that built the index ({}: none yet)
    fingerprint: str | None = None  # of that model's weights
    encode_dtype: str | None = None  # what it ran in, e.g. "float32" or "bfloat16,float32"
    windows: Windows | None = None  # what videos are cut into (None: not recorded, an older index)

    def to_dict(self) -> dict:
        """What `pvl-search status --json` prints after the index folder."""
        return {
            "videos": self.videos, "segments": self.segments, "removed_segments": self.removed_segments,
            "vectors": self.vectors, "faiss": self.faiss, "bytes": self.bytes, "thumbnails": self.thumbnails,
            "model": {"fingerprint": self.fingerprint, "config": self.model_config, "dtype": self.encode_dtype},
            "windows": None if self.windows is None else asdict(self.windows),
            "recent_failures": [{"path": p, "error": e} for p, e in self.recent_failures],
        }


def size_mtime(stat: os.stat_result | tuple[int, float]) -> tuple[int, float]:
    if hasattr(stat, "st_size"):
        return int(stat.st_size), float(stat.st_mtime)
    size, mtime = stat
    return int(size), float(mtime)


def layout_columns(layout: IndexLayout) -> dict[str, int | str | None]:
    """The index_info columns that record `layout` (`layout_of` reads them back)."""
    latent, patch = layout.latent_shape, layout.patch_shape
    return {"embedding_dim": layout.embedding_dim, "rerank_width": layout.rerank_width,
            "latent_tokens": latent[0] if latent else None, "latent_dim": latent[1] if latent else None,
            "patch_tokens": patch[0] if patch else None, "patch_dim": patch[1] if patch else None,
            "faiss_factory": layout.faiss_factory, "vector_store": layout.vectors}


def layout_of(info: IndexInfo) -> IndexLayout | None:
    if info.embedding_dim is None or info.rerank_width is None:
        return None
    latent = patch = None
    if info.latent_tokens is not None and info.latent_dim is not None:
        latent = (info.latent_tokens, info.latent_dim)
    if info.patch_tokens is not None and info.patch_dim is not None:
        patch = (info.patch_tokens, info.patch_dim)
    return IndexLayout(info.embedding_dim, info.rerank_width, latent, info.faiss_factory, info.vector_store, patch)



def checked_rows(
    path: str,
    layout: IndexLayout,
    widths: list[tuple[str, int]],
    spans: np.ndarray,
    embeddings: np.ndarray,
    rerank_states: np.ndarray,
    latents: np.ndarray | None,
    thumbnails: Sequence[bytes | None] | None,
    patches: np.ndarray | None = None,
) -> list[np.ndarray]:
    """A video's rows for each store (named with their row `widths`), float32, after checking
    every shape against the layout (ValueError naming the file)."""
    n = len(spans)
    if (spans[:, 1] < spans[:, 0]).any():
        raise ValueError(f"{path}: a segment ends before it starts")
    rows = [np.asarray(embeddings, np.float32), np.asarray(rerank_states, np.float32)]
    if layout.latent_shape is not None:
        if latents is None:
            raise ValueError(f"{path}: this index keeps latents, none were given")
        rows.append(np.asarray(latents, np.float32).reshape(n, -1))
    elif latents is not None:
        raise ValueError(f"{path}: this index keeps no latents (layout.latent_shape is None)")
    if layout.patch_shape is not None:
        if patches is None:
            raise ValueError(f"{path}: this index keeps patch tokens, none were given")
        rows.append(np.asarray(patches, np.float32).reshape(n, -1))
    elif patches is not None:
        raise ValueError(f"{path}: this index keeps no patch tokens (layout.patch_shape is None)")
    if thumbnails is not None and len(thumbnails) != n:
        raise ValueError(f"{path}: {n} segments but {len(thumbnails)} thumbnails")
    for (name, width), block in zip(widths, rows):
        if block.shape != (n, width):
            raise ValueError(f"{path}: expected {name} rows of shape ({n}, {width}), got {block.shape}")
    return rows
