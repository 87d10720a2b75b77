"""What runs when nothing is said: the shipped model folder, and the device to run on."""

from __future__ import annotations

from pathlib import Path

import torch

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "weights" / "tiny-synth"


def pick_device(device: str | None) -> torch.device:
    """`device` checked before any model goes there (None: cuda when available, else cpu);
    a name torch does not know, or a GPU that is not there, is a ValueError in one line."""
    if not device:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"device {device!r} is not known: use cpu, cuda or cuda:N") from None
    if chosen.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device {device!r}: no CUDA GPU is available here (use cpu)")
        if chosen.index is not None and chosen.index >= count:
            raise ValueError(f"device {device!r}: there is no GPU {chosen.index} ({count} available)")
    elif chosen.type != "cpu":
        raise ValueError(f"device {device!r} is not supported: use cpu, cuda or cuda:N")
    return chosen
