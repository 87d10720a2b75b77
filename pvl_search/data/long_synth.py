"""The moment benchmark: long videos stitched from synthetic scenes, with known event times.

Each event is one scene of the short benchmark (synth.py: two objects, "a red circle moves
left, then a blue square grows"), rendered for a random length and cut hard against the next.
A video of E events has E captions, one per event, and the captions file records each
caption's time span in `meta["moments"]` ([start_s, end_s], in caption order), which
`pvl-search eval` reads to score moments (R@1 at IoU 0.5 / 0.7, start error).

Event lengths are drawn per event from [min_event_s, max_event_s], in whole frames, so event
boundaries fall anywhere, not on a grid the index's windows could line up with by luck.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pvl_search.data.captions import CaptionRecord, write_captions
from pvl_search.data.scene import Scene
from pvl_search.data.scene_captions import captions_for
from pvl_search.data.scene_render import write_mp4
from pvl_search.data.synth import render_scene, sample_scene

MIN_EVENT_S = 3.0
MAX_EVENT_S = 4.5


@dataclass(frozen=True)
class LongVideoPlan:
    video_id: str
    scenes: tuple[Scene, ...]
    spans: tuple[tuple[float, float], ...]  # each event's [start, end) in seconds
    captions: tuple[str, ...]  # one per event


@dataclass
class LongCorpusSummary:
    """What generate_long_corpus wrote; the CLI prints it."""

    out_dir: str
    captions_path: str
    videos: int
    events: int
    seconds: float  # total length of all videos
    bytes_on_disk: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def plan_long_video(video_id: str, events: int, seed: tuple[int, ...], fps: int,
                    min_event_s: float, max_event_s: float) -> LongVideoPlan:
    """One long video's events, deterministic in `seed`."""
    rng = np.random.default_rng(list(seed))
    scenes, spans, captions = [], [], []
    t = 0
    for e in range(events):
        frames = int(rng.integers(round(min_event_s * fps), round(max_event_s * fps) + 1))
        scene = sample_scene(rng, frames)
        scenes.append(scene)
        spans.append((t / fps, (t + frames) / fps))
        captions.append(captions_for(scene, 1, (*seed, 7, e))[0])
        t += frames
    return LongVideoPlan(video_id, tuple(scenes), tuple(spans), tuple(captions))


def plan_long_corpus(videos: int, events: int, seed: int, *, fps: int = 8, long_events: int = 0,
                     min_event_s: float = MIN_EVENT_S, max_event_s: float = MAX_EVENT_S) -> list[LongVideoPlan]:
    """`videos` videos of `events` events each, then one of `long_events` events if > 0."""
    if videos < 0 or events < 1 or long_events < 0 or videos + (long_events > 0) < 1:
        raise ValueError("need at least one video with at least one event")
    if not 0 < min_event_s <= max_event_s:
        raise ValueError(f"event lengths must satisfy 0 < min <= max, got {min_event_s}, {max_event_s}")
    if round(min_event_s * fps) < 12:
        raise ValueError(f"events need at least 12 frames: --min-event-s {min_event_s} at {fps} fps is too short")
    counts = [events] * videos + ([long_events] if long_events > 0 else [])
    return [plan_long_video(f"long{v:03d}", count, (seed, 11, v), fps, min_event_s, max_event_s)
            for v, count in enumerate(counts)]


def _render(plan: LongVideoPlan, path: Path, size: int, fps: int) -> int:
    frames = np.concatenate([render_scene(scene, size) for scene in plan.scenes])
    return write_mp4(path, frames, fps)


def generate_long_corpus(out_dir: str | os.PathLike[str], videos: int, events: int, seed: int, *,
                         long_events: int = 0, size: int = 64, fps: int = 8,
                         min_event_s: float = MIN_EVENT_S, max_event_s: float = MAX_EVENT_S,
                         progress: Callable[[int, int], None] | None = None) -> LongCorpusSummary:
    """Render the moment benchmark into `out_dir` (videos/ and captions.json, every video in
    the test split). Deterministic in its arguments."""
    plans = plan_long_corpus(videos, events, seed, fps=fps, long_events=long_events,
                             min_event_s=min_event_s, max_event_s=max_event_s)
    out = Path(out_dir).absolute()
    videos_dir = out / "videos"
    videos_dir.mkdir(parents=True, exist_ok=True)
    nbytes, records = 0, []
    for i, plan in enumerate(plans):
        path = videos_dir / f"{plan.video_id}.mp4"
        nbytes += _render(plan, path, size, fps)
        meta = {"moments": [list(span) for span in plan.spans]}
        records.append(CaptionRecord(plan.video_id, path, "test", list(plan.captions), meta))
        if progress is not None:
            progress(i + 1, len(plans))
    captions_path = out / "captions.json"
    generator = {"name": "pvl_search.data.long_synth", "seed": seed, "size": size, "fps": fps,
                 "min_event_s": min_event_s, "max_event_s": max_event_s}
    write_captions(captions_path, records, extra={"generator": generator})
    seconds = sum(plan.spans[-1][1] for plan in plans)
    return LongCorpusSummary(str(out), str(captions_path), len(plans), sum(len(p.spans) for p in plans),
                             round(seconds, 3), nbytes + captions_path.stat().st_size)
