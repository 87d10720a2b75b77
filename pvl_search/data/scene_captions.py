"""Captions of a synthetic scene: both events, their order and, sometimes, the still object
and the background, in varied words and templates.

Twins share a caption seed (see `captions_for`), so their captions are parallel paraphrases
that differ only where the scenes do.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pvl_search.data.scene import STILL, Scene, SceneObject

# One entry per colour of synth.COLOURS, as _SHAPE_WORDS and _VERBS have one per shape and motion.
_COLOUR_WORDS = {
    "red": ["red"],
    "green": ["green"],
    "blue": ["blue"],
    "yellow": ["yellow"],
    "purple": ["purple", "violet"],
    "orange": ["orange"],
}
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
