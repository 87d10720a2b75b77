"""Pixels and files for synthetic scenes: object shape masks, background images, and the
deterministic H.264 encoder that writes them as MP4.

`synth.render_scene` composes these into a scene's frames; `scene_labels` uses the same
shape masks to say which object each pixel shows.
"""

from __future__ import annotations

import os
from pathlib import Path

import av
import numpy as np

from pvl_search.data.scene import Background


def shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Which pixels a shape of half-extent `r` covers, given their offsets (dx, dy) from its centre."""
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
