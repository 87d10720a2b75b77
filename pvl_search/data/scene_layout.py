"""Random layout of a synthetic scene: where objects start so that, whatever they do, they
stay in frame and never touch; how far they move; when their events happen; the background.

`synth.sample_scene` draws these in a fixed order from one generator, so the same seed
always gives the same scene.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from pvl_search.data.scene import SIZES, Background, SceneObject

_RADIUS = {"small": (0.09, 0.1), "large": (0.14, 0.155)}  # fractions of the frame side
_MOVE = (0.2, 0.3)  # distance of left/right/up/down, fraction of the frame side
_GROW = (1.35, 1.5)  # final scale of `grows`
_SHRINK = (0.5, 0.62)  # final scale of `shrinks`
_MARGIN = 0.04  # gap kept between objects' swept boxes and to the frame edge (chroma bleeds ~2 px)


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


def event_amount(rng: np.random.Generator, motion: str) -> float:
    if motion in ("left", "right", "up", "down"):
        return round(float(rng.uniform(*_MOVE)), 4)
    if motion == "grows":
        return round(float(rng.uniform(*_GROW)), 4)
    if motion == "shrinks":
        return round(float(rng.uniform(*_SHRINK)), 4)
    return 0.0


def place_object(rng: np.random.Generator, shape: str, colour: str, motion: str, amount: float,
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


def sample_background(rng: np.random.Generator) -> Background:
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


def event_windows(rng: np.random.Generator, frames: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Two event windows in time with speed jitter: the first ends before the second starts."""
    s1 = int(rng.integers(1, max(2, frames // 8) + 1))
    e1 = s1 + int(round(frames * rng.uniform(0.28, 0.36)))
    s2 = e1 + int(rng.integers(1, 3))
    e2 = min(s2 + int(round(frames * rng.uniform(0.28, 0.36))), frames - 2)
    return (s1, e1), (s2, e2)
