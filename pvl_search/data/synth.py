"""Synthetic video-caption benchmark: real MP4 files whose captions can only be matched by
understanding motion, temporal order and attribute binding.

No pretrained weights or public video datasets can be downloaded here, so the project carries
its own honest benchmark. Scenes come in groups of four that differ in one factor each:

    base      a red circle moves left, then a blue square grows
    order     a blue square grows, then a red circle moves left       (same events, swapped in time)
    binding   a blue circle moves left, then a red square grows       (colours swapped between objects)
    both      a red square grows, then a blue circle moves left       (both swaps)

So one frame cannot tell `base` from `order`, and a bag of words cannot tell `base` from
`binding`. The test split also holds out (colour, shape, motion) triples that no training or
validation video contains, to measure compositional generalisation.

A `Scene` (scene.py) is a complete, JSON-serialisable description: `render_scene` is a pure
function of it, so the captions file's `meta["scene"]` reproduces every video exactly.

This module holds the benchmark's vocabulary, scene sampling and variants, `render_scene` and
the corpus writer; the pieces they are built from live beside it: scene.py (the data types),
scene_layout.py (random placement and timing), scene_captions.py (caption wording) and
scene_render.py (shape masks, backgrounds, MP4 encoding).
"""

from __future__ import annotations

import contextlib
import itertools
import multiprocessing
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from pvl_search.data.captions import CaptionRecord, write_captions
from pvl_search.data.scene import STILL, Event, ObjectState, Scene
from pvl_search.data.scene_captions import captions_for
from pvl_search.data.scene_layout import event_amount, event_windows, place_object, sample_background
from pvl_search.data.scene_render import render_background, shape_mask, write_mp4

SHAPES = ("circle", "square", "triangle", "ring", "cross")
# Saturated object colours, far (in RGB) from each other and from the grey-ish backgrounds,
# so that a colour mask over decoded yuv420p frames still finds each object. A new colour
# also needs its words in scene_captions._COLOUR_WORDS.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (40, 180, 60),
    "blue": (40, 80, 225),
    "yellow": (240, 225, 40),
    "purple": (150, 50, 190),
    "orange": (245, 140, 20),
}
MOTIONS = ("left", "right", "up", "down", "grows", "shrinks", "appears", "disappears")
VARIANTS = ("base", "order", "binding", "both")
# For each variant, the group member that differs from it in exactly one factor.
_TWINS = {"base": {"order": "order", "binding": "binding"}, "order": {"order": "base", "binding": "both"},
          "binding": {"order": "both", "binding": "base"}, "both": {"order": "binding", "binding": "order"}}
SPLITS = ("train", "val", "test")
FACTORS = ("order", "binding", "heldout")

_PIXEL_NOISE = 3.0  # std of the per-frame, per-pixel noise
_HELDOUT_SHARE = 0.1  # share of (colour, shape, motion) triples held out for test
_HELDOUT_TEST_GROUPS = 0.5  # share of test groups built around a held-out triple
MIN_FRAMES = 12


# --------------------------------------------------------------------------- object state


def _progress(event: Event, t: int) -> float:
    return float(np.clip((t - event.start) / max(event.end - event.start, 1), 0.0, 1.0))


def object_state(scene: Scene, obj: int, t: int) -> ObjectState:
    """Where object `obj` is at frame t: the one definition both renderer and tests use."""
    o = scene.objects[obj]
    x, y, r, visible = o.x, o.y, o.radius, True
    for e in scene.events:
        if e.obj != obj:
            continue
        p = _progress(e, t)
        if e.motion == "left":
            x -= e.amount * p
        elif e.motion == "right":
            x += e.amount * p
        elif e.motion == "up":
            y -= e.amount * p
        elif e.motion == "down":
            y += e.amount * p
        elif e.motion in ("grows", "shrinks"):
            r *= 1.0 + (e.amount - 1.0) * p
        elif e.motion == "appears":
            visible = p >= 0.5
        elif e.motion == "disappears":
            visible = p < 0.5
    return ObjectState(x, y, r, visible)


# ------------------------------------------------------------------------------ sampling


def _try_scene(rng: np.random.Generator, frames: int, forced: tuple[str, str, str] | None) -> Scene | None:
    with_still = rng.random() < 0.35
    colours = [str(c) for c in rng.permutation(list(COLOURS))[: 2 + with_still]]
    shapes = [str(s) for s in rng.permutation(SHAPES)[:2]]
    motions = [str(m) for m in rng.choice(MOTIONS, size=2)]
    if forced is not None:
        colours = [forced[0]] + [c for c in colours if c != forced[0]][: 1 + with_still]
        shapes = [forced[1]] + [s for s in shapes if s != forced[1]][:1]
        motions[0] = forced[2]
    if with_still:
        shapes.append(str(SHAPES[int(rng.integers(len(SHAPES)))]))
        motions.append(STILL)
    amounts = [event_amount(rng, m) for m in motions]
    taken: list[tuple[float, ...]] = []
    objects = []
    for colour, shape, motion, amount in zip(colours, shapes, motions, amounts):
        obj = place_object(rng, shape, colour, motion, amount, taken)
        if obj is None:
            return None
        objects.append(obj)
    (s1, e1), (s2, e2) = event_windows(rng, frames)
    events = (Event(0, motions[0], s1, e1, amounts[0]), Event(1, motions[1], s2, e2, amounts[1]))
    return Scene(tuple(objects), events, sample_background(rng), int(rng.integers(2**31)), frames)


def sample_scene(rng: np.random.Generator, frames: int, *, heldout: frozenset[tuple[str, str, str]] = frozenset(),
                 forced: tuple[str, str, str] | None = None) -> Scene:
    """A base scene whose whole group avoids `heldout`, or is built around the `forced` triple."""
    for _ in range(1000):
        scene = _try_scene(rng, frames, forced)
        if scene is None:
            continue
        group_triples = set().union(*(v.triples() for v in group_variants(scene).values()))
        if forced is not None or not group_triples & heldout:
            return scene
    raise RuntimeError("could not place objects; the frame is too small for the scene")


def order_swapped(scene: Scene) -> Scene:
    """Same objects and timing, but the two actors act in the other order."""
    first, second = scene.events
    return replace(scene, events=(
        replace(first, obj=second.obj, motion=second.motion, amount=second.amount),
        replace(second, obj=first.obj, motion=first.motion, amount=first.amount),
    ))


def binding_swapped(scene: Scene) -> Scene:
    """Same layout and events, but the two actors trade colours."""
    a, b = scene.objects[0], scene.objects[1]
    return replace(scene, objects=(replace(a, colour=b.colour), replace(b, colour=a.colour)) + scene.objects[2:])


def group_variants(base: Scene) -> dict[str, Scene]:
    order = order_swapped(base)
    return {"base": base, "order": order, "binding": binding_swapped(base), "both": binding_swapped(order)}


def heldout_combinations(seed: int) -> frozenset[tuple[str, str, str]]:
    """The (colour, shape, motion) triples that only test videos may contain."""
    triples = list(itertools.product(COLOURS, SHAPES, MOTIONS))
    rng = np.random.default_rng([seed, 1])
    chosen = rng.choice(len(triples), size=max(1, round(len(triples) * _HELDOUT_SHARE)), replace=False)
    return frozenset(triples[i] for i in sorted(chosen))


# ----------------------------------------------------------------------------- rendering


def render_scene(scene: Scene, size: int) -> np.ndarray:
    """All frames of a scene, (T, size, size, 3) uint8 RGB, deterministic in the scene alone."""
    video = np.repeat(render_background(scene.background, size)[None], scene.frames, axis=0)  # (T, H, W, 3)
    centres = np.arange(size, dtype=np.float32) + 0.5
    for t in range(scene.frames):
        for i, obj in enumerate(scene.objects):
            st = object_state(scene, i, t)
            if not st.visible:
                continue
            cx, cy, r = st.x * size, st.y * size, st.radius * size
            x0, x1 = max(int(cx - r) - 1, 0), min(int(cx + r) + 2, size)
            y0, y1 = max(int(cy - r) - 1, 0), min(int(cy + r) + 2, size)
            mask = shape_mask(obj.shape, centres[None, x0:x1] - cx, centres[y0:y1, None] - cy, r)
            video[t, y0:y1, x0:x1][mask] = COLOURS[obj.colour]
    # Uniform noise with the intended std: six times cheaper to draw than Gaussian.
    noise = np.random.default_rng(scene.noise_seed).random(video.shape, dtype=np.float32)
    video += (noise - 0.5) * (_PIXEL_NOISE * 12**0.5)
    return np.clip(video, 0, 255, out=video).astype(np.uint8)


# ------------------------------------------------------------------------------- corpus


@dataclass(frozen=True)
class PlannedVideo:
    """One video as planned before rendering (plan_corpus is cheap: no pixels)."""

    video_id: str
    group: int
    variant: str
    split: str
    scene: Scene
    captions: list[str]
    hard_negatives: dict[str, str]  # factor -> video_id of the twin differing only in it
    heldout: list[tuple[str, str, str]]  # held-out triples this video contains


@dataclass
class CorpusSummary:
    """What generate_corpus wrote; the CLI prints it."""

    out_dir: Path
    captions_path: Path
    videos: int
    groups: int
    captions: int
    bytes_on_disk: int  # videos plus captions file
    splits: dict[str, int]  # videos per split
    factors: dict[str, dict[str, int]]  # factor -> split -> videos with that hard negative / held-out triple
    heldout_combinations: list[tuple[str, str, str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["out_dir"], d["captions_path"] = str(self.out_dir), str(self.captions_path)
        return d


def _assign_splits(groups: int, seed: int, fractions: tuple[float, float, float]) -> list[str]:
    """Whole groups go to one split, so a test video's twins are test videos too."""
    n_val = round(groups * fractions[1])
    n_test = round(groups * fractions[2])
    if groups >= 3:
        n_val = max(n_val, 1 if fractions[1] > 0 else 0)
        n_test = max(n_test, 1 if fractions[2] > 0 else 0)
    order = np.random.default_rng([seed, 2]).permutation(groups)
    splits = ["train"] * groups
    for rank, g in enumerate(order):
        if rank < n_test:
            splits[g] = "test"
        elif rank < n_test + n_val:
            splits[g] = "val"
    return splits


def plan_corpus(n: int, seed: int, frames: int,
                fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
                heldout_seed: int | None = None) -> list[PlannedVideo]:
    """Every video's scene, captions and split, deterministic in (n, seed, frames); the held-out
    triples are `heldout_seed`'s (default: `seed`'s)."""
    heldout = heldout_combinations(seed if heldout_seed is None else heldout_seed)
    full_groups, rest = divmod(n, len(VARIANTS))
    splits = _assign_splits(full_groups, seed, fractions) + ["train"] * (rest > 0)  # a partial group trains
    test_groups = [g for g, s in enumerate(splits) if s == "test"]
    forced_groups = set(test_groups[: int(np.ceil(len(test_groups) * _HELDOUT_TEST_GROUPS))])
    heldout_list = sorted(heldout)
    planned: list[PlannedVideo] = []
    for g, split in enumerate(splits):
        rng = np.random.default_rng([seed, 3, g])
        forced = heldout_list[int(rng.integers(len(heldout_list)))] if g in forced_groups else None
        base = sample_scene(rng, frames, heldout=frozenset() if split == "test" else heldout, forced=forced)
        members = list(group_variants(base).items())[: len(VARIANTS) if g < full_groups else rest]
        ids = {variant: f"synth{g:05d}_{variant}" for variant, _ in members}
        count = int(rng.integers(2, 6))
        for variant, scene in members:
            negatives = {f: ids[v] for f, v in _TWINS[variant].items() if v in ids}
            planned.append(PlannedVideo(
                ids[variant], g, variant, split, scene, captions_for(scene, count, (seed, 4, g)),
                negatives, sorted(scene.triples() & heldout),
            ))
    return planned


def _render_group(task: tuple[list[tuple[str, Scene]], str, int, int, int]) -> int:
    """Worker: render and encode one group's videos; returns bytes written."""
    items, videos_dir, size, fps, gop = task
    return sum(write_mp4(Path(videos_dir) / f"{vid}.mp4", render_scene(scene, size), fps, gop=gop)
               for vid, scene in items)


def _group_tasks(planned: list[PlannedVideo], videos_dir: Path, size: int, fps: int, gop: int) -> Iterator[tuple]:
    for _, members in itertools.groupby(planned, key=lambda p: p.group):
        yield [(p.video_id, p.scene) for p in members], str(videos_dir), size, fps, gop


def _record(p: PlannedVideo, videos_dir: Path) -> CaptionRecord:
    factors = sorted(p.hard_negatives) + (["heldout"] if p.heldout else [])
    meta = {"group": f"g{p.group:05d}", "variant": p.variant, "factors": factors,
            "hard_negatives": p.hard_negatives, "heldout_combinations": [list(t) for t in p.heldout],
            "scene": p.scene.to_dict()}
    return CaptionRecord(p.video_id, (videos_dir / f"{p.video_id}.mp4").absolute(), p.split, p.captions, meta)


def generate_corpus(out_dir: str | os.PathLike[str], n: int, seed: int, *, size: int = 128, fps: int = 8,
                    seconds: float = 3.0, gop: int = 8, workers: int = 2,
                    splits: tuple[float, float, float] = (0.8, 0.1, 0.1),
                    progress: Callable[[int, int], None] | None = None,
                    heldout_seed: int | None = None) -> CorpusSummary:
    """Write n MP4 videos under out_dir/videos and their captions to out_dir/captions.json.

    Deterministic in (n, seed, size, fps, seconds, splits): the same arguments give a
    byte-identical captions.json and identical decoded pixels, whatever `workers` is.
    `heldout_seed`: take the held-out (colour, shape, motion) triples of that corpus seed
    instead (a fresh test corpus whose unseen combinations are those a model's training
    streams kept out)."""
    frames = int(round(fps * seconds))
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if frames < MIN_FRAMES:
        raise ValueError(f"fps * seconds must give at least {MIN_FRAMES} frames, got {frames}")
    if size < 48:
        raise ValueError(f"size must be at least 48 pixels, got {size}")
    if len(splits) != 3 or min(splits) < 0 or abs(sum(splits) - 1.0) > 1e-6:
        raise ValueError(f"splits must be three non-negative fractions summing to 1, got {splits}")
    out = Path(out_dir)
    videos_dir = out / "videos"
    videos_dir.mkdir(parents=True, exist_ok=True)
    planned = plan_corpus(n, seed, frames, splits, heldout_seed)
    held = seed if heldout_seed is None else heldout_seed
    tasks = list(_group_tasks(planned, videos_dir, size, fps, gop))
    sizes = _run_tasks(tasks, workers, progress, n)
    captions_path = out / "captions.json"
    generator = {"name": "pvl_search.data.synth", "seed": seed, "size": size, "fps": fps, "frames": frames,
                 "gop": gop, "splits": list(splits)} | ({} if heldout_seed is None else {"heldout_seed": heldout_seed})
    header = {"generator": generator, "heldout_combinations": [list(t) for t in sorted(heldout_combinations(held))]}
    write_captions(captions_path, [_record(p, videos_dir) for p in planned], extra=header)
    return _summarise(planned, out, captions_path, sum(sizes) + captions_path.stat().st_size, held)


def _run_tasks(tasks: list[tuple], workers: int, progress: Callable[[int, int], None] | None, n: int) -> list[int]:
    """Render groups in order (inline, or on a spawn pool that fails loudly if a worker dies)."""
    with contextlib.ExitStack() as stack:
        if workers <= 1:
            results: Iterator[int] = map(_render_group, tasks)
        else:
            pool = stack.enter_context(ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")))
            results = pool.map(_render_group, tasks, chunksize=4)
        done, sizes = 0, []
        for task, nbytes in zip(tasks, results):
            sizes.append(nbytes)
            done += len(task[0])
            if progress is not None:
                progress(done, n)
    return sizes


def _summarise(planned: list[PlannedVideo], out: Path, captions_path: Path, nbytes: int, seed: int) -> CorpusSummary:
    splits = {s: sum(p.split == s for p in planned) for s in SPLITS}
    factors = {f: {s: 0 for s in SPLITS} for f in FACTORS}
    for p in planned:
        for f in list(p.hard_negatives) + (["heldout"] if p.heldout else []):
            factors[f][p.split] += 1
    return CorpusSummary(out, captions_path, len(planned), len({p.group for p in planned}),
                         sum(len(p.captions) for p in planned), nbytes, splits, factors,
                         sorted(heldout_combinations(seed)))


def load_scene(meta: dict[str, Any]) -> Scene:
    """The Scene recorded in a synthetic video's caption meta."""
    return Scene.from_dict(meta["scene"])
