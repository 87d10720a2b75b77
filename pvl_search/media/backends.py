"""The decoder choices, in a module without heavy imports (the CLI types `--decoder` with it
before `--help` may load torch or decord)."""

from __future__ import annotations

from typing import Literal, get_args

Backend = Literal["auto", "decord", "pyav"]  # auto: decord, then PyAV for files decord cannot open
BACKENDS: tuple[str, ...] = get_args(Backend)
