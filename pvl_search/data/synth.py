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

A `Scene` is a complete, JSON-serialisable description: `render_scene` is a pure function of
it, so the captions file's `meta["scene"]` reproduces every video exactly.
"""

from __future__ import annotations

import contextlib
import itertools
import multiprocessing
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import av
import numpy as np

from pvl_search.data.captions import CaptionRecord, write_captions

SHAPES = ("circle", "square", "triangle", "ring", "cross")
# Saturated object colours, far (in RGB) from each other and from the grey-ish backgrounds,
# so that a colour mask over decoded yuv420p frames still finds each object.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (40, 180, 60),
    "blue": (40, 80, 225),
    "yellow": (240, 225, 40),
    "purple": (150, 50, 190),
    "orange": (245, 140, 20),
}
SIZES = ("small", "large")
MOTIONS = ("left", "right", "up", "down", "grows", "shrinks", "appears", "disappears")
STILL = "still"  # the motion of an object that has no event
VARIANTS = ("base", "order", "binding", "both")
# For each variant, the group member that differs from it in exactly one factor.
_TWINS = {"base": {"order": "order", "binding": "binding"}, "order": {"order": "base", "binding": "both"},
          "binding": {"order": "both", "binding": "base"}, "both": {"order": "binding", "binding": "order"}}
SPLITS = ("train", "val", "test")
FACTORS = ("order", "binding", "heldout")

_RADIUS = {"small": (0.09, 0.1), "large": (0.14, 0.155)}  # fractions of the frame side
_MOVE = (0.2, 0.3)  # distance of left/right/up/down, fraction of the frame side
_GROW = (1.35, 1.5)  # final scale of `grows`
_SHRINK = (0.5, 0.62)  # final scale of `shrinks`
_MARGIN = 0.04  # gap kept between objects' swept boxes and to the frame edge (chroma bleeds ~2 px)
_PIXEL_NOISE = 3.0  # std of the per-frame, per-pixel noise
_HELDOUT_SHARE = 0.1  # share of (colour, shape, motion) triples held out for test
_HELDOUT_TEST_GROUPS = 0.5  # share of test groups built around a held-out triple
MIN_FRAMES = 12


# ---------------------------------------------------------------------------- scene model


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str  # small | large: the starting size, as captions state it
    x: float  # start centre, fraction of the frame width
    y: float  # start centre, fraction of the frame height
    radius: float  # half-extent, fraction of the frame side


@dataclass(frozen=True)
class Event:
    obj: int  # index into Scene.objects
    motion: str  # one of MOTIONS
    start: int  # first frame of the event
    end: int  # frame at which the event is complete
    amount: float  # distance (moves) or final scale (grows/shrinks); 0 for appears/disappears


@dataclass(frozen=True)
class Background:
    kind: str  # plain | gradient | noise
    colours: tuple[tuple[int, int, int], ...]  # low-saturation colours
    direction: str  # gradient: horizontal | vertical | diagonal; otherwise ""
    seed: int  # noise texture seed


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]  # objects[0], objects[1] act; objects[2] (if any) stays still
    events: tuple[Event, ...]  # in time order
    background: Background
    noise_seed: int
    frames: int

    def motion_of(self, obj: int) -> str:
        return next((e.motion for e in self.events if e.obj == obj), STILL)

    def triples(self) -> set[tuple[str, str, str]]:
        """(colour, shape, motion) of every acting object: the unit of the held-out rule."""
        return {(self.objects[e.obj].colour, self.objects[e.obj].shape, e.motion) for e in self.events}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Scene:
        bg = d["background"]
        return cls(
            objects=tuple(SceneObject(**o) for o in d["objects"]),
            events=tuple(Event(**e) for e in d["events"]),
            background=Background(bg["kind"], tuple(tuple(c) for c in bg["colours"]), bg["direction"], bg["seed"]),
            noise_seed=d["noise_seed"],
            frames=d["frames"],
        )


@dataclass(frozen=True)
class ObjectState:
    x: float  # centre, fraction of the frame width
    y: float
    radius: float
    visible: bool


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


def _swept_box(obj: SceneObject, motion: str, amount: float) -> tuple[float, float, float, float]:
    """Box (x0, y0, x1, y1) the object covers over the whole video, whenever it moves."""
    dx = {"left": -amount, "right": amount}.get(motion, 0.0)
    dy = {"up": -amount, "down": amount}.get(motion, 0.0)
    r = obj.radius * (amount if motion == "grows" else 1.0)
    x0, x1 = sorted((obj.x, obj.x + dx))
    y0, y1 = sorted((obj.y, obj.y + dy))
    return x0 - r, y0 - r, x1 + r, y1 + r


def _overlaps(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return not (a[2] + _MARGIN <= b[0] or b[2] + _MARGIN <= a[0] or a[3] + _MARGIN <= b[1] or b[3] + _MARGIN <= a[1])


def _amount(rng: np.random.Generator, motion: str) -> float:
    if motion in ("left", "right", "up", "down"):
        return round(float(rng.uniform(*_MOVE)), 4)
    if motion == "grows":
        return round(float(rng.uniform(*_GROW)), 4)
    if motion == "shrinks":
        return round(float(rng.uniform(*_SHRINK)), 4)
    return 0.0


def _place(rng: np.random.Generator, shape: str, colour: str, motion: str, amount: float,
           taken: list[tuple[float, ...]]) -> SceneObject | None:
    """Jittered start position whose swept box stays in frame and clear of `taken`."""
    size = SIZES[int(rng.integers(2))]
    radius = round(float(rng.uniform(*_RADIUS[size])), 4)
    probe = SceneObject(shape, colour, size, 0.0, 0.0, radius)
    x0, y0, x1, y1 = _swept_box(probe, motion, amount)  # relative to a start centre at 0
    lo_x, hi_x = _MARGIN - x0, 1.0 - _MARGIN - x1
    lo_y, hi_y = _MARGIN - y0, 1.0 - _MARGIN - y1
    if lo_x > hi_x or lo_y > hi_y:
        return None
    for _ in range(60):
        obj = replace(probe, x=round(float(rng.uniform(lo_x, hi_x)), 4), y=round(float(rng.uniform(lo_y, hi_y)), 4))
        box = _swept_box(obj, motion, amount)
        if not any(_overlaps(box, t) for t in taken):
            taken.append(box)
            return obj
    return None


def _background(rng: np.random.Generator) -> Background:
    def grey() -> tuple[int, int, int]:
        level = int(rng.integers(50, 200))
        r, g, b = (int(np.clip(level + rng.integers(-12, 13), 0, 255)) for _ in range(3))
        return r, g, b

    kind = ("plain", "gradient", "noise")[int(rng.integers(3))]
    if kind == "plain":
        return Background(kind, (grey(),), "", 0)
    if kind == "gradient":
        direction = ("horizontal", "vertical", "diagonal")[int(rng.integers(3))]
        return Background(kind, (grey(), grey()), direction, 0)
    return Background(kind, (grey(),), "", int(rng.integers(2**31)))


def _windows(rng: np.random.Generator, frames: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Two event windows in time with speed jitter: the first ends before the second starts."""
    s1 = int(rng.integers(1, max(2, frames // 8) + 1))
    e1 = s1 + int(round(frames * rng.uniform(0.28, 0.36)))
    s2 = e1 + int(rng.integers(1, 3))
    e2 = min(s2 + int(round(frames * rng.uniform(0.28, 0.36))), frames - 2)
    return (s1, e1), (s2, e2)


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
    amounts = [_amount(rng, m) for m in motions]
    taken: list[tuple[float, ...]] = []
    objects = []
    for colour, shape, motion, amount in zip(colours, shapes, motions, amounts):
        obj = _place(rng, shape, colour, motion, amount, taken)
        if obj is None:
            return None
        objects.append(obj)
    (s1, e1), (s2, e2) = _windows(rng, frames)
    events = (Event(0, motions[0], s1, e1, amounts[0]), Event(1, motions[1], s2, e2, amounts[1]))
    return Scene(tuple(objects), events, _background(rng), int(rng.integers(2**31)), frames)


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


# ------------------------------------------------------------------------------ captions

_COLOUR_WORDS = {c: [c] for c in COLOURS} | {"purple": ["purple", "violet"]}
_SHAPE_WORDS = {
    "circle": ["circle", "disc", "round dot"],
    "square": ["square", "box", "block"],
    "triangle": ["triangle", "triangular shape"],
    "ring": ["ring", "hoop", "hollow circle"],
    "cross": ["cross", "plus sign", "plus shape"],
}
_SIZE_WORDS = {"small": ["small", "little"], "large": ["large", "big"]}
_VERBS = {
    "left": ["moves left", "slides to the left", "drifts leftward", "travels to the left"],
    "right": ["moves right", "slides to the right", "drifts rightward", "travels to the right"],
    "up": ["moves up", "rises", "floats upward", "goes up"],
    "down": ["moves down", "sinks", "drops down", "slides downward"],
    "grows": ["grows", "gets bigger", "expands", "grows larger"],
    "shrinks": ["shrinks", "gets smaller", "contracts", "becomes smaller"],
    "appears": ["appears", "pops into view", "shows up", "comes into view"],
    "disappears": ["disappears", "vanishes", "goes out of view"],
    STILL: ["stays still", "does not move", "remains in place"],
}
_BACKGROUND_WORDS = {"plain": ["plain", "flat"], "gradient": ["gradient", "shaded"], "noise": ["textured", "noisy"]}
_TEMPLATES = (
    "{a}, then {b}",
    "first {a}, and afterwards {b}",
    "{a} before {b}",
    "{b} after {a}",
    "{a}; next, {b}",
    "{a} and then {b}",
    "{b}, but only after {a}",
)


def _pick(rng: np.random.Generator, words: Sequence[str]) -> str:
    return words[int(rng.integers(len(words)))]


def _noun(rng: np.random.Generator, obj: SceneObject) -> str:
    words = [_pick(rng, _COLOUR_WORDS[obj.colour]), _pick(rng, _SHAPE_WORDS[obj.shape])]
    if rng.random() < 0.5:
        words.insert(0, _pick(rng, _SIZE_WORDS[obj.size]))
    definite = rng.random() < 0.25
    article = "the" if definite else ("an" if words[0][0] in "aeiou" else "a")
    return " ".join([article, *words])


def _clause(rng: np.random.Generator, scene: Scene, obj: int) -> str:
    return f"{_noun(rng, scene.objects[obj])} {_pick(rng, _VERBS[scene.motion_of(obj)])}"


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """One caption that states both events, their order, and optionally the still object."""
    first, second = scene.events
    text = _pick(rng, _TEMPLATES).format(a=_clause(rng, scene, first.obj), b=_clause(rng, scene, second.obj))
    if len(scene.objects) > 2 and rng.random() < 0.5:
        text += f", while {_clause(rng, scene, 2)}"
    if rng.random() < 0.25:
        text = f"on a {_pick(rng, _BACKGROUND_WORDS[scene.background.kind])} background, {text}"
    return text


def captions_for(scene: Scene, count: int, seed: Sequence[int]) -> list[str]:
    """`count` distinct captions; twins share `seed`, so their captions are parallel paraphrases."""
    rng = np.random.default_rng(list(seed))
    out: list[str] = []
    for _ in range(count * 20):
        text = caption(scene, rng)
        if text not in out:
            out.append(text)
        if len(out) == count:
            break
    return out


# ----------------------------------------------------------------------------- rendering


def _shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    ax, ay = np.abs(dx), np.abs(dy)
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return (ax <= 0.88 * r) & (ay <= 0.88 * r)
    if shape == "triangle":  # apex up, base at 0.8 r below the centre
        return (dy >= -r) & (dy <= 0.8 * r) & (ax <= (dy + r) / 1.8)
    if shape == "ring":
        d2 = dx * dx + dy * dy
        return (d2 <= r * r) & (d2 >= 0.3 * r * r)  # hole radius ~0.55 r
    if shape == "cross":
        return ((ax <= 0.38 * r) & (ay <= r)) | ((ay <= 0.38 * r) & (ax <= r))
    raise ValueError(f"unknown shape {shape!r}")


def render_background(bg: Background, size: int) -> np.ndarray:
    """(size, size, 3) float32 background; low saturation so object colour masks stay clean."""
    c0 = np.asarray(bg.colours[0], dtype=np.float32)
    if bg.kind == "plain":
        return np.broadcast_to(c0, (size, size, 3)).copy()
    ramp = np.linspace(0.0, 1.0, size, dtype=np.float32)
    if bg.kind == "gradient":
        c1 = np.asarray(bg.colours[1], dtype=np.float32)
        if bg.direction == "horizontal":
            w = np.broadcast_to(ramp[None, :], (size, size))
        elif bg.direction == "vertical":
            w = np.broadcast_to(ramp[:, None], (size, size))
        else:
            w = (ramp[None, :] + ramp[:, None]) / 2
        return c0 + (c1 - c0) * w[..., None]
    coarse = np.random.default_rng(bg.seed).uniform(-30, 30, size=(9, 9)).astype(np.float32)
    grid = np.linspace(0, 8, size, dtype=np.float32)
    rows = np.stack([np.interp(grid, np.arange(9), row) for row in coarse])  # (9, size)
    texture = np.stack([np.interp(grid, np.arange(9), col) for col in rows.T], axis=1)  # (size, size)
    return c0 + texture[..., None].astype(np.float32)


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
            mask = _shape_mask(obj.shape, centres[None, x0:x1] - cx, centres[y0:y1, None] - cy, r)
            video[t, y0:y1, x0:x1][mask] = COLOURS[obj.colour]
    # Uniform noise with the intended std: six times cheaper to draw than Gaussian.
    noise = np.random.default_rng(scene.noise_seed).random(video.shape, dtype=np.float32)
    video += (noise - 0.5) * (_PIXEL_NOISE * 12**0.5)
    return np.clip(video, 0, 255, out=video).astype(np.uint8)


def write_mp4(path: str | os.PathLike[str], frames: np.ndarray, fps: int, *, gop: int = 8, crf: int = 23) -> int:
    """H.264 yuv420p MP4 with a keyframe every `gop` frames (cheap seeking); returns its bytes.

    Single-threaded x264 so the same frames always give the same bitstream; written to a
    temporary name and renamed, so a crash never leaves a truncated video behind."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    height, width = frames.shape[1:3]
    with av.open(str(tmp), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps, options={
            "crf": str(crf), "preset": "veryfast",
            "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0:bframes=0",
        })
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.gop_size = gop
        stream.codec_context.thread_count = 1
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode(None))
    os.replace(tmp, path)
    return path.stat().st_size


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
                fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)) -> list[PlannedVideo]:
    """Every video's scene, captions and split, deterministic in (n, seed, frames)."""
    heldout = heldout_combinations(seed)
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
                    progress: Callable[[int, int], None] | None = None) -> CorpusSummary:
    """Write n MP4 videos under out_dir/videos and their captions to out_dir/captions.json.

    Deterministic in (n, seed, size, fps, seconds, splits): the same arguments give a
    byte-identical captions.json and identical decoded pixels, whatever `workers` is."""
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
    planned = plan_corpus(n, seed, frames, splits)
    tasks = list(_group_tasks(planned, videos_dir, size, fps, gop))
    sizes = _run_tasks(tasks, workers, progress, n)
    captions_path = out / "captions.json"
    header = {"generator": {"name": "pvl_search.data.synth", "seed": seed, "size": size, "fps": fps,
                            "frames": frames, "gop": gop, "splits": list(splits)},
              "heldout_combinations": [list(t) for t in sorted(heldout_combinations(seed))]}
    write_captions(captions_path, [_record(p, videos_dir) for p in planned], extra=header)
    return _summarise(planned, out, captions_path, sum(sizes) + captions_path.stat().st_size, seed)


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
