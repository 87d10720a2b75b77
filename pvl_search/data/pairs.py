"""(video, caption) training and evaluation data over a frame cache.

Frames are decoded once into one uint8 array on disk (videos x F x S x S x 3) so that
epochs never decode video again; batches are read from it through a memory map.
`load_pair_sets` makes the splits of a captions file into PairSets over one such cache.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from pvl_search.data.captions import CaptionRecord, load_captions
from pvl_search.data.scene_labels import label_maps
from pvl_search.media.video import to_model_input
from pvl_search.model.config import ModelConfig
from pvl_search.model.tokenizer import Tokenizer

# decode(path) -> (frames uint8 (F, S, S, 3), mask bool (F,)); raising marks the video failed.
DecodeFn = Callable[[str], tuple[np.ndarray, np.ndarray]]


@dataclass
class FrameCache:
    """uint8 frames of many videos, addressed by row; `keys[i]` names row i."""

    frames: np.ndarray  # (V, F, S, S, 3) uint8, usually a read-only memory map
    masks: np.ndarray  # (V, F) bool
    keys: list[str]

    @classmethod
    def open(cls, folder: str | Path) -> FrameCache:
        folder = Path(folder)
        keys = json.loads((folder / "keys.json").read_text())
        frames = np.load(folder / "frames.npy", mmap_mode="r")
        masks = np.load(folder / "masks.npy")
        return cls(frames, masks, keys)


def build_frame_cache(
    items: Sequence[tuple[str, str]],
    folder: str | Path,
    *,
    frames: int,
    size: int,
    decode: DecodeFn | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[FrameCache, dict[str, str]]:
    """Decode each (key, path) once into `folder`; returns the cache and {key: error} of the
    videos that failed. An existing complete cache for the same keys is reused.

    By default files are decoded in crash-proof worker processes (pvl_search.media.decode_pool);
    `decode` replaces that with an in-process function (tests, arrays already in memory)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    wanted = [key for key, _ in items]
    done_marker = folder / "complete.json"
    if done_marker.exists():
        info = json.loads(done_marker.read_text())
        if info.get("frames") == frames and info.get("size") == size and info.get("requested") == wanted:
            return FrameCache.open(folder), info.get("failed", {})
    array = np.lib.format.open_memmap(folder / "frames.tmp.npy", mode="w+", dtype=np.uint8,
                                      shape=(len(items), frames, size, size, 3))
    masks = np.zeros((len(items), frames), dtype=bool)
    failed: dict[str, str] = {}
    for i, (key, result) in enumerate(_decode_all(items, frames, size, decode)):
        if isinstance(result, Exception):  # a bad file is recorded, not fatal: the caller drops it
            failed[key] = str(result)
        else:
            array[i], masks[i] = result
        if progress:
            progress(i + 1, len(items))
    array.flush()
    del array
    keep = [i for i, (key, _) in enumerate(items) if key not in failed]
    full = np.load(folder / "frames.tmp.npy", mmap_mode="r")
    np.save(folder / "frames.npy", np.ascontiguousarray(full[keep]) if failed else full)
    del full
    (folder / "frames.tmp.npy").unlink()
    np.save(folder / "masks.npy", masks[keep])
    (folder / "keys.json").write_text(json.dumps([wanted[i] for i in keep]))
    done_marker.write_text(json.dumps({"frames": frames, "size": size, "requested": wanted, "failed": failed}))
    return FrameCache.open(folder), failed


def _decode_all(
    items: Sequence[tuple[str, str]], frames: int, size: int, decode: DecodeFn | None
) -> Iterator[tuple[str, tuple[np.ndarray, np.ndarray] | Exception]]:
    if decode is not None:
        for key, path in items:
            try:
                yield key, decode(path)
            except Exception as exc:  # noqa: BLE001 - any failure is this file's failure
                yield key, exc
        return
    from pvl_search.media.decode_pool import DecodePool

    with DecodePool() as pool:
        jobs = ((key, path, None, frames, size) for key, path in items)
        for key, result in pool.imap(jobs):
            yield key, result if isinstance(result, Exception) else (result.clips[0].frames, result.clips[0].mask)


class PairSet:
    """Captions paired with cached videos. A batch holds distinct videos (so in-batch
    contrastive negatives are true negatives), each with one of its captions."""

    def __init__(
        self,
        cache: FrameCache,
        captions: dict[str, list[str]],
        tokenizer: Tokenizer,
        groups: dict[str, str] | None = None,
        labels: dict[str, np.ndarray] | None = None,
        token_labels: dict[str, np.ndarray] | None = None,
    ) -> None:
        row = {key: i for i, key in enumerate(cache.keys)}
        self.cache = cache
        self.video_rows = [row[key] for key in captions if key in row and captions[key]]
        self.keys = [cache.keys[r] for r in self.video_rows]
        # A label per video for group-aware batches; a video without one is its own group.
        self.groups = [(groups or {}).get(key, f"video:{key}") for key in self.keys]
        self.captions = [captions[key] for key in self.keys]
        self.tokens = [tokenizer(texts) for texts in self.captions]  # tokenised once
        # Per-video scene labels (pvl_search.data.scene_labels) when every video has them.
        has_labels = labels is not None and all(key in labels for key in self.keys)
        self.labels = torch.as_tensor(np.stack([labels[k] for k in self.keys])) if has_labels and self.keys else None
        has_tokens = token_labels is not None and all(key in token_labels for key in self.keys)
        self.token_labels = (torch.as_tensor(np.stack([token_labels[k] for k in self.keys]).astype(np.int8))
                             if has_tokens and self.keys else None)  # (V, F, G, 2)

    def __len__(self) -> int:
        return len(self.video_rows)

    def batch(self, indices: Sequence[int], generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        """frames (B, F, 3, S, S) float, frame mask (B, F), token ids (B, L)."""
        rows = [self.video_rows[i] for i in indices]
        order = np.argsort(rows)  # sorted reads from the memory map, then back in order
        frames = self.cache.frames[np.asarray(rows)[order]][np.argsort(order)]
        picks = [int(torch.randint(len(self.tokens[i]), (1,), generator=generator)) for i in indices]
        ids = torch.stack([self.tokens[i][p] for i, p in zip(indices, picks)])
        return to_model_input(frames, self.cache.masks[rows]) + (ids,)

    def labels_of(self, indices: Sequence[int]) -> Tensor | None:
        """(B, labels) scene labels of these videos, or None when the set has none."""
        return None if self.labels is None else self.labels[list(indices)]

    def token_labels_of(self, indices: Sequence[int]) -> Tensor | None:
        """(B, F, G, 2) dense patch labels of these videos, or None when the set has none."""
        return None if self.token_labels is None else self.token_labels[list(indices)].long()

    def group_ids(self, indices: Sequence[int]) -> Tensor:
        """(B,) ints, equal for videos of one group."""
        labels: dict[str, int] = {}
        return torch.tensor([labels.setdefault(self.groups[i], len(labels)) for i in indices])

    def all_captions(self) -> tuple[Tensor, list[int]]:
        """Every caption's token ids and the index of its video: evaluation queries."""
        ids = torch.cat(self.tokens)
        owners = [i for i, t in enumerate(self.tokens) for _ in range(len(t))]
        return ids, owners


def subset(data: PairSet, indices: Sequence[int]) -> PairSet:
    """The videos `indices` of `data` (same cache, captions, groups and labels), e.g. for probes."""
    part = object.__new__(PairSet)
    picked = list(indices)
    part.cache = data.cache
    part.video_rows = [data.video_rows[i] for i in picked]
    part.keys = [data.keys[i] for i in picked]
    part.groups = [data.groups[i] for i in picked]
    part.captions = [data.captions[i] for i in picked]
    part.tokens = [data.tokens[i] for i in picked]
    part.labels = None if data.labels is None else data.labels[picked]
    part.token_labels = None if data.token_labels is None else data.token_labels[picked]
    return part


def load_pair_sets(
    captions_path: str | Path,
    config: ModelConfig,
    cache_dir: Path,
    *,
    limit: int | None = None,
    cache_progress: Callable[[int, int], None] | None = None,
    splits: tuple[str, ...] = ("train", "val"),
) -> tuple[dict[str, PairSet], dict[str, str]]:
    """The train and val splits of a captions file over one frame cache, and the videos
    that failed to decode. A record's meta["group"] (e.g. a synthetic twin group) becomes
    its PairSet group, for group-aware batches."""
    records = load_captions(captions_path)
    by_split = {split: [r for r in records if r.split == split][:limit] for split in splits}
    for split in splits:
        if not by_split[split]:
            raise ValueError(f"{captions_path}: no videos in the {split} split")
    items = [(r.video_id, str(r.path)) for rs in by_split.values() for r in rs]
    cache, failed = build_frame_cache(
        items, cache_dir, frames=config.frames, size=config.frame_size, progress=cache_progress
    )
    for split, rs in by_split.items():
        if all(r.video_id in failed for r in rs):  # else training would fail on "0 videos", naming none
            raise ValueError(_none_readable(captions_path, split, rs, failed))
    tokenizer = Tokenizer(config.text_length)
    datasets = {}
    for split, rs in by_split.items():
        # Records of the synthetic benchmark carry their scene: labels for the attribute losses.
        synthetic = bool(rs) and all("scene" in r.meta for r in rs)
        labels, dense = (label_maps({r.video_id: r.meta["scene"] for r in rs}, config.frames, config.frame_size,
                                    config.patch) if synthetic else (None, None))
        datasets[split] = PairSet(cache, {r.video_id: r.captions for r in rs}, tokenizer,
                                  groups={r.video_id: str(r.meta["group"]) for r in rs if "group" in r.meta},
                                  labels=labels, token_labels=dense)
    return datasets, failed


_NAMED = 3  # failed videos a one-line error names before it counts the rest


def _none_readable(captions_path: str | Path, split: str, records: list[CaptionRecord], failed: dict[str, str]) -> str:
    """One line for a split none of whose videos could be read: the first few and a count, and
    where their paths were looked up when none of the files exists (the usual cause)."""
    more = f" and {len(records) - _NAMED} more" if len(records) > _NAMED else ""
    if not any(r.path.is_file() for r in records):
        named = ", ".join(str(r.path) for r in records[:_NAMED])
        return (f"{captions_path}: none of the {len(records)} {split} videos exist ({named}{more} not found); "
                f"its video paths are looked up from its folder {Path(captions_path).absolute().parent}")
    named = "; ".join(f"{r.video_id}: {(failed[r.video_id].splitlines() or ['?'])[0]}" for r in records[:_NAMED])
    return f"{captions_path}: none of the {len(records)} {split} videos could be read ({named}{more})"
