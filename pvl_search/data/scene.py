"""The scene model of the synthetic benchmark: a complete, JSON-serialisable description of
one video (objects, their events, the background) that `synth.render_scene` draws exactly.

The benchmark's public vocabulary (shapes, colours, motions) lives in `synth`; this module
holds only the data types and the two word lists the types themselves refer to.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

SIZES = ("small", "large")
STILL = "still"  # the motion of an object that has no event


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
