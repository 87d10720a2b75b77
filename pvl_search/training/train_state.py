"""The training state a resumed run needs beside the model: optimizer moments and counters,
the attribute heads and the negative bank, all as safetensors (resuming never unpickles).

A checkpoint folder is written whole beside the old one and swapped in by two renames
(`write_checkpoint`), so a crash at any point leaves either the old or the new checkpoint,
never weights of one step with the optimizer state of another.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from pvl_search.model.checkpoint import WEIGHTS_FILE, CheckpointError, load_state, read_safetensors, save_model
from pvl_search.model.perceiver import PerceiverVL
from pvl_search.training.attribute_heads import AttributeHeads
from pvl_search.training.negative_bank import NegativeBank

TRAIN_STATE_FILE = "train_state.safetensors"
BANK_FILE = "negative_bank.safetensors"
HEADS_FILE = "attribute_heads.safetensors"


def has_checkpoint(out: Path) -> bool:
    """Whether the run folder `out` holds a resumable checkpoint (`out/last` with its training state)."""
    settle_checkpoint(out / "last")
    return (out / "last" / TRAIN_STATE_FILE).exists()


def _beside(folder: Path, tag: str) -> Path:
    return folder.with_name(f"{folder.name}.{tag}")


def settle_checkpoint(folder: Path) -> None:
    """Finish a swap that a crash interrupted: with `folder` gone, the previous checkpoint
    (renamed aside first) takes its place again."""
    previous = _beside(folder, "previous")
    if not folder.exists() and previous.exists():
        os.replace(previous, folder)


def check_resumable(out: Path) -> None:
    """Refuse a resume of the run in `out` before anything is loaded or written: with no
    checkpoint there is nothing to continue (say how to start fresh), and a missing or corrupt
    file in `out/last` is named. There is no older resumable checkpoint to fall back on
    (`best` holds weights only), so none is taken; the message points at it instead."""
    last = out / "last"
    if not has_checkpoint(out):
        raise CheckpointError(f"--resume: nothing to resume in {out} ({last / TRAIN_STATE_FILE} not found); "
                              "leave out --resume to start the run fresh")
    for name in (WEIGHTS_FILE, TRAIN_STATE_FILE, HEADS_FILE, BANK_FILE):
        if name in (HEADS_FILE, BANK_FILE) and not (last / name).exists():
            continue  # written only by runs whose losses use them; restore_checkpoint asks when it needs one
        try:
            read_safetensors(last / name, header_only=True)
        except CheckpointError as exc:
            raise _unresumable(out, exc) from None


def _unresumable(out: Path, exc: CheckpointError) -> CheckpointError:
    """`exc` (which names the file) as the reason the run in `out` cannot be resumed."""
    best = out / "best" / WEIGHTS_FILE
    hint = (f"; --init model:{best.parent} starts from its best weights on a fresh schedule, into a new --out"
            if best.is_file() else "")
    return CheckpointError(f"{exc}: the checkpoint {out / 'last'} cannot be resumed{hint}")


def save_train_state(folder: Path, optimizer: torch.optim.Optimizer, meta: dict) -> None:
    """Optimizer moments as safetensors and counters as metadata: resuming never unpickles."""
    tensors, scalars = {}, {}
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value) and value.dim() > 0:
                tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{key}"] = float(value)
    tmp = folder / (TRAIN_STATE_FILE + ".tmp")
    save_file(tensors, str(tmp), metadata={"meta": json.dumps(meta), "scalars": json.dumps(scalars)})
    os.replace(tmp, folder / TRAIN_STATE_FILE)


def load_train_state(folder: Path, optimizer: torch.optim.Optimizer) -> dict:
    """Load what `save_train_state` wrote into `optimizer`; returns its counters."""
    path = folder / TRAIN_STATE_FILE
    tensors, metadata = read_safetensors(path)
    try:
        scalars, meta = json.loads(metadata["scalars"]), json.loads(metadata["meta"])
        state: dict[int, dict] = {}
        for name, value in tensors.items():
            index, key = name.split(".", 1)
            state.setdefault(int(index), {})[key] = value
        for name, value in scalars.items():
            index, key = name.split(".", 1)
            state.setdefault(int(index), {})[key] = torch.tensor(value)
    except (KeyError, ValueError, TypeError) as exc:  # readable safetensors, but not what we write
        raise CheckpointError(f"{path}: not a training state ({type(exc).__name__}: {exc})") from None
    saved = optimizer.state_dict()
    saved["state"] = state
    optimizer.load_state_dict(saved)
    return meta


def write_checkpoint(
    model: PerceiverVL, folder: Path, optimizer: torch.optim.Optimizer, meta: dict, bank: NegativeBank | None,
    heads: AttributeHeads | None = None,
) -> None:
    """The resumable checkpoint `folder`: written whole into FOLDER.partial, then swapped in."""
    settle_checkpoint(folder)
    final, folder = folder, _beside(folder, "partial")
    shutil.rmtree(folder, ignore_errors=True)
    save_model(model, folder)
    if heads is not None:  # training-only weights: part of the state a resume needs
        tmp = folder / (HEADS_FILE + ".tmp")
        save_file({k: v.detach().cpu().contiguous() for k, v in heads.state_dict().items()}, str(tmp))
        os.replace(tmp, folder / HEADS_FILE)
    if bank is not None:  # part of the training state: a resumed run mines what this one would
        tmp = folder / (BANK_FILE + ".tmp")
        save_file({k: v.contiguous() for k, v in bank.state_dict().items()}, str(tmp))
        os.replace(tmp, folder / BANK_FILE)
    save_train_state(folder, optimizer, meta)
    previous = _beside(final, "previous")
    shutil.rmtree(previous, ignore_errors=True)
    if final.exists():
        os.replace(final, previous)
    os.replace(folder, final)  # a crash before this line: settle_checkpoint restores `previous`
    shutil.rmtree(previous, ignore_errors=True)


def restore_checkpoint(
    folder: Path, model: PerceiverVL, optimizer: torch.optim.Optimizer, bank: NegativeBank | None,
    heads: AttributeHeads | None,
) -> dict:
    """Load what `write_checkpoint` wrote into the live objects; returns its counters."""
    settle_checkpoint(folder)
    load_state(model, read_safetensors(folder / WEIGHTS_FILE)[0], source=str(folder))
    if bank is not None and (folder / BANK_FILE).exists():
        bank.load_state_dict(read_safetensors(folder / BANK_FILE)[0])
    if heads is not None:
        heads.load_state_dict(read_safetensors(folder / HEADS_FILE)[0])
    return load_train_state(folder, optimizer)


def rewind_log(path: Path, meta: dict) -> None:
    """Cut a run's JSON-lines log back to the checkpoint a resume starts from: step records
    after its step, and epoch records from its epoch on, are dropped (the resumed run writes
    them again), as is a line half-written when the process died. The resumed log then reads
    as an uninterrupted run's."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("kind") == "step" and record["step"] > meta["step"]:
            continue
        if record.get("kind") == "epoch" and record["epoch"] >= meta["epoch"]:
            continue
        kept.append(line + "\n")
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)
