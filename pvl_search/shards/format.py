"""The shard format: WebDataset tar files of decoded training clips, and their manifest.

A shard folder holds, per split, tar files `SPLIT-000000.tar`, `SPLIT-000001.tar`, ... and
one `manifest.json`. Each sample is one video, stored as three tar members sharing a key
(WebDataset's convention: the key is the member name up to its first dot):

- `KEY.frames.npy`: uint8 (F, S, S, 3), the clip as the model sees it (frames sampled and
  resized exactly as `pvl-search index` and the frame cache do);
- `KEY.mask.npy`: bool (F,), False for padding frames of a short video;
- `KEY.json`: {"video_id", "captions": [...], "meta": {...}} from the captions file.

Keys are `SPLIT-NNNNNNNN`, the video's position in its split of the captions file, so they
are unique, sortable and safe whatever the video ids look like. Members are written with
fixed metadata (mtime 0, owner 0, mode 0644), so a shard's bytes depend only on its
samples: a rerun produces the same files, and the manifest's hashes say so.

Shard j of a split holds the videos j*P .. (j+1)*P - 1 of that split (P = samples per shard
asked for when writing); a video that could not be decoded is left out of its shard and
listed in the manifest's `failed`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from pvl_search.durable import write_atomically

FORMAT = "pvl-shards/1"
MANIFEST = "manifest.json"


def sample_key(split: str, position: int) -> str:
    """The key of the video at `position` in `split`'s records."""
    return f"{split}-{position:08d}"


def shard_name(split: str, number: int) -> str:
    return f"{split}-{number:06d}.tar"


@dataclass
class Sample:
    """One decoded video and its captions: what a shard stores per key."""

    key: str
    video_id: str
    frames: np.ndarray  # uint8 (F, S, S, 3)
    mask: np.ndarray  # bool (F,)
    captions: list[str]
    meta: dict[str, Any] = field(default_factory=dict)


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def write_samples(target: BinaryIO, samples: list[Sample]) -> None:
    """Write `samples` as one tar (deterministic bytes) to an open binary file."""
    with tarfile.open(fileobj=target, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for s in samples:
            _member(tar, f"{s.key}.frames.npy", _npy_bytes(s.frames.astype(np.uint8, copy=False)))
            _member(tar, f"{s.key}.mask.npy", _npy_bytes(s.mask.astype(bool, copy=False)))
            record = {"video_id": s.video_id, "captions": list(s.captions), "meta": s.meta}
            _member(tar, f"{s.key}.json", json.dumps(record, sort_keys=True, ensure_ascii=False).encode("utf-8"))


def read_samples(path: str | os.PathLike[str], *, start: int = 0, stop: int | None = None) -> Iterator[Sample]:
    """The samples of one shard in stored order; only those at positions start..stop-1 are
    decoded (the others' members are skipped unread)."""
    parts: dict[str, Any] = {}
    current: str | None = None
    position = 0
    with tarfile.open(path, mode="r:") as tar:
        for info in tar:
            key, _, ext = info.name.partition(".")
            if key != current:
                if current is not None:
                    if position >= start:
                        yield _sample(current, parts, path)
                    position += 1
                    if stop is not None and position >= stop:
                        return
                current, parts = key, {}
            if position < start:
                continue
            data = tar.extractfile(info).read()  # type: ignore[union-attr]
            parts[ext] = data
        if current is not None and position >= start and (stop is None or position < stop):
            yield _sample(current, parts, path)


def _sample(key: str, parts: Mapping[str, bytes], path: object) -> Sample:
    try:
        record = json.loads(parts["json"])
        frames = _npy_view(parts["frames.npy"])
        mask = _npy_view(parts["mask.npy"])
    except (KeyError, ValueError) as exc:
        raise ValueError(f"{path}: sample {key} is incomplete or unreadable ({exc})") from None
    return Sample(key, record["video_id"], frames, mask, record["captions"], record.get("meta", {}))


def _npy_view(data: bytes) -> np.ndarray:
    """A .npy file's array over its bytes, read-only and without a copy (np.load copies: at the
    base size that is 3.5 MB a sample, a third of reading speed; BENCHMARKS.md "Shard loading")."""
    buffer = io.BytesIO(data)
    version = np.lib.format.read_magic(buffer)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read_header(buffer)
    if dtype.hasobject:
        raise ValueError("object arrays are not shard data")
    array = np.frombuffer(data, dtype=dtype, count=int(np.prod(shape)), offset=buffer.tell())
    return array.reshape(shape, order="F" if fortran else "C")


def file_sha256(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class ShardEntry:
    name: str  # file name inside the shard folder
    samples: int
    sha256: str


@dataclass
class SplitManifest:
    shards: list[ShardEntry]
    failed: dict[str, str] = field(default_factory=dict)  # video_id -> why it could not be decoded

    @property
    def samples(self) -> int:
        return sum(s.samples for s in self.shards)


@dataclass
class Manifest:
    """What a shard folder holds. `frames` and `size` must match the model that trains on it."""

    frames: int
    size: int
    sampling: dict[str, Any]  # how clips were taken from each video (one clip, uniform frames, fit)
    source: str  # the captions file
    splits: dict[str, SplitManifest]
    samples_per_shard: int
    format: str = FORMAT

    @property
    def sha256(self) -> str:
        """One hash over every shard's hash, in split and shard order: equal manifests, equal data."""
        digest = hashlib.sha256()
        for split in sorted(self.splits):
            for entry in self.splits[split].shards:
                digest.update(f"{split}/{entry.name}:{entry.sha256}\n".encode())
        return digest.hexdigest()

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["sha256"] = self.sha256
        for split, part in self.splits.items():
            data["splits"][split]["samples"] = part.samples
        return data

    def write(self, folder: str | os.PathLike[str]) -> None:
        """Atomically: readers never see half a manifest."""
        text = json.dumps(self.to_dict(), indent=1, sort_keys=True) + "\n"
        write_atomically(Path(folder) / MANIFEST, lambda f: f.write(text.encode()))

    @classmethod
    def read(cls, folder: str | os.PathLike[str]) -> Manifest:
        path = Path(folder) / MANIFEST
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ValueError(f"{folder}: no {MANIFEST} (not a shard folder, or `pvl-search shards` did not finish)") \
                from None
        except ValueError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from None
        if data.get("format") != FORMAT:
            raise ValueError(f"{path}: format {data.get('format')!r}, expected {FORMAT!r}")
        splits = {name: SplitManifest([ShardEntry(**e) for e in part["shards"]], dict(part.get("failed", {})))
                  for name, part in data["splits"].items()}
        return cls(int(data["frames"]), int(data["size"]), dict(data["sampling"]), str(data["source"]), splits,
                   int(data["samples_per_shard"]))

    def split(self, name: str, folder: str | os.PathLike[str] = "") -> SplitManifest:
        if name not in self.splits or not self.splits[name].samples:
            held = ", ".join(f"{k} ({v.samples})" for k, v in self.splits.items()) or "none"
            raise ValueError(f"{folder or 'the shard folder'}: no {name} samples (splits held: {held})")
        return self.splits[name]
