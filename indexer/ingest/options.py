"""What an indexing run is told (`IndexOptions`), what it reports while it runs
(`IndexProgress`) and what it reports at the end (`IndexSummary`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pvl_search.media.backends import Backend

if TYPE_CHECKING:
    from indexer.ingest.ray_producer import RayOptions


@dataclass(kw_only=True)
class IndexOptions:
    # Segment length (shorter videos are one segment) and the most between segment starts;
    # None: the rule in indexer/ingest/window_choice.py (the index's, else the model's own).
    window_s: float | None = None
    stride_s: float | None = None
    shots: bool | None = None  # also a window per shot; None: the same rule as the windows
    reindex: bool = False  # cut and encode every video again (to move an index to other windows)
    batch_size: int = 8  # clips per encoder call
    workers: int = 2  # decoder processes
    timeout_s: float = 60.0  # a decoder making no progress this long is killed
    backend: Backend = "auto"
    # Keep the full N x D latents per segment; None: when the model has a latent reranker
    # (which reads them at search time), or as an existing index already does.
    store_latents: bool | None = None
    # Keep each segment's M x D patch tokens; None: when the model folder has a patch reranker
    # (which reads them at search time), or as an existing index already does.
    store_patches: bool | None = None
    faiss_factory: str | None = None  # None: exact, switching to IVF past a size threshold
    retry_failed: bool = False  # try files that failed before even if they did not change
    save_every: int = 200  # videos between vector-index saves (it is derived: only restart cost)
    thumbnails: bool = True  # a small JPEG per segment, from the frames the encoder decoded
    vectors: str | None = None  # "faiss" or "milvus:URI"; None: what the index records (store/vectors/choice.py)
    ray: RayOptions | None = None  # decode + encode on a Ray cluster (ingest/ray_producer.py)


@dataclass
class IndexProgress:
    done: int  # videos finished (indexed or failed) in this run
    total: int  # videos to process in this run
    segments: int  # segments written so far
    path: str  # the video just finished, or the one under way that moved
    partial: float = 0.0  # files under way, each the share of it done: done + partial moves within a long file
    segments_underway: int = 0  # segments encoded of files not yet written


@dataclass
class IndexSummary:
    scanned: int = 0
    indexed: int = 0
    unchanged: int = 0
    removed: int = 0
    segments: int = 0
    failed: dict[str, str] = field(default_factory=dict)  # path (as shown) -> reason
    seconds: float = 0.0
    thumbnails_added: int = 0  # thumbnails made for segments indexed without them
    dtype: str = "float32"  # what the model ran in (pvl_search/precision.py)
    decoder_messages: int = 0  # lines the decoders (FFmpeg, decord) wrote to stderr, in decoder_log
    decoder_log: str | None = None  # where they are (the index folder's decoder.log), when any
    windows: dict | None = None  # what videos were cut into: {"window_s", "stride_s", "shots"}
    reindex_hint: str | None = None  # the offer to re-cut the index to the model's own windows
    continued_reindex: bool = False  # this run went on with a --reindex an earlier run left unfinished

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}
