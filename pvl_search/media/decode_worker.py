"""The worker-process side of `DecodePool`: one process that decodes jobs sent down a pipe.

Each span's clip goes back as soon as it is decoded (its mask pickled, its frames as raw
bytes), so every span resets the parent's hang timer; a Windows job first sends back the
spans the worker cut it into.

FFmpeg and decord write their warnings about damaged streams ("[h264 @ 0x...] error while
decoding MB") from C to fd 2, straight through the indexer's progress bar. While a job runs,
fd 2 of the worker goes to a scratch file instead (`captured_stderr`); the lines go back with
the job, so the indexer can count them per file and keep them in a log.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np
import torch

from pvl_search.media.shots import detect_cuts, shot_spans, with_shots
from pvl_search.media.types import Fit, Span, VideoDecodeError, VideoInfo
from pvl_search.media.video import is_image, iter_clips, probe
from pvl_search.media.windows import Windows, segment_spans

_MAX_LOG_CHARS = 64 * 1024  # decoder output kept per file; the lines past it are only counted


@dataclass
class DecoderLog:
    """What a decoder wrote to fd 2 while one file was decoded."""

    lines: int = 0  # non-empty lines written
    text: str = ""  # the first _MAX_LOG_CHARS of them


@contextlib.contextmanager
def captured_stderr() -> Iterator[DecoderLog]:
    """Send this process's fd 2 (C libraries included) to a scratch file for the block; the
    yielded DecoderLog is filled in when the block ends. Whatever else the process writes to
    fd 2 meanwhile (another thread) lands there too."""
    log = DecoderLog()
    try:
        scratch = tempfile.TemporaryFile()
    except OSError:  # no room for a scratch file: decode anyway, the messages reach stderr
        yield log
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with scratch:
        os.dup2(scratch.fileno(), 2)
        try:
            yield log
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            scratch.seek(0)
            lines = [line for line in scratch.read().decode(errors="replace").splitlines() if line.strip()]
            log.lines = len(lines)
            log.text = "\n".join(lines)[:_MAX_LOG_CHARS]


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
        with captured_stderr() as log:
            outcome = _decode(conn, message, fit)
        if log.lines:
            conn.send(("log", log))
        conn.send(outcome)


def _decode(conn: Connection, message: tuple, fit: Fit) -> tuple[str, VideoDecodeError | None]:
    """Decode one job, sending its plan and clips; returns the message that ends it."""
    path, spans, num_frames, size, backend = message
    try:
        if isinstance(spans, Windows):
            spans, info = plan_windows(Path(path), spans)
            conn.send(("plan", (spans, info)))
        for clip in iter_clips(Path(path), spans, num_frames, size, backend=backend, fit=fit, threads=1):
            conn.send(("clip", clip.mask))
            conn.send_bytes(np.ascontiguousarray(clip.frames).reshape(-1))
        return ("done", None)
    except VideoDecodeError as error:
        return ("error", error)
    except Exception as error:  # noqa: BLE001 -- any failure is this file's failure
        return ("error", VideoDecodeError(path, f"{type(error).__name__}: {error}"))


def plan_windows(path: Path, windows: Windows) -> tuple[list[Span] | None, VideoInfo]:
    """Probe the file and cut it into windows; an image, or a video whose header gives no
    duration, is one clip over all of it (spans None)."""
    info = probe(path)
    if is_image(path) or not info.duration or info.duration <= 0:
        return None, info
    spans = segment_spans(info.duration, windows.window_s, windows.stride_s)
    if windows.shots:
        spans = with_shots(spans, shot_spans(detect_cuts(path), info.duration, windows.window_s))
    return spans, info
