"""Write the videos of a captions file as WebDataset shards (format.py): `pvl-search shards`.

Each video becomes one sample holding exactly the frames the training frame cache decodes for
it (pvl_search.data.pairs.build_frame_cache): one clip over the whole video, decoded in
crash-proof worker processes (media/decode_pool.py). A file that cannot be decoded (missing,
corrupt, a decoder that crashes or hangs) is left out of its shard and recorded with its reason;
it never stops the run.

Crash safety: a shard is written to `NAME.tmp` and renamed into place once complete; then its
sidecar `NAME.json` (samples, bytes, sha256, failed videos, the settings and a digest of the
records it was planned from), the same way. A rerun keeps every shard whose tar and sidecar are
both there and agree, writes the others again, removes leftover temporary files, and writes
`manifest.json` last, atomically, from the sidecars. Shard bytes are deterministic, so a writer
killed and run again leaves the same files and the same manifest sha256 as one never stopped.

Parallelism (decode_write.py): locally, DecodePool's workers decode ahead while this process writes the shards in
order. With `ray_address`, each missing shard is one Ray task that decodes its videos (a
one-worker DecodePool inside, so a decoder crash is still one failed video) and writes its tar
and sidecar into `out` itself: every node must see `out` and the videos at the same paths (a
shared filesystem, as for `pvl-search index --ray`). The driver waits and writes the manifest.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pvl_search.data.captions import SPLITS, CaptionRecord, load_captions
from pvl_search.durable import fsync_dir
from pvl_search.shards.decode_write import SIDECAR, Item, ShardPlan, write_locally, write_on_ray
from pvl_search.shards.decode_write import ShardWriteError as ShardWriteError  # re-exported: write_shards raises it
from pvl_search.shards.format import (
    FORMAT,
    MANIFEST,
    Manifest,
    ShardEntry,
    SplitManifest,
    sample_key,
)

# How DecodePool (media/video.py iter_clips, decoders.sample_positions) takes the one clip per video.
FRAME_SAMPLING = ("uniform over the whole video: the middle frame of each of F equal runs of its frames; "
                  "a video with fewer than F frames keeps them all, the rest black and masked")
# What this writer leaves half-written when killed: shard and sidecar temporaries, the manifest's.
_LEFTOVER = re.compile(r"^[A-Za-z]+-\d{6}\.tar(\.json)?\.tmp$|^" + re.escape(MANIFEST) + r"\.tmp$")
_SHARD_FILE = re.compile(r"^([A-Za-z]+)-(\d{6})\.tar(\.json)?$")


@dataclass
class SplitReport:
    shards: int
    samples: int  # videos stored
    failed: dict[str, str] = field(default_factory=dict)  # video_id -> why it could not be decoded


@dataclass
class ShardReport:
    """What `write_shards` left in `out` (the whole folder, not only this run's part)."""

    out: str
    frames: int
    size: int
    samples_per_shard: int
    splits: dict[str, SplitReport]
    written_now: int  # shards this run wrote
    already_there: int  # complete shards an earlier run left, kept as they were
    manifest_sha256: str
    seconds: float

    @property
    def samples(self) -> int:
        return sum(s.samples for s in self.splits.values())

    @property
    def failed(self) -> int:
        return sum(len(s.failed) for s in self.splits.values())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"samples": self.samples, "failed": self.failed}


def write_shards(
    captions: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    frames: int,
    size: int,
    samples_per_shard: int = 256,
    splits: Sequence[str] | None = None,
    workers: int = 2,
    ray_address: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> ShardReport:
    """Write (or finish) the shard folder `out` for a captions file; see the module doc.

    `splits`: only these (default: every split the file has). `workers`: local decoder processes,
    or the CPUs of a Ray started with ray_address="local" ("auto", "ray://HOST:PORT": a running
    cluster). `progress(done_videos, total_videos)`. A folder written with other settings is
    refused (ValueError naming the difference); the same settings again finish it, or change
    nothing when it is complete. Memory: one shard's frames, samples_per_shard x F x S x S x 3 bytes.
    Raises ValueError (bad arguments, captions file, settings), OSError, ShardWriteError and, from
    Ray, pvl_search.ray_connect.RayConnectError."""
    started = time.perf_counter()
    for name, value in (("frames", frames), ("size", size), ("samples_per_shard", samples_per_shard),
                        ("workers", workers)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    plans = _plan(captions, load_captions(captions), splits, samples_per_shard)
    folder = Path(out).absolute()  # Ray workers run elsewhere: they get absolute paths
    folder.mkdir(parents=True, exist_ok=True)
    settings = {"frames": frames, "size": size, "samples_per_shard": samples_per_shard, "source": str(captions),
                "sampling": sampling(frames, size)}
    with _exclusive(folder):
        settings["source"] = _check_manifest(folder, settings, list(plans))
        sidecars: dict[str, dict[str, Any]] = {}
        todo: list[ShardPlan] = []
        for plan in (p for ps in plans.values() for p in ps):  # a refusal comes before any file is touched
            kept = _complete(folder, plan, settings)
            if kept is None:
                todo.append(plan)
            else:
                sidecars[plan.name] = kept
        _remove_leftovers(folder, plans)
        if todo:  # the old manifest names shards about to change: readers must not trust it meanwhile
            (folder / MANIFEST).unlink(missing_ok=True)
        already_there = len(sidecars)
        total = sum(len(p.items) for ps in plans.values() for p in ps)
        done = total - sum(len(p.items) for p in todo)
        if progress:
            progress(done, total)

        def tick(videos: int) -> None:
            nonlocal done
            done += videos
            if progress:
                progress(done, total)

        if ray_address is None:
            sidecars.update(write_locally(folder, todo, settings, workers, tick))
        else:
            sidecars.update(write_on_ray(ray_address, folder, todo, settings, workers, tick))
        manifest = _manifest(settings, plans, sidecars)
        with contextlib.suppress(ValueError):  # a no-op rerun leaves manifest.json untouched
            if Manifest.read(folder).to_dict() == manifest.to_dict():
                return _report(folder, manifest, len(todo), already_there, started)
        fsync_dir(folder)  # the shards' renames are on disk before a manifest names them
        manifest.write(folder)
    return _report(folder, manifest, len(todo), already_there, started)


def sampling(frames: int, size: int) -> dict[str, Any]:
    """`Manifest.sampling`: how the clip of each video was taken."""
    return {"clips_per_video": 1, "frames": frames, "size": size, "fit": "crop", "span": "whole video",
            "frame_sampling": FRAME_SAMPLING}


# -------------------------------------------------------------------------------- planning


def _plan(captions: str | os.PathLike[str], records: list[CaptionRecord], splits: Sequence[str] | None,
          per_shard: int) -> dict[str, list[ShardPlan]]:
    """The shards of each split asked for, in SPLITS order; records keep the file's order."""
    for split in splits or ():
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    present = {r.split for r in records}
    wanted = [s for s in SPLITS if s in set(splits)] if splits else [s for s in SPLITS if s in present]
    for split in wanted:
        if split not in present:
            held = ", ".join(s for s in SPLITS if s in present) or "none"
            raise ValueError(f"{captions}: no videos in the {split} split (splits there: {held})")
    if not wanted:
        raise ValueError(f"{captions}: lists no videos")
    plans: dict[str, list[ShardPlan]] = {}
    for split in wanted:
        items = [Item(sample_key(split, i), r.video_id, str(r.path), tuple(r.captions), r.meta)
                 for i, r in enumerate(r for r in records if r.split == split)]
        plans[split] = [ShardPlan(split, j, tuple(items[lo : lo + per_shard]))
                        for j, lo in enumerate(range(0, len(items), per_shard))]
    return plans


# ------------------------------------------------------------------------- the folder's state


@contextlib.contextmanager
def _exclusive(folder: Path) -> Iterator[None]:
    """One writer per folder: a lock on the folder itself (no lock file to leave behind; the
    kernel drops it when a killed writer's process goes)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"{folder}: another shard writer is writing there now") from None
        yield
    finally:
        os.close(fd)


def _same_source(recorded: str, given: str) -> bool:
    """The captions file recorded, whatever spelling of its path this run uses."""
    if recorded == given:
        return True
    try:
        return os.path.samefile(recorded, given)
    except OSError:
        return False


def _differences(recorded: dict[str, Any], wanted: dict[str, Any]) -> tuple[list[str], list[str]]:
    """The settings that differ, as `name=value` for the recorded and the wanted side."""
    def view(key: str, value: Any) -> Any:
        if key == "sampling" and isinstance(value, dict):  # its frames and size are compared on their own
            return json.dumps({k: v for k, v in value.items() if k not in ("frames", "size")}, sort_keys=True)
        return ",".join(value) if key == "splits" else value

    keys = [k for k in wanted if k in recorded and (not _same_source(recorded[k], wanted[k]) if k == "source"
                                                    else view(k, recorded[k]) != view(k, wanted[k]))]
    return [f"{k}={view(k, recorded[k])}" for k in keys], [f"{k}={view(k, wanted[k])}" for k in keys]


def _refuse(folder: Path, what: str, recorded: dict[str, Any], wanted: dict[str, Any]) -> None:
    old, new = _differences(recorded, wanted)
    if old:
        raise ValueError(f"{folder}: {what} {', '.join(old)}; this run asks for {', '.join(new)} "
                         "(rerun with the same settings, or write to another folder)")


def _check_manifest(folder: Path, settings: dict[str, Any], splits: list[str]) -> str:
    """Refuse a folder whose manifest says other settings; the source path as to record it."""
    if not (folder / MANIFEST).exists():
        return settings["source"]
    manifest = Manifest.read(folder)
    recorded = {"frames": manifest.frames, "size": manifest.size, "samples_per_shard": manifest.samples_per_shard,
                "source": manifest.source, "sampling": manifest.sampling, "splits": sorted(manifest.splits)}
    _refuse(folder, "holds shards written with", recorded, settings | {"splits": sorted(splits)})
    return manifest.source  # an equivalent spelling keeps the recorded one: a rerun changes nothing


def _remove_leftovers(folder: Path, plans: dict[str, list[ShardPlan]]) -> None:
    """Temporary files of a killed run, and shards past the end of a split that has shrunk."""
    for entry in os.scandir(folder):
        if _LEFTOVER.match(entry.name):
            os.unlink(entry.path)
            continue
        found = _SHARD_FILE.match(entry.name)
        if found and found[1] in plans and int(found[2]) >= len(plans[found[1]]):
            os.unlink(entry.path)


def _complete(folder: Path, plan: ShardPlan, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The sidecar of a shard an earlier run finished for this plan, or None to write it (again).

    The tar's size is checked, not its hash: both files were renamed into place only once
    complete, and hashing every kept shard would make resuming as slow as reading the dataset."""
    try:
        sidecar = json.loads((folder / (plan.name + SIDECAR)).read_text())
        tar_bytes = (folder / plan.name).stat().st_size
    except (OSError, ValueError):
        return None
    if not isinstance(sidecar, dict) or sidecar.get("format") != FORMAT:
        return None
    _refuse(folder, f"has {plan.name} written with", sidecar.get("settings", {}), settings)
    if sidecar.get("plan") != plan.digest() or sidecar.get("bytes") != tar_bytes:
        return None
    return sidecar


# ------------------------------------------------------------------------------- writing


# --------------------------------------------------------------------------------- result


def _manifest(settings: dict[str, Any], plans: dict[str, list[ShardPlan]],
              sidecars: dict[str, dict[str, Any]]) -> Manifest:
    splits = {}
    for split, shard_plans in plans.items():
        entries, failed = [], {}
        for plan in shard_plans:
            sidecar = sidecars[plan.name]
            entries.append(ShardEntry(plan.name, int(sidecar["samples"]), str(sidecar["sha256"])))
            failed.update(sidecar["failed"])
        splits[split] = SplitManifest(entries, failed)
    return Manifest(settings["frames"], settings["size"], settings["sampling"], settings["source"], splits,
                    settings["samples_per_shard"])


def _report(folder: Path, manifest: Manifest, written_now: int, already_there: int, started: float) -> ShardReport:
    splits = {name: SplitReport(len(part.shards), part.samples, dict(part.failed))
              for name, part in manifest.splits.items()}
    return ShardReport(str(folder), manifest.frames, manifest.size, manifest.samples_per_shard, splits, written_now,
                       already_there, manifest.sha256, time.perf_counter() - started)
