"""Streaming training data from shards: every sample exactly once per epoch, over any number
of training processes and DataLoader workers, in an order every process can compute alone.

One epoch's plan (`epoch_plan`): the split's shards in an order drawn from (seed, epoch), their
samples laid end to end (T in all), and reader slot s (slot = rank * loader processes + loader
worker id) gets the contiguous range [s*T//slots, (s+1)*T//slots) of that sequence, as
(shard, start, stop) pieces. Slots differ by at most one sample, and each opens only the
shards its range touches. A slot's samples then pass through a shuffle buffer seeded by
(seed, epoch, slot); a DataLoader interleaves its workers' streams round-robin, and
`shard_batches` cuts that into batches. Every rank runs `steps_per_epoch` batches, the same
number everywhere without any communication (a rank with one sample more drops it).

    for batch in shard_batches(folder, "train", batch_size=32, text_length=40, seed=0, epoch=e,
                               rank=rank, world=world, loader_workers=2):
        ...  # batch.frames (B, F, 3, S, S), batch.mask, batch.token_ids, batch.labels, ...

`rank_order` gives the keys a rank's batches receive, in order, without decoding anything.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch import Tensor

from pvl_search.data.scene_labels import label_maps
from pvl_search.media.video import to_model_input
from pvl_search.model.tokenizer import Tokenizer
from pvl_search.shards.format import Manifest, Sample, ShardEntry, SplitManifest, read_samples

T = TypeVar("T")

_ORDER_TAG = 0x5E1F  # the seed stream of an epoch's shard order
_SHUFFLE_TAG = 0xB0F  # the seed stream of a slot's shuffle buffer

# DataLoader workers start by forkserver: training runs inside Ray worker processes, which have
# threads, so fork is unsafe. Measured here (2-core AMD EPYC, torch 2.14, a parent with a live
# thread, 2 workers, time to the first item of a trivial dataset): forkserver without preload
# 1.2-1.4 s per DataLoader (each worker imports torch), spawn 1.3-1.5 s, fork 0.04 s. With the
# preload below the forkserver imports torch, this module and open_clip's tokeniser (1.9 s on
# its own, else paid by every worker of every epoch) once: the first DataLoader of a process
# took 3.5 s, every later one (every later epoch) 0.36 s to read 31 small samples and stop.
# The forkserver imports from the parent's sys.path, so it finds this package wherever the
# parent did; the preload only applies if this process starts the forkserver.
_PRELOAD = ["pvl_search.shards.reader", "open_clip.tokenizer"]
# Items each worker keeps in flight. Measured with 2 workers over 8-frame clips of 64 and 384 px
# (2-core machine): 2 (torch's default), 4 and 8 gave the same samples/s within the noise.
_PREFETCH = 2


def epoch_plan(shards: Sequence[ShardEntry], *, seed: int, epoch: int, slots: int) -> list[list[tuple[str, int, int]]]:
    """For each of `slots` readers, the (shard name, start, stop) pieces it reads this epoch."""
    if slots < 1:
        raise ValueError(f"slots must be at least 1, got {slots}")
    order = np.random.default_rng([seed, epoch, _ORDER_TAG]).permutation(len(shards))
    laid: list[tuple[ShardEntry, int]] = []  # (shard, offset of its first sample)
    total = 0
    for i in order:
        laid.append((shards[int(i)], total))
        total += shards[int(i)].samples
    plan: list[list[tuple[str, int, int]]] = []
    for slot in range(slots):
        lo, hi = slot * total // slots, (slot + 1) * total // slots
        pieces = []
        for entry, offset in laid:
            start, stop = max(lo, offset), min(hi, offset + entry.samples)
            if start < stop:
                pieces.append((entry.name, start - offset, stop - offset))
        plan.append(pieces)
    return plan


def caption_choice(seed: int, epoch: int, key: str, n: int) -> int:
    """Which of a video's `n` captions it trains on this epoch; the same in every process."""
    if n < 1:
        raise ValueError(f"{key}: no captions to choose from")
    digest = hashlib.sha256(f"{seed}/{epoch}/{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % n


def rank_samples(plan: Sequence[Sequence[tuple[str, int, int]]], rank: int, loader_workers: int) -> int:
    """Samples the slots of `rank` read in this plan."""
    per_rank = max(1, loader_workers)
    return sum(stop - start for slot in plan[rank * per_rank:(rank + 1) * per_rank] for _, start, stop in slot)


def steps_per_epoch(manifest_split: SplitManifest, *, world: int, loader_workers: int, batch_size: int) -> int:
    """Batches every rank runs per epoch: the least of floor(rank's samples / batch_size).

    A rank's slots are contiguous, so it holds [r*W*T//slots, (r+1)*W*T//slots) of the T
    samples (W slots per rank) whatever the epoch's shard order: no plan needed."""
    if batch_size < 1 or world < 1:
        raise ValueError(f"batch_size and world must be at least 1, got {batch_size}, {world}")
    per_rank = max(1, loader_workers)
    total, slots = manifest_split.samples, world * per_rank
    return min(((r + 1) * per_rank * total // slots - r * per_rank * total // slots) // batch_size
               for r in range(world))


def _shuffled(items: Iterable[T], buffer: int, rng: np.random.Generator) -> Iterator[T]:
    """`items` through a shuffle buffer of `buffer` items (0 or 1: in order). The random draws
    depend only on how many items come, so keys alone give the same order as whole samples."""
    if buffer <= 1:
        yield from items
        return
    held: list[T] = []
    for item in items:
        if len(held) < buffer:
            held.append(item)
            continue
        j = int(rng.integers(buffer))
        yield held[j]
        held[j] = item
    for j in rng.permutation(len(held)):
        yield held[int(j)]


def _interleaved_positions(lengths: Sequence[int], worker: int) -> Iterator[int]:
    """Positions in the round-robin interleave of streams of `lengths` items (what a DataLoader
    does with an IterableDataset) of stream `worker`'s items, in order."""
    for j in range(lengths[worker]):
        yield sum(min(n, j) for n in lengths) + sum(1 for n in lengths[:worker] if n > j)


def _round_robin(streams: Sequence[Iterable[T]]) -> Iterator[T]:
    """The first item of each stream, then the second of each, ...; exhausted streams drop out."""
    active = [iter(s) for s in streams]
    while active:
        still = []
        for it in active:
            for item in it:
                yield item
                still.append(it)
                break
        active = still


@dataclass
class TrainingSample:
    """One video as a reader yields it: its frames, and one caption's tokens for this epoch."""

    key: str
    video_id: str
    frames: np.ndarray  # uint8 (F, S, S, 3)
    mask: np.ndarray  # bool (F,)
    token_ids: Tensor  # long (L,), the caption chosen by caption_choice
    caption: int  # which caption that is
    group: str | None = None  # meta["group"]: twins of the synthetic benchmark
    labels: np.ndarray | None = None  # int64 (n,) scene labels, when asked and the meta has a scene
    token_labels: np.ndarray | None = None  # int8 (F, G, 2) dense patch labels, likewise


class ShardStream(torch.utils.data.IterableDataset):
    """One rank's samples of one epoch; in a DataLoader with `loader_workers` workers, each
    worker reads its own slot. Without workers it reads the rank's only slot.

    `skip_samples`: the rank's first that many samples (in `rank_order`) come out as their
    keys only (str), neither tokenised nor labelled, for a resumed run that discards them."""

    def __init__(self, folder: str | Path, split: str, *, text_length: int, seed: int, epoch: int, rank: int = 0,
                 world: int = 1, loader_workers: int = 0, shuffle_buffer: int = 256,
                 with_scene_labels: tuple[int, int, int] | None = None, skip_samples: int = 0) -> None:
        super().__init__()
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"rank must be in 0..world-1, got rank {rank} of world {world}")
        if loader_workers < 0 or shuffle_buffer < 0 or skip_samples < 0:
            raise ValueError("loader_workers, shuffle_buffer and skip_samples must not be negative")
        self.folder = Path(folder)
        manifest = Manifest.read(self.folder)
        if with_scene_labels is not None and tuple(with_scene_labels[:2]) != (manifest.frames, manifest.size):
            raise ValueError(f"{folder}: shards hold {manifest.frames} frames of {manifest.size} px, scene labels "
                             f"were asked for {with_scene_labels[0]} of {with_scene_labels[1]}")
        self.shards = manifest.split(split, self.folder).shards
        self.text_length, self.seed, self.epoch = text_length, seed, epoch
        self.rank, self.world, self.loader_workers = rank, world, loader_workers
        self.per_rank = max(1, loader_workers)
        self.shuffle_buffer = shuffle_buffer
        self.with_scene_labels = with_scene_labels
        self.skip_samples = skip_samples
        self.plan = epoch_plan(self.shards, seed=seed, epoch=epoch, slots=world * self.per_rank)

    def slot_of(self, worker: int) -> int:
        return self.rank * self.per_rank + worker

    def slot_samples(self, slot: int) -> Iterator[Sample]:
        """The stored samples of one slot, in its shuffled order."""
        pieces = (s for name, start, stop in self.plan[slot]
                  for s in read_samples(self.folder / name, start=start, stop=stop))
        return _shuffled(pieces, self.shuffle_buffer, self._rng(slot))

    def slot_keys(self, slot: int) -> Iterator[str]:
        """The keys of `slot_samples(slot)`, in the same order, read from tar headers only."""
        pieces = (key for name, start, stop in self.plan[slot] for key in shard_keys(self.folder / name)[start:stop])
        return _shuffled(pieces, self.shuffle_buffer, self._rng(slot))

    def _rng(self, slot: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, slot, _SHUFFLE_TAG])

    def __iter__(self) -> Iterator[TrainingSample | str]:
        info = torch.utils.data.get_worker_info()
        worker = 0 if info is None else info.id
        if (1 if info is None else info.num_workers) != self.per_rank:
            raise ValueError(f"the stream was planned for {self.loader_workers} loader workers, it runs in "
                             f"{0 if info is None else info.num_workers}: samples would be lost or read twice")
        slot = self.slot_of(worker)
        lengths = [sum(stop - start for _, start, stop in self.plan[self.slot_of(w)]) for w in range(self.per_rank)]
        skipped = sum(1 for p in _interleaved_positions(lengths, worker) if p < self.skip_samples)
        tokenizer = Tokenizer(self.text_length)
        for i, sample in enumerate(self.slot_samples(slot)):
            yield sample.key if i < skipped else self.training_sample(sample, tokenizer)

    def training_sample(self, sample: Sample, tokenizer: Tokenizer) -> TrainingSample:
        pick = caption_choice(self.seed, self.epoch, sample.key, len(sample.captions))
        group = sample.meta.get("group")
        out = TrainingSample(sample.key, sample.video_id, sample.frames, sample.mask,
                             tokenizer(sample.captions[pick])[0], pick, None if group is None else str(group))
        if self.with_scene_labels is not None and "scene" in sample.meta:
            frames, size, patch = self.with_scene_labels
            labels, dense = label_maps({sample.key: sample.meta["scene"]}, frames, size, patch)
            out.labels = labels[sample.key]
            out.token_labels = None if dense is None else dense[sample.key].astype(np.int8)
        return out


def shard_keys(path: str | Path) -> list[str]:
    """The sample keys of one shard in stored order, from its tar headers (no data is read)."""
    keys: list[str] = []
    with tarfile.open(path, mode="r:") as tar:
        for info in tar:
            key = info.name.partition(".")[0]
            if not keys or keys[-1] != key:
                keys.append(key)
    return keys


def rank_order(folder: str | Path, split: str, *, seed: int, epoch: int, rank: int, world: int, loader_workers: int,
               shuffle_buffer: int) -> list[str]:
    """Every key `rank` reads this epoch, in the order its batches receive them (the batches
    of `shard_batches` take the first steps_per_epoch * batch_size). Reads tar headers only."""
    stream = ShardStream(folder, split, text_length=3, seed=seed, epoch=epoch, rank=rank, world=world,
                         loader_workers=loader_workers, shuffle_buffer=shuffle_buffer)
    return list(_round_robin([stream.slot_keys(stream.slot_of(w)) for w in range(stream.per_rank)]))


@dataclass
class ShardBatch:
    """One training batch from shards."""

    keys: list[str]
    frames: Tensor  # float (B, F, 3, S, S), CLIP-normalised
    mask: Tensor  # bool (B, F)
    token_ids: Tensor  # long (B, L)
    groups: list[str | None]
    labels: Tensor | None = None  # long (B, n), when every sample of the batch has scene labels
    token_labels: Tensor | None = None  # long (B, F, G, 2), likewise


def _identity(item: Any) -> Any:
    return item


def _loader_context() -> multiprocessing.context.BaseContext:
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(_PRELOAD)  # only used if this starts the forkserver
    return context


def shard_batches(folder: str | Path, split: str, *, batch_size: int, text_length: int, seed: int, epoch: int,
                  rank: int = 0, world: int = 1, loader_workers: int = 0, shuffle_buffer: int = 256, skip: int = 0,
                  with_scene_labels: tuple[int, int, int] | None = None) -> Iterator[ShardBatch]:
    """Rank `rank`'s batches of one epoch: exactly `steps_per_epoch` of them, less the first
    `skip` (a resumed run: their samples are still read, so the order stays exact, but not
    tokenised, labelled or batched). Workers stop when the generator is closed."""
    if skip < 0:
        raise ValueError(f"skip must not be negative, got {skip}")
    stream = ShardStream(folder, split, text_length=text_length, seed=seed, epoch=epoch, rank=rank, world=world,
                         loader_workers=loader_workers, shuffle_buffer=shuffle_buffer,
                         with_scene_labels=with_scene_labels, skip_samples=skip * batch_size)
    part = Manifest.read(folder).split(split, folder)
    steps = steps_per_epoch(part, world=world, loader_workers=loader_workers, batch_size=batch_size)
    if steps < 1:
        raise ValueError(f"{folder}: {part.samples} {split} samples make no batch of {batch_size} on each of "
                         f"{world} ranks")
    if skip >= steps:
        return
    workers: dict[str, Any] = {}
    if loader_workers:
        workers = {"multiprocessing_context": _loader_context(), "prefetch_factor": _PREFETCH}
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=loader_workers, collate_fn=_identity,
                                         persistent_workers=False, **workers)
    items = iter(loader)
    try:
        for _ in range(skip):
            _take(items, batch_size, folder)
        for _ in range(steps - skip):
            yield collate(_take(items, batch_size, folder))
    finally:
        del items  # shuts the workers down now, also when the caller stops early


def _take(items: Iterator[T], n: int, folder: str | Path) -> list[T]:
    taken = [item for _, item in zip(range(n), items)]
    if len(taken) < n:
        raise ValueError(f"{folder}: the shards hold fewer samples than their manifest says (rewrite them)")
    return taken


def collate(samples: Sequence[TrainingSample]) -> ShardBatch:
    """Stack samples into a batch; labels only when every sample has them."""
    frames, mask = to_model_input(np.stack([s.frames for s in samples]), np.stack([s.mask for s in samples]))
    labels = token_labels = None
    if all(s.labels is not None for s in samples):
        labels = torch.as_tensor(np.stack([s.labels for s in samples]))
    if all(s.token_labels is not None for s in samples):
        token_labels = torch.as_tensor(np.stack([s.token_labels for s in samples])).long()
    return ShardBatch([s.key for s in samples], frames, mask, torch.stack([s.token_ids for s in samples]),
                      [s.group for s in samples], labels, token_labels)


def load_split(folder: str | Path, split: str) -> list[Sample]:
    """Every sample of a split in shard order: for small splits such as validation."""
    folder = Path(folder)
    part = Manifest.read(folder).split(split, folder)
    return [s for entry in part.shards for s in read_samples(folder / entry.name)]
