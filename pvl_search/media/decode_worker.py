"""The worker-process side of `DecodePool`: one process that decodes jobs sent down a pipe.

Each span's clip goes back as soon as it is decoded (its mask pickled, its frames as raw
bytes), so every span resets the parent's hang timer; a Windows job first sends back the
spans the worker cut it into.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np
import torch

from pvl_search.media.types import Fit, Span, VideoDecodeError, VideoInfo
from pvl_search.media.video import is_image, iter_clips, probe
from pvl_search.media.windows import Windows, segment_spans


def _die_with_parent() -> None:
    """Linux: get SIGKILLed if the forkserver (our parent) exits, so that a worker stuck in
    decord cannot outlive the program that started it."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)


def worker_main(conn: Connection, fit: Fit) -> None:
    """Decode jobs one at a time; report each span as it is done, so progress resets the timer."""
    _die_with_parent()
    torch.set_num_threads(1)
    conn.send(("ready", os.getpid()))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        path, spans, num_frames, size, backend = message
        try:
            if isinstance(spans, Windows):
                spans, info = plan_windows(Path(path), spans)
                conn.send(("plan", (spans, info)))
            for clip in iter_clips(Path(path), spans, num_frames, size, backend=backend, fit=fit, threads=1):
                conn.send(("clip", clip.mask))
                conn.send_bytes(np.ascontiguousarray(clip.frames).reshape(-1))
            conn.send(("done", None))
        except VideoDecodeError as error:
            conn.send(("error", error))
        except Exception as error:  # noqa: BLE001 -- any failure is this file's failure
            conn.send(("error", VideoDecodeError(path, f"{type(error).__name__}: {error}")))


def plan_windows(path: Path, windows: Windows) -> tuple[list[Span] | None, VideoInfo]:
    """Probe the file and cut it into windows; an image, or a video whose header gives no
    duration, is one clip over all of it (spans None)."""
    info = probe(path)
    if is_image(path) or not info.duration or info.duration <= 0:
        return None, info
    return segment_spans(info.duration, windows.window_s, windows.stride_s), info
