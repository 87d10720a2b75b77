"""The synthetic benchmark states what it renders: every caption is checked against the
generator's scene description and against the pixels decoded (with PyAV) from the MP4 file.
The caption parser and the shape templates below are written independently of the generator."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import pytest

from pvl_search.data.captions import load_captions
from pvl_search.data.synth import COLOURS, CorpusSummary, generate_corpus, load_scene, render_scene

N, SEED, SIZE, FPS, FRAMES = 48, 7, 128, 8, 24


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[CorpusSummary, list, list[tuple[int, int]]]:
    calls: list[tuple[int, int]] = []
    summary = generate_corpus(tmp_path_factory.mktemp("synth"), N, SEED, size=SIZE, fps=FPS, seconds=3,
                              workers=2, splits=(0.5, 0.25, 0.25), progress=lambda d, t: calls.append((d, t)))
    return summary, load_captions(summary.captions_path, check_files=True), calls


def decode(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


# ------------------------------------------------------------------ an independent caption parser

COLOUR_WORDS = {"red": "red", "green": "green", "blue": "blue", "yellow": "yellow", "purple": "purple",
                "violet": "purple", "orange": "orange"}
SHAPE_WORDS = [("hollow circle", "ring"), ("ring", "ring"), ("hoop", "ring"), ("plus", "cross"), ("cross", "cross"),
               ("triang", "triangle"), ("circle", "circle"), ("disc", "circle"), ("round dot", "circle"),
               ("square", "square"), ("box", "square"), ("block", "square")]
MOTION_WORDS = [("disappears", "disappears"), ("vanishes", "disappears"), ("out of view", "disappears"),
                ("appears", "appears"), ("into view", "appears"), ("shows up", "appears"),
                ("still", "still"), ("does not move", "still"), ("in place", "still"),
                ("left", "left"), ("right", "right"), ("rises", "up"), ("up", "up"), ("down", "down"),
                ("sinks", "down"), ("grow", "grows"), ("bigger", "grows"), ("expands", "grows"),
                ("shrinks", "shrinks"), ("smaller", "shrinks"), ("contracts", "shrinks")]
SIZE_WORDS = {"small": "small", "little": "small", "large": "large", "big": "large"}
ORDER_PATTERNS = [(r"first (.+), and afterwards (.+)", False), (r"(.+), but only after (.+)", True),
                  (r"(.+); next, (.+)", False), (r"(.+) and then (.+)", False), (r"(.+), then (.+)", False),
                  (r"(.+) before (.+)", False), (r"(.+) after (.+)", True)]


@dataclass(frozen=True)
class Clause:
    colour: str
    shape: str
    motion: str
    size: str | None


def parse_clause(text: str) -> Clause:
    words = text.split()
    colour = next(COLOUR_WORDS[w] for w in words if w in COLOUR_WORDS)
    shape = next(s for key, s in SHAPE_WORDS if key in text)
    motion = next(m for key, m in MOTION_WORDS if key in text)
    size = next((SIZE_WORDS[w] for w in words[:3] if w in SIZE_WORDS), None)
    return Clause(colour, shape, motion, size)


def parse_caption(text: str) -> tuple[Clause, Clause, Clause | None, str | None]:
    """(first event, second event, still object, background word) as the caption states them."""
    background = None
    if m := re.fullmatch(r"on an? (\w+) background, (.+)", text):
        background, text = m.group(1), m.group(2)
    still = None
    if m := re.fullmatch(r"(.+), while (.+)", text):
        text, still = m.group(1), parse_clause(m.group(2))
    for pattern, reversed_ in ORDER_PATTERNS:
        if m := re.fullmatch(pattern, text):
            a, b = parse_clause(m.group(1)), parse_clause(m.group(2))
            return (b, a, still, background) if reversed_ else (a, b, still, background)
    raise AssertionError(f"caption states no temporal order: {text!r}")


# ---------------------------------------------------------------------------- pixel analysis


def hue_chroma(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rgb = frames.astype(np.float32)
    mx, mn = rgb.max(-1), rgb.min(-1)
    c = mx - mn
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    safe = np.where(c == 0, 1, c)
    h = np.where(mx == r, ((g - b) / safe) % 6, np.where(mx == g, (b - r) / safe + 2, (r - g) / safe + 4)) * 60
    return h, c, c / np.maximum(mx, 1)


def colour_mask(hcs: tuple[np.ndarray, ...], colour: str) -> np.ndarray:
    """Saturated pixels of the colour's hue, minus isolated specks (codec colour bleeding)."""
    h, c, s = hcs
    hue, chroma, _ = hue_chroma(np.array(COLOURS[colour], dtype=np.uint8))
    m = (np.abs((h - hue + 180) % 360 - 180) < 12) & (s > 0.5) & (c > 0.6 * chroma)  # blends with grey fail
    p = np.pad(m, ((0, 0), (1, 1), (1, 1))).astype(np.uint8)
    H, W = m.shape[1:]
    neighbours = sum(p[:, 1 + dy:1 + dy + H, 1 + dx:1 + dx + W] for dy in (-1, 0, 1) for dx in (-1, 0, 1))
    return m & (neighbours >= 5)


def shape_of(mask: np.ndarray) -> str:
    """The shape template (fitted to the blob's bounding box) that overlaps the blob best."""
    ys, xs = np.nonzero(mask)
    crop = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    h, w = crop.shape
    v, u = np.meshgrid((np.arange(h) + 0.5) / h * 2 - 1, (np.arange(w) + 0.5) / w * 2 - 1, indexing="ij")
    d2 = u * u + v * v
    templates = {"circle": d2 <= 1, "square": np.ones_like(crop), "ring": (d2 <= 1) & (d2 >= 0.3),
                 "triangle": np.abs(u) <= (v + 1) / 2, "cross": (np.abs(u) <= 0.4) | (np.abs(v) <= 0.4)}
    iou = {k: (crop & t).sum() / (crop | t).sum() for k, t in templates.items()}
    return max(iou, key=iou.get)


@dataclass
class Track:
    """One object's colour blob over the decoded frames."""

    area: np.ndarray  # (T,)
    cx: np.ndarray
    cy: np.ndarray
    masks: np.ndarray

    @classmethod
    def of(cls, hcs: tuple[np.ndarray, ...], colour: str) -> Track:
        masks = colour_mask(hcs, colour)
        area = masks.sum((1, 2)).astype(float)
        ys, xs = np.arange(masks.shape[1]), np.arange(masks.shape[2])
        with np.errstate(invalid="ignore", divide="ignore"):
            cx = (masks.sum(1) * xs).sum(1) / area
            cy = (masks.sum(2) * ys).sum(1) / area
        return cls(area, cx, cy, masks)

    def visible(self, t: int) -> bool:
        return self.area[t] > 20

    def differs(self, t: int, u: int) -> bool:
        if self.visible(t) != self.visible(u):
            return True
        if not self.visible(t):
            return False
        moved = np.hypot(self.cx[t] - self.cx[u], self.cy[t] - self.cy[u]) > 2.0
        resized = abs(self.area[t] - self.area[u]) > max(0.15 * max(self.area[t], self.area[u]), 30)
        return bool(moved or resized)

    def onset(self) -> int | None:
        return next((t for t in range(len(self.area)) if self.differs(t, 0)), None)

    def settled(self) -> int:
        last = len(self.area) - 1
        return max((t + 1 for t in range(last) if self.differs(t, last)), default=0)


def check_pixels(track: Track, clause: Clause) -> None:
    first = int(np.argmax(track.area > 20))
    last = len(track.area) - 1 - int(np.argmax(track.area[::-1] > 20))
    assert shape_of(track.masks[first]) == clause.shape
    ys, xs = np.nonzero(track.masks[first])
    half = (max(np.ptp(ys), np.ptp(xs)) + 1) / 2 / (0.88 if clause.shape == "square" else 1.0)
    if clause.size is not None:  # radius <= 0.1 (small) or >= 0.14 (large) of 128 px
        assert (half < 15.0) == (clause.size == "small"), half
    dx, dy = track.cx[last] - track.cx[first], track.cy[last] - track.cy[first]
    grow = track.area[last] / track.area[first]
    far, near = 0.15 * SIZE, 3.0
    expected = {
        "left": dx < -far and abs(dy) < near, "right": dx > far and abs(dy) < near,
        "up": dy < -far and abs(dx) < near, "down": dy > far and abs(dx) < near,
        "grows": grow > 1.5 and np.hypot(dx, dy) < near, "shrinks": grow < 0.6 and np.hypot(dx, dy) < near,
        "appears": not track.visible(0) and track.visible(len(track.area) - 1),
        "disappears": track.visible(0) and not track.visible(len(track.area) - 1),
        "still": track.onset() is None,
    }
    assert expected[clause.motion], (clause, dx, dy, grow)


# ------------------------------------------------------------------------------------- tests


def test_summary_counts_splits_and_factors(corpus) -> None:
    summary, records, calls = corpus
    assert summary.videos == len(records) == N and summary.groups == N // 4
    assert summary.splits == {s: sum(r.split == s for r in records) for s in ("train", "val", "test")}
    assert summary.splits["test"] >= 8 and summary.splits["val"] >= 4
    assert summary.factors["order"] == summary.factors["binding"] == summary.splits  # full groups: every video
    assert summary.factors["heldout"]["train"] == summary.factors["heldout"]["val"] == 0
    assert summary.factors["heldout"]["test"] > 0
    assert summary.captions == sum(len(r.captions) for r in records)
    assert summary.bytes_on_disk == sum(r.path.stat().st_size for r in records) + summary.captions_path.stat().st_size
    assert calls[-1] == (N, N) and [d for d, _ in calls] == sorted(d for d, _ in calls)
    assert json.loads(json.dumps(summary.to_dict()))["videos"] == N


def test_videos_are_small_h264_with_short_keyframe_interval(corpus) -> None:
    _, records, _ = corpus
    with av.open(str(records[0].path)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264" and stream.codec_context.pix_fmt == "yuv420p"
        assert (stream.width, stream.height, stream.average_rate) == (SIZE, SIZE, FPS)
        keyframes = [i for i, p in enumerate(container.demux(stream)) if p.size and p.is_keyframe]
    assert keyframes == [0, 8, 16]
    assert decode(records[0].path).shape == (FRAMES, SIZE, SIZE, 3)


def test_every_caption_states_the_generated_scene(corpus) -> None:
    _, records, _ = corpus
    kinds = {"plain": {"plain", "flat"}, "gradient": {"gradient", "shaded"}, "noise": {"textured", "noisy"}}
    for r in records:
        scene = load_scene(r.meta)
        assert 2 <= len(r.captions) <= 5 and len(set(r.captions)) == len(r.captions)
        for text in r.captions:
            first, second, still, background = parse_caption(text)
            for clause, event in ((first, scene.events[0]), (second, scene.events[1])):
                obj = scene.objects[event.obj]
                assert (clause.colour, clause.shape, clause.motion) == (obj.colour, obj.shape, event.motion), text
                assert clause.size in (None, obj.size), text
            if still is not None:
                assert (still.colour, still.shape, still.motion) == (scene.objects[2].colour, scene.objects[2].shape,
                                                                     "still")
            assert background is None or background in kinds[scene.background.kind]


def test_every_caption_states_the_decoded_pixels(corpus) -> None:
    """Motion, size, shape and colour from the colour blobs; order from when each blob starts
    and stops changing."""
    _, records, _ = corpus
    for r in records:
        hcs = hue_chroma(decode(r.path))
        for text in r.captions[:2]:
            first, second, still, _ = parse_caption(text)
            a, b = Track.of(hcs, first.colour), Track.of(hcs, second.colour)
            check_pixels(a, first)
            check_pixels(b, second)
            assert a.onset() is not None and b.onset() is not None
            assert a.onset() < b.onset() and a.settled() <= b.onset(), (r.video_id, text)
            if still is not None:
                check_pixels(Track.of(hcs, still.colour), still)


def test_test_videos_have_order_and_binding_twins(corpus) -> None:
    _, records, _ = corpus
    by_id = {r.video_id: r for r in records}
    for r in (r for r in records if r.split == "test"):
        scene = load_scene(r.meta)
        order, binding = by_id[r.meta["hard_negatives"]["order"]], by_id[r.meta["hard_negatives"]["binding"]]
        assert order.split == binding.split == "test"
        assert not set(r.captions) & set(order.captions) and not set(r.captions) & set(binding.captions)
        o, b = load_scene(order.meta), load_scene(binding.meta)
        # order twin: same objects and event windows, the two actors swapped in time
        assert o.objects == scene.objects and o.background == scene.background
        assert [(e.start, e.end) for e in o.events] == [(e.start, e.end) for e in scene.events]
        assert [(e.obj, e.motion) for e in o.events] == [(e.obj, e.motion) for e in reversed(scene.events)]
        # binding twin: same events and layout, the actors' colours swapped
        assert b.events == scene.events and b.objects[2:] == scene.objects[2:]
        assert [x.colour for x in b.objects[:2]] == [x.colour for x in reversed(scene.objects[:2])]
        assert [x.shape for x in b.objects] == [x.shape for x in scene.objects]
        # a bag of colour/shape/motion words cannot tell the binding twins apart
        assert sorted((x.colour, x.shape) for x in b.objects) != sorted((x.colour, x.shape) for x in scene.objects)
        assert {x.colour for x in b.objects} == {x.colour for x in scene.objects}


def test_heldout_combinations_appear_only_in_test(corpus) -> None:
    summary, records, _ = corpus
    heldout = {tuple(t) for t in json.loads(summary.captions_path.read_text())["heldout_combinations"]}
    assert heldout == set(summary.heldout_combinations)
    for r in records:
        stated = {(c.colour, c.shape, c.motion) for text in r.captions for c in parse_caption(text)[:2]}
        assert stated == load_scene(r.meta).triples()
        assert (r.split == "test" or not stated & heldout), r.video_id
        assert {tuple(t) for t in r.meta["heldout_combinations"]} == stated & heldout
    assert any(r.meta["heldout_combinations"] for r in records if r.split == "test")


def test_scene_in_meta_reproduces_the_video(corpus) -> None:
    _, records, _ = corpus
    for r in records[:4]:
        rendered = render_scene(load_scene(r.meta), SIZE).astype(np.int16)
        assert np.abs(rendered - decode(r.path)).mean() < 4.0  # codec error only


def test_same_seed_same_corpus_whatever_the_worker_count(tmp_path: Path) -> None:
    one = generate_corpus(tmp_path / "one", 8, 11, workers=1)
    two = generate_corpus(tmp_path / "two", 8, 11, workers=2)
    assert one.captions_path.read_bytes() == two.captions_path.read_bytes()
    for a, b in zip(load_captions(one.captions_path), load_captions(two.captions_path)):
        assert hashlib.sha256(decode(a.path).tobytes()).digest() == hashlib.sha256(decode(b.path).tobytes()).digest()
    other = generate_corpus(tmp_path / "other", 8, 12, workers=1)
    assert other.captions_path.read_bytes() != one.captions_path.read_bytes()


def test_partial_group_goes_to_train_with_the_twins_it_has(tmp_path: Path) -> None:
    summary = generate_corpus(tmp_path, 6, 3, workers=1)
    records = load_captions(summary.captions_path)
    assert [r.meta["variant"] for r in records[4:]] == ["base", "order"] and records[5].split == "train"
    assert records[4].meta["hard_negatives"] == {"order": records[5].video_id}


@pytest.mark.parametrize("kwargs", [{"n": 0}, {"seconds": 1.0}, {"size": 16}, {"splits": (0.5, 0.5, 0.5)}])
def test_bad_arguments_are_refused(tmp_path: Path, kwargs: dict) -> None:
    args = {"n": 4, "seed": 0} | kwargs
    with pytest.raises(ValueError):
        generate_corpus(tmp_path, args.pop("n"), args.pop("seed"), workers=1, **args)


def test_a_corpus_can_hold_out_another_seeds_triples(tmp_path) -> None:
    # A fresh test corpus (its own scenes) whose unseen combinations are the ones a model's
    # training streams kept out: those of the validation corpus's seed.
    from pvl_search.data.synth import heldout_combinations, plan_corpus
    from pvl_search.training.recipe import corpus_seed

    assert heldout_combinations(8) != heldout_combinations(7)
    planned = plan_corpus(200, 8, 24, heldout_seed=7)
    held = heldout_combinations(7)
    assert all(p.split == "test" or not set(p.scene.triples()) & held for p in planned)
    assert any(set(p.heldout) for p in planned if p.split == "test")
    assert all(set(p.heldout) <= held for p in planned)
    assert [p.captions for p in planned] != [p.captions for p in plan_corpus(200, 7, 24)]
    captions = tmp_path / "captions.json"
    captions.write_text(json.dumps({"generator": {"seed": 8, "heldout_seed": 7}}))
    assert corpus_seed(captions) == 7  # what a training stream must keep out for this corpus
