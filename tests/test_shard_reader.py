"""The shard reader (pvl_search.shards.reader): every sample exactly once per epoch over ranks
and real DataLoader worker processes, batches in the order `rank_order` computes, resumable
with `skip`. Shards are written here from synthetic arrays whose pixels hold the sample's
index, so identity can be checked from the frames."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from pvl_search.data.scene_labels import label_maps
from pvl_search.data.synth import plan_corpus
from pvl_search.model.tokenizer import Tokenizer
from pvl_search.shards.format import (
    Manifest,
    Sample,
    ShardEntry,
    SplitManifest,
    file_sha256,
    sample_key,
    shard_name,
    write_samples,
)
from pvl_search.shards.reader import (
    ShardStream,
    TrainingSample,
    caption_choice,
    epoch_plan,
    load_split,
    rank_order,
    rank_samples,
    shard_batches,
    steps_per_epoch,
)

FRAMES, SIZE, PATCH = 4, 16, 8
TEXT = 12
SIZES = (7, 7, 7, 7, 3)  # uneven: the last shard is short


def make_samples(n: int, split: str = "train", scenes: list[dict] | None = None) -> list[Sample]:
    samples = []
    for i in range(n):
        frames = np.full((FRAMES, SIZE, SIZE, 3), i % 256, dtype=np.uint8)
        mask = np.arange(FRAMES) < FRAMES - (i % 2)  # every other video one padding frame short
        meta = {"group": f"g{i // 3}"} | ({"scene": scenes[i]} if scenes else {})
        samples.append(Sample(sample_key(split, i), f"video{i}", frames, mask,
                              [f"video {i} caption {c}" for c in range(1 + i % 3)], meta))
    return samples


def write_shards(folder: Path, sizes: tuple[int, ...] = SIZES, scenes: list[dict] | None = None) -> list[Sample]:
    """Shards of `sizes` samples (split "train") and their manifest; returns every sample."""
    folder.mkdir(parents=True, exist_ok=True)
    samples = make_samples(sum(sizes), scenes=scenes)
    entries, start = [], 0
    for number, count in enumerate(sizes):
        name = shard_name("train", number)
        with open(folder / name, "wb") as f:
            write_samples(f, samples[start:start + count])
        entries.append(ShardEntry(name, count, file_sha256(folder / name)))
        start += count
    Manifest(FRAMES, SIZE, {"clips": 1}, "synthetic", {"train": SplitManifest(entries)}, max(sizes)).write(folder)
    return samples


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Sample]]:
    folder = tmp_path_factory.mktemp("shards")
    return folder, write_shards(folder)


def index_of(key: str) -> int:
    return int(key.rsplit("-", 1)[1])


def loader_items(folder: Path, *, rank: int, world: int, workers: int, epoch: int = 0) -> list[TrainingSample]:
    """Everything one rank's DataLoader yields, nothing dropped (real worker processes)."""
    from pvl_search.shards.reader import _identity, _loader_context

    stream = ShardStream(folder, "train", text_length=TEXT, seed=3, epoch=epoch, rank=rank, world=world,
                         loader_workers=workers, shuffle_buffer=4)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers, collate_fn=_identity,
                                         multiprocessing_context=_loader_context())
    return list(loader)


def batch_keys(batches: list) -> list[str]:
    return [k for b in batches for k in b.keys]


# --------------------------------------------------------------------------------- the plan


@pytest.mark.parametrize("slots", [1, 2, 3, 4, 5, 8, 31, 40])
def test_plan_reads_every_sample_once(slots: int) -> None:
    entries = [ShardEntry(f"s{i}", n, "") for i, n in enumerate(SIZES)]
    for epoch in range(3):
        plan = epoch_plan(entries, seed=1, epoch=epoch, slots=slots)
        assert len(plan) == slots
        read = Counter((name, i) for slot in plan for name, start, stop in slot for i in range(start, stop))
        assert read == Counter((e.name, i) for e in entries for i in range(e.samples))
        counts = [sum(stop - start for _, start, stop in slot) for slot in plan]
        assert max(counts) - min(counts) <= 1
        assert all(0 <= start < stop <= dict((e.name, e.samples) for e in entries)[name]
                   for slot in plan for name, start, stop in slot)
    orders = {tuple(name for slot in epoch_plan(entries, seed=1, epoch=e, slots=1) for name, _, _ in slot)
              for e in range(6)}
    assert len(orders) > 1  # the shard order changes with the epoch


@pytest.mark.parametrize(("world", "workers", "batch"), [(1, 0, 4), (2, 2, 3), (3, 1, 5), (2, 0, 16), (4, 2, 40)])
def test_steps_per_epoch_is_the_least_rank_share(world: int, workers: int, batch: int) -> None:
    entries = [ShardEntry(f"s{i}", n, "") for i, n in enumerate(SIZES)]
    for epoch in range(3):
        plan = epoch_plan(entries, seed=0, epoch=epoch, slots=world * max(1, workers))
        shares = [rank_samples(plan, r, workers) for r in range(world)]
        assert sum(shares) == sum(SIZES)
        assert steps_per_epoch(SplitManifest(entries), world=world, loader_workers=workers,
                               batch_size=batch) == min(shares) // batch


def test_caption_choice_varies_with_epoch_and_stays_in_range() -> None:
    for n in (1, 2, 5):
        picks = [[caption_choice(7, epoch, f"train-{k:08d}", n) for epoch in range(8)] for k in range(10)]
        assert all(0 <= p < n for row in picks for p in row)
        if n > 1:
            assert any(len(set(row)) > 1 for row in picks)
    assert caption_choice(7, 2, "k", 5) == caption_choice(7, 2, "k", 5)
    with pytest.raises(ValueError):
        caption_choice(0, 0, "k", 0)


# ------------------------------------------------------------------------------- streaming


def test_two_ranks_two_workers_read_each_sample_once(shards: tuple[Path, list[Sample]]) -> None:
    folder, samples = shards
    captions = {s.key: s.captions for s in samples}
    tokenizer = Tokenizer(TEXT)
    seen: Counter[str] = Counter()
    for rank in range(2):
        items = loader_items(folder, rank=rank, world=2, workers=2)
        seen.update(item.key for item in items)
        assert [item.key for item in items] == rank_order(folder, "train", seed=3, epoch=0, rank=rank, world=2,
                                                          loader_workers=2, shuffle_buffer=4)
        for item in items:  # the right frames, the caption_choice caption, the group
            i = index_of(item.key)
            assert item.video_id == f"video{i}" and int(item.frames[0, 0, 0, 0]) == i
            assert item.frames.shape == (FRAMES, SIZE, SIZE, 3) and item.mask.sum() == FRAMES - i % 2
            assert item.caption == caption_choice(3, 0, item.key, len(captions[item.key]))
            assert torch.equal(item.token_ids, tokenizer(captions[item.key][item.caption])[0])
            assert item.group == f"g{i // 3}" and item.labels is None
    assert seen == Counter(s.key for s in samples)  # every sample once over the 4 slots

    part = Manifest.read(folder).split("train")
    steps = steps_per_epoch(part, world=2, loader_workers=2, batch_size=3)
    runs = {rank: list(shard_batches(folder, "train", batch_size=3, text_length=TEXT, seed=3, epoch=0, rank=rank,
                                     world=2, loader_workers=2, shuffle_buffer=4)) for rank in range(2)}
    for rank, batches in runs.items():
        assert len(batches) == steps == 15 // 3  # slots of 7, 8, 8, 8: rank 0 holds 15
        b = batches[0]
        assert b.frames.shape == (3, FRAMES, 3, SIZE, SIZE) and b.frames.dtype == torch.float32
        assert b.mask.shape == (3, FRAMES) and b.token_ids.shape == (3, TEXT) and b.token_ids.dtype == torch.long
        assert b.labels is None and b.token_labels is None and len(b.groups) == 3
        order = rank_order(folder, "train", seed=3, epoch=0, rank=rank, world=2, loader_workers=2, shuffle_buffer=4)
        assert batch_keys(batches) == order[:steps * 3]
    assert not set(batch_keys(runs[0])) & set(batch_keys(runs[1]))  # the ranks' batches are disjoint

    again = list(shard_batches(folder, "train", batch_size=3, text_length=TEXT, seed=3, epoch=0, rank=0, world=2,
                               loader_workers=2, shuffle_buffer=4))
    assert batch_keys(again) == batch_keys(runs[0])  # deterministic
    assert all(torch.equal(a.frames, b.frames) and torch.equal(a.token_ids, b.token_ids)
               for a, b in zip(again, runs[0]))
    other = list(shard_batches(folder, "train", batch_size=3, text_length=TEXT, seed=3, epoch=1, rank=0, world=2,
                               loader_workers=2, shuffle_buffer=4))
    assert len(other) == steps and batch_keys(other) != batch_keys(runs[0])  # another epoch, another order


@pytest.mark.parametrize("workers", [0, 2])
def test_rank_order_is_the_batch_order_and_skip_resumes_it(shards: tuple[Path, list[Sample]], workers: int) -> None:
    folder, _ = shards
    args = dict(batch_size=4, text_length=TEXT, seed=5, epoch=2, rank=1, world=2, loader_workers=workers,
                shuffle_buffer=3)
    full = list(shard_batches(folder, "train", **args))
    order = rank_order(folder, "train", seed=5, epoch=2, rank=1, world=2, loader_workers=workers, shuffle_buffer=3)
    assert len(full) == 15 // 4 and batch_keys(full) == order[:len(full) * 4]
    resumed = list(shard_batches(folder, "train", skip=2, **args))
    assert [b.keys for b in resumed] == [b.keys for b in full[2:]]
    assert all(torch.equal(a.frames, b.frames) and torch.equal(a.mask, b.mask) and torch.equal(a.token_ids, b.token_ids)
               for a, b in zip(resumed, full[2:]))
    assert list(shard_batches(folder, "train", skip=len(full), **args)) == []


def test_shuffle_buffer_shuffles_within_the_epoch(shards: tuple[Path, list[Sample]]) -> None:
    folder, samples = shards
    stored = ShardStream(folder, "train", text_length=TEXT, seed=0, epoch=0, shuffle_buffer=0)
    in_order = [item.key for item in stored]
    plan_order = [s.key for name, start, stop in stored.plan[0]
                  for s in samples if s.key in _shard_members(folder / name)[start:stop]]
    assert in_order == plan_order  # buffer 0: the plan's order, shard after shard
    for buffer in (2, 8, 64):
        shuffled = [item.key for item in ShardStream(folder, "train", text_length=TEXT, seed=0, epoch=0,
                                                      shuffle_buffer=buffer)]
        assert shuffled != in_order and sorted(shuffled) == sorted(in_order)
        assert shuffled == rank_order(folder, "train", seed=0, epoch=0, rank=0, world=1, loader_workers=0,
                                      shuffle_buffer=buffer)


def _shard_members(path: Path) -> list[str]:
    from pvl_search.shards.format import read_samples

    return [s.key for s in read_samples(path)]


def test_scene_labels_come_through(tmp_path: Path) -> None:
    scenes = [p.scene.to_dict() for p in plan_corpus(8, seed=0, frames=24)]
    samples = write_shards(tmp_path, sizes=(5, 3), scenes=scenes)
    batches = list(shard_batches(tmp_path, "train", batch_size=4, text_length=TEXT, seed=0, epoch=0,
                                 shuffle_buffer=0, with_scene_labels=(FRAMES, SIZE, PATCH)))
    labels, dense = label_maps({s.key: s.meta["scene"] for s in samples}, FRAMES, SIZE, PATCH)
    assert len(batches) == 2
    for b in batches:
        assert b.labels is not None and b.token_labels is not None
        assert b.token_labels.shape == (4, FRAMES, (SIZE // PATCH) ** 2, 2) and b.token_labels.dtype == torch.long
        assert torch.equal(b.labels, torch.as_tensor(np.stack([labels[k] for k in b.keys])))
        assert torch.equal(b.token_labels, torch.as_tensor(np.stack([dense[k] for k in b.keys])))
    with pytest.raises(ValueError, match="scene labels"):
        ShardStream(tmp_path, "train", text_length=TEXT, seed=0, epoch=0, with_scene_labels=(FRAMES, 32, PATCH))


def test_load_split_and_errors(shards: tuple[Path, list[Sample]], tmp_path: Path) -> None:
    folder, samples = shards
    loaded = load_split(folder, "train")
    assert [s.key for s in loaded] == [s.key for s in samples]
    assert all(np.array_equal(a.frames, b.frames) and np.array_equal(a.mask, b.mask) for a, b in zip(loaded, samples))
    with pytest.raises(ValueError, match="no val samples"):
        load_split(folder, "val")
    with pytest.raises(ValueError, match="no batch of 32"):
        next(shard_batches(folder, "train", batch_size=32, text_length=TEXT, seed=0, epoch=0, world=2))
    with pytest.raises(ValueError, match="rank"):
        ShardStream(folder, "train", text_length=TEXT, seed=0, epoch=0, rank=2, world=2)
    with pytest.raises(ValueError, match="planned for 2 loader workers"):  # iterated outside its DataLoader
        next(iter(ShardStream(folder, "train", text_length=TEXT, seed=0, epoch=0, loader_workers=2)))
    short = tmp_path / "short"
    write_shards(short, sizes=(4, 4))
    manifest = Manifest.read(short)
    manifest.splits["train"].shards[1].samples = 6  # the manifest promises more than the shard holds
    manifest.write(short)
    with pytest.raises(ValueError, match="fewer samples"):
        list(shard_batches(short, "train", batch_size=5, text_length=TEXT, seed=0, epoch=0, shuffle_buffer=0))
