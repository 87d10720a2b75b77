"""A stream of fresh synthetic training videos, written ahead of the model in chunks.

A fixed corpus is seen again and again, and a model can memorise it; the generator can make
as many scenes as training consumes. Chunk c holds groups c*G .. (c+1)*G - 1 of four twins
each (the same base / order / binding / both variants as the benchmark), and every group is a
pure function of (seed, group index): the stream is deterministic, a resumed run reads the
very chunks an uninterrupted one would, and a chunk can be regenerated if its files are lost.

Each video takes the path a test video takes: rendered, encoded to H.264 MP4, and decoded
with `pvl_search.media.video.read_clip` into the model's frames. Scenes never use the
(colour, shape, motion) triples held out by the evaluation corpus (`heldout_seed`), so its
held-out test queries stay unseen combinations.

On disk, `stream_dir/chunk-000012/` holds frames.npy, masks.npy, keys.json (a frame cache),
and records.json (captions, group, scene; labels are derived from the scene when read).
Chunks appear atomically (written to a temporary folder, then renamed), so a reader never
sees half of one.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from pvl_search.data.pairs import FrameCache, PairSet
from pvl_search.data.scene import Scene
from pvl_search.data.scene_captions import captions_for
from pvl_search.data.scene_labels import label_maps
from pvl_search.data.scene_render import write_mp4
from pvl_search.data.synth import group_variants, heldout_combinations, render_scene, sample_scene
from pvl_search.media.video import read_clip
from pvl_search.model.tokenizer import Tokenizer

_STREAM_TAG = 11  # keeps the stream's random numbers apart from plan_corpus's


@dataclass(frozen=True)
class StreamSpec:
    """Everything that decides a stream's content; stored beside the chunks and checked."""

    seed: int  # the stream's own seed; must differ from the evaluation corpus's seed
    heldout_seed: int  # seed of the evaluation corpus whose held-out triples stay out
    groups_per_chunk: int = 512  # 4 videos each
    size: int = 64  # rendered frame side, pixels (as `pvl-search synth`)
    fps: int = 8
    seconds: float = 3.0
    model_frames: int = 8  # frames decoded per video for the model
    model_size: int = 64  # their side, pixels

    @property
    def videos_per_chunk(self) -> int:
        return 4 * self.groups_per_chunk

    @property
    def frames(self) -> int:
        return int(round(self.fps * self.seconds))


def group_scenes(spec: StreamSpec, group: int) -> dict[str, Scene]:
    """The four twin scenes of stream group `group`."""
    rng = np.random.default_rng([spec.seed, _STREAM_TAG, group])
    base = sample_scene(rng, spec.frames, heldout=heldout_combinations(spec.heldout_seed))
    return group_variants(base)


def chunk_name(chunk: int) -> str:
    return f"chunk-{chunk:06d}"


class WriterStopped(Exception):
    """The process that wanted the chunk is gone; the half-written chunk is dropped."""


def write_chunk(stream_dir: str | Path, spec: StreamSpec, chunk: int,
                keep_going: Callable[[], bool] | None = None) -> Path:
    """Render, encode, decode and store chunk `chunk`; returns its folder (kept if complete).
    `keep_going` is asked before each group; False stops with WriterStopped."""
    stream_dir = Path(stream_dir)
    final = stream_dir / chunk_name(chunk)
    if (final / "records.json").exists():
        return final
    stream_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{chunk_name(chunk)}.", dir=stream_dir))
    try:
        n = spec.videos_per_chunk
        frames = np.zeros((n, spec.model_frames, spec.model_size, spec.model_size, 3), dtype=np.uint8)
        masks = np.zeros((n, spec.model_frames), dtype=bool)
        keys, records = [], []
        mp4 = work / "video.mp4"
        for g in range(chunk * spec.groups_per_chunk, (chunk + 1) * spec.groups_per_chunk):
            if keep_going is not None and not keep_going():
                raise WriterStopped(chunk)
            rng = np.random.default_rng([spec.seed, _STREAM_TAG, g, 1])
            count = int(rng.integers(2, 6))
            for variant, scene in group_scenes(spec, g).items():
                i = len(keys)
                write_mp4(mp4, render_scene(scene, spec.size), spec.fps)
                frames[i], masks[i] = read_clip(mp4, None, spec.model_frames, spec.model_size)
                key = f"stream{g:08d}_{variant}"
                keys.append(key)
                records.append({"key": key, "group": g, "variant": variant,
                                "captions": captions_for(scene, count, (spec.seed, _STREAM_TAG, g, 2)),
                                "scene": scene.to_dict()})
        mp4.unlink()
        np.save(work / "frames.npy", frames)
        np.save(work / "masks.npy", masks)
        (work / "keys.json").write_text(json.dumps(keys))
        (work / "records.json").write_text(json.dumps({"spec": asdict(spec), "chunk": chunk, "videos": records}))
        try:
            os.replace(work, final)
        except OSError:  # another writer finished the same (identical) chunk first
            if not (final / "records.json").exists():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final


def read_chunk(stream_dir: str | Path, spec: StreamSpec, chunk: int, tokenizer: Tokenizer,
               patch: int | None = None) -> PairSet:
    """Chunk `chunk` as a PairSet with groups and scene labels (and dense patch labels for a
    model with patch size `patch`); refuses another stream's chunk."""
    folder = Path(stream_dir) / chunk_name(chunk)
    info = json.loads((folder / "records.json").read_text())
    if info["spec"] != asdict(spec):
        raise ValueError(f"{folder}: written by another stream ({info['spec']}), not {asdict(spec)}")
    videos = info["videos"]
    labels, dense = label_maps({v["key"]: v["scene"] for v in videos}, spec.model_frames, spec.model_size, patch)
    return PairSet(FrameCache.open(folder), {v["key"]: v["captions"] for v in videos}, tokenizer,
                   groups={v["key"]: f"g{v['group']}" for v in videos}, labels=labels, token_labels=dense)


def _writer_main(stream_dir: str, spec: StreamSpec, first: int, last: int, ahead: int, parent: int) -> None:
    """Background writer: chunks first..last-1, at most `ahead` beyond the reader's position
    (the newest `reading` marker), so the disk holds what training is about to use."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    def parent_alive() -> bool:  # a killed trainer must not leave its writer behind
        return os.getppid() == parent

    marker = Path(stream_dir) / "reading"
    try:
        for chunk in range(first, last):
            while True:
                if not parent_alive():
                    return
                reading = int(marker.read_text()) if marker.exists() else first
                if chunk < reading + ahead:
                    break
                time.sleep(1.0)
            write_chunk(stream_dir, spec, chunk, parent_alive)
    except WriterStopped:
        return


class SceneStream:
    """Training data that changes every `passes` epochs: epoch e reads chunk e // passes.

    `for_epoch(e)` waits for that chunk, which a background process writes ahead of time.
    """

    def __init__(self, stream_dir: str | Path, spec: StreamSpec, text_length: int, *, passes: int = 1,
                 ahead: int = 2, keep: int = 2, patch: int | None = None) -> None:
        if spec.seed == spec.heldout_seed:
            raise ValueError("the stream's seed must differ from the evaluation corpus's seed")
        self.dir, self.spec, self.passes, self.ahead, self.keep = Path(stream_dir), spec, passes, ahead, keep
        self.tokenizer = Tokenizer(text_length)
        self.patch = patch  # give chunks dense patch labels for this patch size
        self._writer: multiprocessing.Process | None = None
        self._chunk: tuple[int, PairSet] | None = None

    def __len__(self) -> int:
        return self.spec.videos_per_chunk

    def start(self, first_epoch: int, epochs: int) -> None:
        """Start writing the chunks epochs first_epoch..epochs-1 need, in a background process."""
        self.dir.mkdir(parents=True, exist_ok=True)
        first, last = first_epoch // self.passes, (epochs - 1) // self.passes + 1
        (self.dir / "reading").write_text(str(first))
        ctx = multiprocessing.get_context("spawn")
        # Daemon: it ends with the training process, and never outlives it.
        args = (str(self.dir), self.spec, first, last, self.ahead, os.getpid())
        self._writer = ctx.Process(target=_writer_main, args=args, daemon=True)
        self._writer.start()

    def stop(self) -> None:
        if self._writer is not None and self._writer.is_alive():
            self._writer.terminate()
            self._writer.join(5)
        self._writer = None

    def for_epoch(self, epoch: int, on_wait: Callable[[], None] | None = None) -> PairSet:
        chunk = epoch // self.passes
        if self._chunk is not None and self._chunk[0] == chunk:
            return self._chunk[1]
        (self.dir / "reading").write_text(str(chunk))
        folder = self.dir / chunk_name(chunk)
        while not (folder / "records.json").exists():
            if self._writer is None:  # nobody will write it: do it here
                write_chunk(self.dir, self.spec, chunk)
                break
            if not self._writer.is_alive():  # chunks are pure functions of the spec: write it here
                write_chunk(self.dir, self.spec, chunk)
                break
            if on_wait:
                on_wait()
            time.sleep(0.5)
        self._chunk = (chunk, read_chunk(self.dir, self.spec, chunk, self.tokenizer, self.patch))
        for old in range(max(0, chunk - self.keep - 20), chunk - self.keep + 1):  # bound the disk used
            shutil.rmtree(self.dir / chunk_name(old), ignore_errors=True)
        return self._chunk[1]
