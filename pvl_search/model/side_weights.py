"""Weights that live beside a model in a sub-folder of their own (the joint and the patch
rerankers): a config.json and float32 safetensors, written and read one way for both."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def save_beside(module: nn.Module, config_json: str, model_folder: str | Path, subfolder: str) -> Path:
    """Write `module` into `model_folder/subfolder/` (its config JSON + float32 safetensors)."""
    folder = Path(model_folder) / subfolder
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_FILE).write_text(config_json)
    state = {k: v.detach().float().contiguous() for k, v in module.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_FILE))
    return folder


def load_beside(model_folder: str | Path, subfolder: str, build: Callable[[dict], nn.Module], what: str, *,
                device: str | torch.device = "cpu") -> nn.Module | None:
    """The module `build(config)` saved in `model_folder/subfolder/`, in eval mode on `device`;
    None when the folder has none; CheckpointError naming `what` when it is not one."""
    folder = Path(model_folder) / subfolder
    if not (folder / CONFIG_FILE).is_file():
        return None
    from pvl_search.model.checkpoint import CheckpointError  # the model's loader imports the model

    try:
        module = build(json.loads((folder / CONFIG_FILE).read_text()))
        module.load_state_dict(load_file(str(folder / WEIGHTS_FILE)))
    except (OSError, ValueError, TypeError, RuntimeError, SafetensorError) as exc:
        raise CheckpointError(f"{folder}: not {what} ({str(exc).splitlines()[0]})") from None
    return module.to(device).eval()
