"""Discrete labels of a synthetic scene: what its captions state, as class indices.

The same labels drive two things: auxiliary heads during training (so that the encoders must
keep shape, size, motion, order and binding, not only colour) and linear probes that measure
what a trained model's embeddings hold (`pvl_search.training.probes`).

Slots follow time: "first" is the object whose event happens first, "second" the other actor.
So the slot labels alone tell every member of a twin group apart: an order twin swaps the
slots, a binding twin swaps the slots' colours. Two binary labels isolate those factors:
`order` (does the actor with the alphabetically first colour act first?) and `binding` (does
that actor also have the alphabetically first shape of the two?).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from pvl_search.data.scene import SIZES, Scene
from pvl_search.data.scene_render import shape_mask
from pvl_search.data.synth import COLOURS, MOTIONS, SHAPES, object_state
from pvl_search.media.decoders import sample_positions

SLOTS = ("first", "second")
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "colour": tuple(COLOURS),
    "shape": SHAPES,
    "size": SIZES,
    "motion": MOTIONS,
}
BINARY = ("order", "binding")


@dataclass(frozen=True)
class LabelSpec:
    """One label: its name (e.g. "first_shape"), its attribute, and its number of classes."""

    name: str
    attribute: str  # colour | shape | size | motion | order | binding
    classes: int


# Per colour, the shape and the motion of the actor of that colour, or "none" (no actor has
# it): binding without order. A latent that attends to one colour's patches can read these
# directly, an easier first step than the time-ordered slots (which also need "who is first").
NONE = "none"
# Per actor, without time: "lead" is the actor whose colour name comes first alphabetically,
# "other" the second. What each moving object looks like and does, whatever happens first.
ACTORS = ("lead", "other")
LABELS: tuple[LabelSpec, ...] = (
    tuple(LabelSpec(f"{slot}_{attr}", attr, len(values)) for slot in SLOTS for attr, values in ATTRIBUTES.items())
    + tuple(LabelSpec(name, name, 2) for name in BINARY)
    + tuple(LabelSpec(f"{actor}_{attr}", f"actor_{attr}", len(ATTRIBUTES[attr]))
            for actor in ACTORS for attr in ("shape", "size", "motion"))
    + tuple(LabelSpec(f"{colour}_{attr}", f"colour_{attr}", len(ATTRIBUTES[attr]) + 1)
            for colour in COLOURS for attr in ("shape", "motion"))
)
LABEL_NAMES: tuple[str, ...] = tuple(spec.name for spec in LABELS)
# Captions state size only now and then, so a text-side objective must not demand it.
TEXT_LABELS: tuple[str, ...] = tuple(spec.name for spec in LABELS if not spec.name.endswith("_size"))
# The labels that need the order of the events: each time slot's attributes, and `order`.
# Everything else can be read from a colour-keyed bag of objects; these cannot.
ORDER_LABELS: tuple[str, ...] = tuple(spec.name for spec in LABELS
                                      if spec.name.startswith(SLOTS) or spec.name == "order")
# The labels that say what each object looks like and does: shape and motion, per time slot,
# per actor and per colour. Weighed on their own when the contrastive losses leave them weak.
SHAPE_MOTION_LABELS: tuple[str, ...] = tuple(spec.name for spec in LABELS
                                             if spec.attribute.endswith(("shape", "motion")))
# Every shape label (per time slot, per actor, per colour).
SHAPE_LABELS: tuple[str, ...] = tuple(spec.name for spec in LABELS if spec.attribute.endswith("shape"))


def scene_labels(scene: Scene) -> np.ndarray:
    """(len(LABELS),) int64 class indices of one scene, in LABELS order."""
    first, second = (scene.objects[e.obj] for e in scene.events)
    values: list[int] = []
    for obj, event in zip((first, second), scene.events):
        values += [list(COLOURS).index(obj.colour), SHAPES.index(obj.shape), SIZES.index(obj.size),
                   MOTIONS.index(event.motion)]
    lead = first if first.colour < second.colour else second  # actor with the first colour name
    values.append(int(lead is first))
    other = second if lead is first else first
    values.append(int(lead.shape < other.shape))
    motion = {id(first): scene.events[0].motion, id(second): scene.events[1].motion}
    for actor in (lead, other):
        values += [SHAPES.index(actor.shape), SIZES.index(actor.size), MOTIONS.index(motion[id(actor)])]
    actors = {obj.colour: (obj, event) for obj, event in zip((first, second), scene.events)}
    for colour in COLOURS:
        obj, event = actors.get(colour, (None, None))
        values.append(len(SHAPES) if obj is None else SHAPES.index(obj.shape))
        values.append(len(MOTIONS) if event is None else MOTIONS.index(event.motion))
    return np.asarray(values, dtype=np.int64)


def label_maps(
    scenes: Mapping[str, Mapping[str, Any]], frames: int, size: int, patch: int | None
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None]:
    """Per key of `scenes` (scene dicts, as caption meta and stream chunks store them): its
    scene labels, and its dense patch labels for a model of that frame count, frame size and
    patch (None when `patch` is None). Each scene is parsed once for both."""
    parsed = {key: Scene.from_dict(scene) for key, scene in scenes.items()}
    labels = {key: scene_labels(scene) for key, scene in parsed.items()}
    if patch is None:
        return labels, None
    return labels, {key: token_labels(scene, frames, size, patch) for key, scene in parsed.items()}


# Dense labels of the video's input tokens: what covers each patch of each sampled frame.
TOKEN_BACKGROUND = len(SHAPES)  # shape class of a patch no object covers
TOKEN_STATIC = len(MOTIONS)  # motion class of a patch whose object is not acting at that frame
TOKEN_CLASSES = (len(SHAPES) + 1, len(MOTIONS) + 1)  # (shape or background, motion or static)
_COVERAGE = 0.15  # share of a patch's pixels an object must cover to label it


def token_labels(scene: Scene, frames: int, size: int, patch: int) -> np.ndarray:
    """(frames, g*g, 2) int64: for each patch of each frame the model sees (sampled as the
    decoder samples a whole video), the shape of the object covering most of it (or
    background) and that object's motion if its event is under way then (or static).

    Dense supervision for the patch tokens: a shape is a pattern across a few patches, which a
    per-video label alone teaches slowly; here every token says what it shows."""
    grid = size // patch
    centres = np.arange(size, dtype=np.float32) + 0.5
    out = np.zeros((frames, grid * grid, 2), dtype=np.int64)
    for f, t in enumerate(sample_positions(scene.frames, frames)):
        owner = np.full((size, size), -1, dtype=np.int64)
        for i, obj in enumerate(scene.objects):
            st = object_state(scene, i, int(t))
            if st.visible:
                cx, cy, r = st.x * size, st.y * size, st.radius * size
                owner[shape_mask(obj.shape, centres[None, :] - cx, centres[:, None] - cy, r)] = i
        blocks = owner.reshape(grid, patch, grid, patch).transpose(0, 2, 1, 3).reshape(grid * grid, -1)
        for cell, pixels in enumerate(blocks):
            counts = np.bincount(pixels[pixels >= 0], minlength=len(scene.objects))
            if counts.size == 0 or counts.max() < _COVERAGE * pixels.size:
                out[f, cell] = (TOKEN_BACKGROUND, TOKEN_STATIC)
                continue
            i = int(counts.argmax())
            event = next((e for e in scene.events if e.obj == i), None)
            acting = event is not None and event.start <= t <= event.end
            motion = MOTIONS.index(event.motion) if acting else TOKEN_STATIC
            out[f, cell] = (SHAPES.index(scene.objects[i].shape), motion)
    return out
