"""Weights on disk: `model.safetensors` + `config.json` in one folder. Loading never unpickles."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from pvl_search.model.config import ModelConfig
from pvl_search.model.perceiver import PerceiverVL
from pvl_search.ranking import FUSIONS

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
# Optional: how searches should use this model, as chosen on validation when it was shipped,
# e.g. {"rerank": "latent", "rerank_k": 16}. Not part of the fingerprint: it changes no vector.
SEARCH_DEFAULTS_FILE = "search_defaults.json"
_SEARCH_DEFAULT_KEYS = {"rerank": str, "rerank_k": int, "fusion": str, "patch_weight": (int, float), "chosen_by": str}
# The values a model may choose (the search layer's modes and fusions are checked against these).
# Never single: too slow to be a default.
SEARCH_DEFAULT_RERANKS = ("stacked", "patch", "joint", "mixed", "latent", "none")
MAX_DEFAULT_RERANK_K = 1000  # = indexer.search.request.MAX_RERANK_K (a test keeps them equal)

# Optional: {"clip_s": 3.0, "source": ...}, the length of the clips the model was trained on.
# Not part of the fingerprint either: it decides how videos are cut, not what a clip encodes.
CLIP_FILE = "clip.json"


class CheckpointError(ValueError):
    """A weights folder that cannot be loaded; the message names the file or tensor."""


def save_model(model: PerceiverVL, folder: str | Path, *, dtype: torch.dtype = torch.float32) -> Path:
    """Write weights (as `dtype`, e.g. float16 to ship small) and the config; atomic per file."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().to("cpu", dtype).contiguous() for name, t in model.state_dict().items()}
    tmp = folder / (WEIGHTS_FILE + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt", "pvl_search": "1"})
    os.replace(tmp, folder / WEIGHTS_FILE)
    model.config.save(folder / CONFIG_FILE)
    return folder


def load_model(folder: str | Path, *, device: str | torch.device = "cpu") -> PerceiverVL:
    """Rebuild the model from its config and load its weights in float32, checking every tensor."""
    folder = Path(folder)
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (a model folder holds {CONFIG_FILE} and {WEIGHTS_FILE})")
    try:
        config = ModelConfig.load(config_path)
    except (ValueError, TypeError) as exc:
        message = str(exc)  # name the file, once (read errors already start with it)
        named = message if message.startswith(str(config_path)) else f"{config_path}: {message}"
        raise CheckpointError(named) from None
    tensors, _ = read_safetensors(weights_path)
    model = PerceiverVL(config)
    load_state(model, tensors, source=str(weights_path))
    return model.to(device).eval()


def read_safetensors(
    path: str | Path, *, header_only: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A safetensors file's tensors and metadata. A missing file, or one cut short (a full disk,
    a copy that stopped), is a CheckpointError naming it, never a traceback. `header_only` reads
    no tensor ({}) but still fails a truncated file: opening checks the header against its length."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    try:
        with safe_open(str(path), "pt") as handle:
            tensors = {} if header_only else {name: handle.get_tensor(name) for name in handle.keys()}
            return tensors, handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None


def load_state(model: PerceiverVL, tensors: dict[str, torch.Tensor], *, source: str) -> None:
    """Copy tensors into the model; any missing, unexpected or mis-shaped tensor is an error."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing:
        raise CheckpointError(f"{source}: tensor {missing[0]!r} is missing ({len(missing)} missing in all)")
    if unexpected:
        raise CheckpointError(f"{source}: unexpected tensor {unexpected[0]!r} (does the config match?)")
    for name, value in tensors.items():
        if value.shape != expected[name].shape:
            raise CheckpointError(
                f"{source}: tensor {name!r} has shape {tuple(value.shape)}, "
                f"the config needs {tuple(expected[name].shape)}"
            )
    model.load_state_dict({k: v.float() for k, v in tensors.items()})


def weights_fingerprint(folder: str | Path) -> str:
    """sha256 of config + weights: what an index records to refuse another model."""
    digest = hashlib.sha256()
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        with open(Path(folder) / name, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def load_search_defaults(folder: str | Path) -> dict:
    """The folder's search_defaults.json ({} when there is none); a malformed one is an error."""
    path = Path(folder) / SEARCH_DEFAULTS_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not readable JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    for key, value in data.items():
        kind = _SEARCH_DEFAULT_KEYS.get(key)
        if kind is None or not isinstance(value, kind) or isinstance(value, bool):
            raise CheckpointError(f"{path}: unexpected entry {key!r}: {value!r}")
    allowed = {"rerank": SEARCH_DEFAULT_RERANKS, "fusion": FUSIONS}
    for key, values in allowed.items():
        if key in data and data[key] not in values:
            raise CheckpointError(f"{path}: {key} must be one of {', '.join(values)}, not {data[key]!r}")
    if "rerank_k" in data and not 1 <= data["rerank_k"] <= MAX_DEFAULT_RERANK_K:
        raise CheckpointError(f"{path}: rerank_k must be between 1 and {MAX_DEFAULT_RERANK_K}, not {data['rerank_k']}")
    if "patch_weight" in data and not 0 <= data["patch_weight"] <= 100:
        raise CheckpointError(f"{path}: patch_weight must be between 0 and 100, not {data['patch_weight']}")
    return data


def load_clip_seconds(folder: str | Path) -> float | None:
    """The clip length (seconds) the model in `folder` was trained on, from its clip.json;
    None when the folder does not record it. `index` cuts videos into windows of this length
    (pvl_search/media/windows.py)."""
    path = Path(folder) / CLIP_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not readable JSON ({exc})") from exc
    seconds = data.get("clip_s") if isinstance(data, dict) else None
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0.1 <= seconds <= 3600:
        raise CheckpointError(f"{path}: clip_s must be a number of seconds in [0.1, 3600], not {seconds!r}")
    return float(seconds)


def save_clip_seconds(folder: str | Path, seconds: float, source: str) -> None:
    """Record in `folder` the clip length its model trains on, and where that came from."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / (CLIP_FILE + ".tmp")
    tmp.write_text(json.dumps({"clip_s": round(float(seconds), 4), "source": source}) + "\n")
    os.replace(tmp, folder / CLIP_FILE)
