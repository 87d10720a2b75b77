"""Decode a shard's videos and write its files: the part of the shard writer (writer.py) that
runs once per missing shard, here or on Ray.

Locally one DecodePool streams every missing shard's videos, so its workers never wait at a
shard's end, and this process writes the shards in order. On Ray each shard is one task that
decodes in a one-worker DecodePool (a decoder crash stays one failed video) and writes into the
shard folder itself. Either way a shard is its tar, then its sidecar, each written to NAME.tmp
and renamed into place only once complete.
"""

from __future__ import annotations

import hashlib
import json
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pvl_search.durable import write_atomically
from pvl_search.ray_connect import first_line
from pvl_search.shards.format import FORMAT, Sample, file_sha256, shard_name, write_samples

SIDECAR = ".json"  # SPLIT-000000.tar -> SPLIT-000000.tar.json


class ShardWriteError(RuntimeError):
    """A Ray task could not write its shard (not a video that failed: those are recorded)."""


@dataclass(frozen=True)
class Item:
    key: str
    video_id: str
    path: str
    captions: tuple[str, ...]
    meta: dict[str, Any]


@dataclass(frozen=True)
class ShardPlan:
    """Shard `number` of `split`: the records at positions number*P .. number*P + P - 1."""

    split: str
    number: int
    items: tuple[Item, ...]

    @property
    def name(self) -> str:
        return shard_name(self.split, self.number)

    def digest(self) -> str:
        """What the shard stores besides frames: a changed captions file redoes the shards it touches.
        Paths stay out, so a corpus moved to another folder is not decoded again."""
        planned = [[i.key, i.video_id, list(i.captions), i.meta] for i in self.items]
        return hashlib.sha256(json.dumps(planned, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def write_locally(folder: Path, todo: list[ShardPlan], settings: dict[str, Any], workers: int,
                  tick: Callable[[int], None]) -> dict[str, dict[str, Any]]:
    """Decode in DecodePool workers, ahead of this process writing the shards in order."""
    if not todo:
        return {}
    from pvl_search.media.decode_pool import DecodePool

    written = {}
    jobs = ((item.key, item.path, None, settings["frames"], settings["size"]) for p in todo for item in p.items)
    with DecodePool(workers=workers) as pool:
        results = pool.imap(jobs)  # one stream over every shard: workers never idle at a shard's end
        for plan in todo:
            outcomes = []
            for item in plan.items:
                key, result = next(results)
                assert key == item.key  # imap keeps submission order
                outcomes.append(result)
                tick(1)
            written[plan.name] = _write_shard(folder, plan, outcomes, settings)
    return written


def write_on_ray(address: str, folder: Path, todo: list[ShardPlan], settings: dict[str, Any], workers: int,
                 tick: Callable[[int], None]) -> dict[str, dict[str, Any]]:
    """One Ray task per missing shard; each writes its files into `folder` itself."""
    if not todo:  # a finished folder needs no cluster
        return {}
    from pvl_search.ray_connect import connect, import_ray

    started = connect(address, workers, 0.0)
    ray = import_ray()
    written = {}
    try:
        # A task whose worker process dies (a node lost, out of memory) is run again from scratch.
        task = ray.remote(num_cpus=1, max_retries=2)(_shard_task)
        pending = {task.remote(str(folder), plan, settings): plan for plan in todo}
        while pending:
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            plan = pending.pop(ref)
            try:
                sidecar, host = ray.get(ref)
            except ray.exceptions.RayError as error:
                cause = getattr(error, "cause", None)
                reason = first_line(cause if isinstance(cause, BaseException) else error)
                raise ShardWriteError(f"the Ray task writing {folder / plan.name} failed: {reason}") from None
            if not _same_size(folder / plan.name, sidecar["bytes"]):
                raise ShardWriteError(f"the Ray worker on {host} wrote {folder / plan.name} where this machine does "
                                      "not see it: the shard folder must be on a filesystem every node shares")
            written[plan.name] = sidecar
            tick(len(plan.items))
    finally:
        if started:
            ray.shutdown()
    return written


def _same_size(path: Path, size: int) -> bool:
    try:
        return path.stat().st_size == size
    except OSError:
        return False


def _shard_task(folder: str, plan: ShardPlan, settings: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """A Ray task: decode one shard's videos in a one-worker DecodePool and write the shard."""
    from pvl_search.media.decode_pool import DecodePool

    jobs = [(item.key, item.path, None, settings["frames"], settings["size"]) for item in plan.items]
    with DecodePool(workers=1) as pool:
        outcomes = [result for _, result in pool.imap(jobs)]
    return _write_shard(Path(folder), plan, outcomes, settings), socket.gethostname()


def _write_shard(folder: Path, plan: ShardPlan, outcomes: list[Any], settings: dict[str, Any]) -> dict[str, Any]:
    """Write the tar, then its sidecar, each atomically; returns the sidecar."""
    samples, failed = [], {}
    for item, result in zip(plan.items, outcomes, strict=True):
        if isinstance(result, Exception):  # VideoDecodeError: "path: reason"
            failed[item.video_id] = first_line(result)
            continue
        clip = result.clips[0]
        samples.append(Sample(item.key, item.video_id, clip.frames, clip.mask, list(item.captions), item.meta))
    path = folder / plan.name
    sidecar_path = folder / (plan.name + SIDECAR)
    sidecar_path.unlink(missing_ok=True)  # an older sidecar must not vouch for a tar half replaced
    write_atomically(path, lambda f: write_samples(f, samples))
    sidecar = {"format": FORMAT, "name": plan.name, "split": plan.split, "number": plan.number,
               "samples": len(samples), "bytes": path.stat().st_size, "sha256": file_sha256(path),
               "failed": failed, "plan": plan.digest(), "settings": settings}
    text = json.dumps(sidecar, indent=1, sort_keys=True, ensure_ascii=False) + "\n"
    write_atomically(sidecar_path, lambda f: f.write(text.encode("utf-8")))
    return sidecar


