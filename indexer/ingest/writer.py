"""The one writer of an indexing run: it alone touches the index while producers decode and
encode. It checks (or records) the model, records what the plan found gone or unreadable,
writes each produced video as one atomic unit (with its thumbnails) or records its failure,
notes each dtype before its first segment commits, and decides when the vector index is saved.
What the decoders wrote to stderr (FFmpeg's warnings about damaged streams) goes to the run's
decoder log in the index folder, counted per file, instead of the terminal."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

from indexer.encoding import ModelRunner
from indexer.errors import IndexStoreError
from indexer.ingest.options import IndexOptions, IndexProgress, IndexSummary
from indexer.ingest.planning import Plan
from indexer.ingest.produced import EncodedVideo, FailedVideo, Produced, Underway
from indexer.ingest.window_choice import choose_windows, reindex_hint
from indexer.paths import shown
from indexer.store.index_store import IndexStore
from indexer.store.records import IndexLayout, SegmentInfo, VideoMeta
from indexer.store.vectors.choice import resolve_vectors

DECODER_LOG = "decoder.log"  # in the index folder: this run's decoder messages, per file


class RunWriter:
    """Writes one indexing run into `store`; `progress` hears of every finished file."""

    def __init__(self, store: IndexStore, progress: Callable[[IndexProgress], None] | None = None) -> None:
        self.store = store
        self.summary = IndexSummary()
        self._progress = progress
        self._total = 0
        self._backfilled = 0  # videos whose missing thumbnails were made in this run
        self._written = 0
        self._dtypes: set[str] = set()
        self._underway: dict[str, Underway] = {}  # files decoded or encoded in part, by path
        self._log: Path | None = None  # the decoder log, once this run wrote to it

    def prepare(self, runner: ModelRunner, options: IndexOptions) -> IndexOptions:
        """Record the model and layout on a new index, or check them on an existing one; returns
        the options with the windows, `store_latents` and `store_patches` resolved (the producers
        need them)."""
        store, config = self.store, runner.config
        windows = choose_windows(options.window_s, options.stride_s, recorded=store.windows(),
                                 holds_videos=store.counts()[0] > 0, clip_s=runner.clip_s, reindex=options.reindex,
                                 shots=options.shots)
        options = dataclasses.replace(options, window_s=windows.window_s, stride_s=windows.stride_s,
                                      shots=windows.shots)
        self._windows, self._clip_s, self._reindexing = windows, runner.clip_s, options.reindex
        keep_latents, keep_patches = options.store_latents, options.store_patches
        if keep_latents is None:
            keep_latents = config.latent_reranker if store.layout is None else store.layout.keeps_latents
        if keep_patches is None:
            keep_patches = runner.patch_reranker is not None if store.layout is None else store.layout.keeps_patches
        options = dataclasses.replace(options, store_latents=keep_latents, store_patches=keep_patches)
        layout = IndexLayout(
            config.embed_dim,
            config.rerank_state_width,
            (config.latents, config.hidden) if keep_latents else None,
            options.faiss_factory,
            resolve_vectors(options.vectors, store.layout),
            (config.patch_tokens, config.hidden) if keep_patches else None,
        )
        if store.layout is None:
            store.set_model(config.to_json(), runner.fingerprint, layout)
        else:
            store.check_model(config.to_json(), runner.fingerprint)
            _check_kept(store, "latents", "--store-latents", store.layout.keeps_latents, keep_latents)
            _check_kept(store, "patch tokens", "--store-patches", store.layout.keeps_patches, keep_patches)
        return options

    def start(self, planned: Plan, dtype: str) -> list[SegmentInfo]:
        """Files gone from disk are marked removed, unreadable entries failed; `dtype` is noted
        when there is anything to encode. Returns the live segments without a thumbnail."""
        self.summary = IndexSummary(scanned=planned.scanned, unchanged=planned.unchanged, dtype=dtype,
                                    windows=dataclasses.asdict(self._windows),
                                    reindex_hint=reindex_hint(self._windows, self._clip_s))
        for path in planned.gone:
            self.store.mark_removed(path)
            self.summary.removed += 1
        for entry in planned.bad:
            self.store.mark_failed(str(entry.path), entry.reason, entry.stat)
            self.summary.failed[shown(entry.path)] = entry.reason
        # Before anything is added: row ids of an add a crash cut short are reused, so their
        # leftover thumbnails must go first. Changed files get new segments (and thumbnails).
        missing = self.store.sync_thumbnails()
        if planned.todo:  # recorded before the first segment of this dtype is committed
            self._note_dtype(dtype)
        return missing

    def expect(self, total: int) -> None:
        """How many files this run will report (for the progress bar)."""
        self._total = total

    def write(self, item: Produced, options: IndexOptions) -> None:
        """Store one produced file: an encoded video as one atomic unit, or its failure; or
        note how far a file still under way is."""
        if isinstance(item, Underway):
            self._underway[item.path] = item
            self._report(item.path)
            return
        self._underway.pop(item.path, None)
        if isinstance(item, FailedVideo):
            self.store.mark_failed(item.path, item.reason, item.stat, item.fingerprint)
            self.summary.failed[shown(item.path)] = item.reason
            self._report(item.path)
            return
        self._note_dtype(item.dtype)  # a Ray GPU worker may run in another dtype than this machine
        self._add(item, options)
        if item.decoder_lines:
            self._keep_decoder_log(item)
        self.summary.indexed += 1
        self.summary.segments += len(item.embeddings)
        self._written += 1
        if self._written % options.save_every == 0:
            self.store.save_vectors()
        self._report(item.path)

    def write_thumbnails(self, path: str, ids: list[int], images: list[bytes | None] | None) -> None:
        """A video's backfilled thumbnails (None: it could not be decoded; the next run tries again)."""
        if images is not None:
            self.summary.thumbnails_added += self.store.thumbnails.write(ids, images)
        self._backfilled += 1
        self._report(path)

    def finish(self) -> None:
        """The run went through: a `--reindex` it made is complete (every video cut anew)."""
        if self._reindexing and self.store.reindex_pending():
            self.store.record_dtype(self.summary.dtype, self._windows)

    def save(self) -> None:
        """Save the vector index (after the new videos, before the thumbnail pass, and at the end)."""
        self.store.save_vectors()

    def _keep_decoder_log(self, video: EncodedVideo) -> None:
        """Append a file's decoder messages to this run's log (the first append starts it afresh)."""
        first = self._log is None
        self._log = self.store.directory / DECODER_LOG
        with open(self._log, "w" if first else "a", encoding="utf-8", errors="replace") as log:
            log.write(f"== {shown(video.path)}: {video.decoder_lines} lines\n{video.decoder_log}\n")
        self.summary.decoder_messages += video.decoder_lines
        self.summary.decoder_log = str(self._log)

    def _note_dtype(self, dtype: str) -> None:
        if dtype not in self._dtypes:
            self._dtypes.add(dtype)
            self.store.record_dtype(dtype, self._windows, reindexing=self._reindexing)

    def _add(self, video: EncodedVideo, options: IndexOptions) -> None:
        info = video.info
        spans = video.spans or [(0.0, float(info.duration or 0.0) if info else 0.0)]
        self.store.add_video(
            video.path,
            video.stat,
            video.fingerprint,
            VideoMeta(info.duration, info.fps, info.width, info.height) if info else VideoMeta(),
            spans,
            video.embeddings,
            video.rerank_states,
            video.latents if options.store_latents else None,
            thumbnails=video.thumbnails if options.thumbnails else None,
            patches=video.patches if options.store_patches else None,
        )

    def _report(self, path: str) -> None:
        if self._progress:
            done = self.summary.indexed + len(self.summary.failed) + self._backfilled
            partial = sum(min(u.share, 0.99) for u in self._underway.values())  # whole once written
            encoded = sum(u.encoded for u in self._underway.values())
            self._progress(IndexProgress(done, self._total, self.summary.segments, path, partial, encoded))


def _check_kept(store: IndexStore, what: str, option: str, kept: bool, wanted: bool) -> None:
    """An index keeps what it was built with: asking for the other is one line naming the option."""
    if kept != wanted:
        raise IndexStoreError(f"index {store.directory} {'keeps' if kept else 'does not keep'} {what}; "
                              f"{'add' if kept else 'drop'} {option}")
