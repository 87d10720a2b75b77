"""Decode and encode on a Ray cluster, write in this process (`pvl-search index --ray ...`).

The driver plans exactly as a local run does (indexer/ingest/pipeline.py: scan, fingerprints, what
is new, changed or removed). The files to index are cut into small batches; Ray actors
(one model load each, one GPU each where asked) decode and encode a batch and send back
what the index stores: per segment the embedding, the rerank state, the latents when the
index keeps them and a thumbnail, plus the video's spans and metadata. Results are
re-ordered into plan order and handed to the run's one writer (ingest/writer.py), one video
per SQL transaction: SQL stays the source of truth and the vectors derived, as in a local run.

- Workers open the files at the paths the driver planned: every node needs the same
  shared filesystem. A worker that cannot open a planned file stops the run with one
  clear error naming the file and the worker's host.
- A worker process that dies mid-batch (killed, out of memory, a decoder crash) is
  restarted by Ray and the batch retried (`max_restarts`, `max_task_retries`). A batch
  that still fails is split into single files; a file that kills its worker again is
  recorded as failed, as a local run records a file that kills its decoder.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from indexer.errors import IndexStoreError
from indexer.ingest.options import IndexOptions
from indexer.ingest.produced import EncodedVideo, FailedVideo, Produced
from pvl_search import ray_connect
from pvl_search.ray_connect import RayConnectError

if TYPE_CHECKING:
    from indexer.encoding import ModelRunner

ACTOR_PREFIX = "pvl-encoder-"  # actor names: ACTOR_PREFIX + run id + "-" + worker number


@dataclass
class RayOptions:
    address: str = "local"  # "local" (start Ray here), "auto" (the running cluster) or "ray://HOST:PORT"
    workers: int = 2  # encoder actors
    gpus_per_worker: float = 0.0  # > 0: each actor gets that share of a GPU and runs the model there
    files_per_task: int = 2  # files decoded and encoded per actor call
    task_retries: int = 2  # Ray retries of a call whose worker died, before the batch is split
    model_dir: str | None = None  # the model folder as workers see it (None: the shipped model)
    dtype: str = "auto"


def _import_ray() -> Any:
    try:
        return ray_connect.import_ray()
    except RayConnectError as error:
        raise IndexStoreError(str(error)) from None


@dataclass
class RemoteVideo:
    """What a worker sends back for one file (the driver adds what it planned: stat, fingerprint)."""

    spans: list[tuple[float, float]] | None
    info: Any  # pvl_search.media.video.VideoInfo
    embeddings: np.ndarray  # (n, d)
    rerank_states: np.ndarray  # (n, D + H)
    latents: np.ndarray | None  # (n, N * D) when the index keeps them
    thumbnails: list[bytes | None] | None
    dtype: str  # what the worker's model ran in
    log: Any  # pvl_search.media.decode_worker.DecoderLog: what the decoder wrote to stderr
    patches: np.ndarray | None = None  # (n, M * D) when the index keeps patch tokens

    def __len__(self) -> int:
        return len(self.embeddings)


class Encoder:
    """A Ray actor: the model, loaded once, decoding and encoding batches of files."""

    def __init__(self, model_dir: str | None, fingerprint: str, device: str, dtype: str, settings: dict) -> None:
        import torch

        from indexer.encoding import ModelRunner

        if device == "cpu":
            torch.set_num_threads(1)  # one core per actor (num_cpus=1): more threads only spin
        self.runner = ModelRunner.from_folder(model_dir, device=device, dtype=dtype)
        if self.runner.fingerprint != fingerprint:
            raise IndexStoreError(
                f"the Ray worker on {socket.gethostname()} loaded another model ({model_dir or 'the shipped one'}: "
                f"weights {self.runner.fingerprint[:12]}..., the driver has {fingerprint[:12]}...)")
        self.settings = settings

    def pid(self) -> int:
        return os.getpid()

    def run(self, jobs: Sequence[tuple[int, str]]) -> list[tuple[int, str, Any]]:
        """[(key, path)] -> [(key, "ok", RemoteVideo) | (key, "failed", reason) |
        (key, "unreadable", "host: reason")]."""
        from pvl_search.media.decode_worker import captured_stderr, plan_windows
        from pvl_search.media.thumbnails import clip_thumbnail
        from pvl_search.media.video import VideoDecodeError, read_clips
        from pvl_search.media.windows import Windows

        s = self.settings
        config = self.runner.config
        out: list[tuple[int, str, Any]] = []
        decoded = []  # (key, spans, info, clips, log)
        for key, path in jobs:
            try:
                with open(path, "rb"):
                    pass
            except OSError as error:
                out.append((key, "unreadable", f"{socket.gethostname()}: {error.strerror or error}"))
                continue
            try:
                with captured_stderr() as log:  # FFmpeg's warnings, counted and logged by the writer
                    spans, info = plan_windows(Path(path), Windows(s["window_s"], s["stride_s"], s["shots"]))
                    clips = read_clips(path, spans, config.frames, config.frame_size, backend=s["backend"])
            except VideoDecodeError as error:
                out.append((key, "failed", error.reason))
                continue
            except Exception as error:  # noqa: BLE001 - any failure is this file's failure
                out.append((key, "failed", f"{type(error).__name__}: {error}"))
                continue
            decoded.append((key, spans, info, clips, log))
        frames = [c.frames for _, _, _, clips, _ in decoded for c in clips]
        masks = [c.mask for _, _, _, clips, _ in decoded for c in clips]
        parts = []
        for lo in range(0, len(frames), s["batch_size"]):  # clips of several files per encoder call
            parts.append(self.runner.encode_clips(np.stack(frames[lo : lo + s["batch_size"]]),
                                                  np.stack(masks[lo : lo + s["batch_size"]]),
                                                  keep_latents=s["store_latents"],
                                                  keep_patches=s["store_patches"]))
        if parts:
            emb = np.concatenate([p.embeddings for p in parts])
            states = np.concatenate([p.rerank_states for p in parts])
            lat = np.concatenate([p.latents for p in parts]) if s["store_latents"] else None
            pat = np.concatenate([p.patches for p in parts]) if s["store_patches"] else None
        row = 0
        for key, spans, info, clips, log in decoded:
            n = len(clips)
            thumbs = [clip_thumbnail(c.frames, c.mask) for c in clips] if s["thumbnails"] else None
            out.append((key, "ok", RemoteVideo(spans, info, emb[row : row + n], states[row : row + n],
                                               None if lat is None else lat[row : row + n], thumbs,
                                               self.runner.dtype_name, log,
                                               None if pat is None else pat[row : row + n])))
            row += n
        return out


def connect(address: str, workers: int, gpus_per_worker: float) -> bool:
    """Join (or, for "local", start) Ray unless this process already did; True when this
    call started it (and so must shut it down). Every failure is one IndexStoreError line
    (pvl_search/ray_connect.py says them; a malformed address stays a ValueError)."""
    try:
        return ray_connect.connect(address, workers, gpus_per_worker)
    except RayConnectError as error:
        raise IndexStoreError(str(error)) from None


def _start_actors(ray: Any, runner: ModelRunner, options: IndexOptions) -> list[Any]:
    """One Encoder actor per worker, each with the model loaded; a worker that cannot load it
    fails here, once, not file by file."""
    ro = options.ray
    run_id = uuid.uuid4().hex[:8]
    settings = {"window_s": options.window_s, "stride_s": options.stride_s, "shots": options.shots,
                "batch_size": options.batch_size,
                "backend": options.backend, "store_latents": bool(options.store_latents),
                "store_patches": bool(options.store_patches),
                "thumbnails": options.thumbnails}
    device = "cuda" if ro.gpus_per_worker > 0 else "cpu"
    actor_class = ray.remote(Encoder)
    actors = [
        actor_class.options(name=f"{ACTOR_PREFIX}{run_id}-{i}", num_cpus=1, num_gpus=ro.gpus_per_worker,
                            max_restarts=-1, max_task_retries=ro.task_retries)
        .remote(ro.model_dir, runner.fingerprint, device, ro.dtype, settings)
        for i in range(ro.workers)
    ]
    try:
        ray.get([actor.pid.remote() for actor in actors])
    except ray.exceptions.RayActorError as error:
        for actor in actors:
            ray.kill(actor, no_restart=True)
        raise IndexStoreError(f"Ray workers could not start: {str(error).strip().splitlines()[-1]}") from None
    return actors


def _batch_results(ray: Any, ref: Any, batch: list[int], attempt: int) -> list[tuple[int, str, Any]] | None:
    """A finished call's results; None when its worker died and the batch should be tried
    again file by file; a file that killed its worker again is a failure."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayActorError:
        if len(batch) > 1 or attempt == 0:
            return None
        return [(batch[0], "failed", "the worker process died on this file each time it was tried")]
    except ray.exceptions.RayTaskError as error:
        cause = error.cause if isinstance(getattr(error, "cause", None), Exception) else error
        if isinstance(cause, IndexStoreError):
            raise cause from None
        raise IndexStoreError(f"a Ray worker failed: {str(cause).splitlines()[0]}") from None


def _result(kind: str, payload: Any, planned: tuple[Path, os.stat_result, str]) -> Produced:
    """One file's result as the writer takes it."""
    path, stat, fingerprint = planned
    if kind == "unreadable":
        raise IndexStoreError(f"a Ray worker cannot open {path} ({payload}): every worker must see the "
                              "files at the same paths as this machine (a shared filesystem)")
    if kind == "failed":
        return FailedVideo(str(path), stat, fingerprint, payload)
    remote: RemoteVideo = payload
    return EncodedVideo(str(path), stat, fingerprint, remote.spans, remote.info, remote.embeddings,
                        remote.rerank_states, remote.latents, remote.thumbnails, remote.dtype,
                        remote.log.lines, remote.log.text, remote.patches)


def _remote_results(
    todo: list[tuple[Path, os.stat_result, str]],
    runner: ModelRunner,
    options: IndexOptions,
) -> Iterator[Produced]:
    """Every planned file's result, in plan order."""
    ray = _import_ray()
    ro = options.ray
    actors = _start_actors(ray, runner, options)
    paths = [str(path) for path, _, _ in todo]
    keys = list(range(len(todo)))
    queue = deque(  # (keys, attempt): attempt 1 once a batch was split after its worker kept dying
        (keys[lo : lo + ro.files_per_task], 0) for lo in range(0, len(keys), ro.files_per_task))
    window = 4 * ro.workers * ro.files_per_task  # results held ahead of the writer, at most
    free = deque(actors * 2)  # two calls in flight per actor: one decodes while one returns
    in_flight: dict[Any, tuple[Any, list[int], int]] = {}
    ready: dict[int, Any] = {}
    next_key = 0
    try:
        while next_key < len(keys):
            while queue and free and queue[0][0][0] < next_key + window:
                batch, attempt = queue.popleft()
                actor = free.popleft()
                ref = actor.run.remote([(k, paths[k]) for k in batch])
                in_flight[ref] = (actor, batch, attempt)
            done, _ = ray.wait(list(in_flight), num_returns=1)
            ref = done[0]
            actor, batch, attempt = in_flight.pop(ref)
            free.append(actor)
            results = _batch_results(ray, ref, batch, attempt)
            if results is None:  # split (or retried once more alone): find the file that kills workers
                queue.extendleft(([k], 1) for k in reversed(batch))
                continue
            for key, kind, payload in results:
                ready[key] = _result(kind, payload, todo[key])
            while next_key in ready:
                yield ready.pop(next_key)
                next_key += 1
    finally:
        for actor in actors:
            ray.kill(actor, no_restart=True)


def ray_encoded(
    todo: list[tuple[Path, os.stat_result, str]], runner: ModelRunner, options: IndexOptions
) -> Iterator[Produced]:
    """Every planned file, decoded and encoded on Ray, in plan order."""
    if not todo:
        return
    ro = options.ray
    started = connect(ro.address, ro.workers, ro.gpus_per_worker)
    try:
        yield from _remote_results(todo, runner, options)
    finally:
        if started:
            _import_ray().shutdown()
