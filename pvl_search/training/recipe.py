"""A whole training run from a captions file: frame cache, splits, model (fresh, CLIP-
initialised or resumed), the training loop, and a summary the CLI prints."""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from pvl_search.data.pairs import load_pair_sets
from pvl_search.data.scene_stream import SceneStream, StreamSpec
from pvl_search.model.checkpoint import save_clip_seconds
from pvl_search.model.config import ModelConfig
from pvl_search.model.perceiver import PerceiverVL
from pvl_search.training.loop import ProgressFn, TrainConfig, TrainResult, train
from pvl_search.training.train_state import check_resumable, has_checkpoint


@dataclass
class RunSummary:
    out_dir: str
    train_videos: int
    val_videos: int
    failed_videos: dict[str, str]
    steps: int
    resumed_at: int  # the step a --resume continued from (0: the run started fresh)
    seconds: float
    best_epoch: int
    best_val_r1: float
    init: str | None
    command_config: dict

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class StreamOptions:
    """Train on fresh generated videos (pvl_search.data.scene_stream) instead of a captions file's train split."""

    seed: int  # the stream's seed
    heldout_seed: int  # seed of the evaluation corpus: its held-out triples never appear
    groups: int = 512  # twin groups (4 videos each) per chunk = per epoch
    passes: int = 1  # epochs per chunk
    folder: str | None = None  # where chunks go (default OUT/stream)


def corpus_seed(captions_path: str | Path) -> int:
    """The seed whose held-out triples a `pvl-search synth` captions file uses (its own seed, or
    the --heldout-seed it was made with)."""
    try:
        generator = json.loads(Path(captions_path).read_text())["generator"]
        return int(generator.get("heldout_seed", generator["seed"]))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{captions_path}: not a `pvl-search synth` captions file (no generator seed)") from exc


MODEL_INIT_PREFIX = "model:"


def init_from_checkpoint(model: PerceiverVL, folder: str | Path) -> None:
    """Start from an own checkpoint's weights with a fresh schedule (a longer or changed
    recipe), unlike --resume, which continues the same run. The architectures must agree."""
    from pvl_search.model.checkpoint import load_model

    source = load_model(folder)
    if source.config != model.config:
        mine, theirs = model.config.to_dict(), source.config.to_dict()
        differ = [k for k in mine if mine[k] != theirs.get(k)]
        raise ValueError(f"--init {MODEL_INIT_PREFIX}{folder}: its config differs in {', '.join(differ)} "
                         f"(pass the same architecture options it was trained with)")
    model.load_state_dict(source.state_dict())


def train_from_captions(
    captions_path: str | Path,
    out_dir: str | Path,
    config: ModelConfig,
    cfg: TrainConfig,
    *,
    init: str | None = None,
    train_only: str = "all",
    resume: bool = False,
    cache_dir: str | Path | None = None,
    limit: int | None = None,
    progress: ProgressFn | None = None,
    cache_progress: Callable[[int, int], None] | None = None,
    stream: StreamOptions | None = None,
) -> RunSummary:
    """Train on the `train` split of a captions file, validating on `val` each epoch.

    `init` = "clip:MODEL:PATH" starts the self-attention stack from a local CLIP checkpoint
    (paper 4.2), and `train_only="cross"` then trains only what CLIP did not provide (stage
    one of the paper's two-stage schedule); "model:DIR" starts from an own checkpoint of the
    same architecture, on a fresh schedule. `limit` caps the videos per split (quick runs).

    With `stream`, training videos come fresh from the synthetic generator (scene_stream) and
    the captions file gives only the validation split.
    """
    out = Path(out_dir)
    record_run(out, run_decisions(captions_path, config, cfg, init, train_only, stream, limit), resume=resume)
    datasets, failed = load_pair_sets(captions_path, config, Path(cache_dir) if cache_dir else out / "frame-cache",
                                      limit=limit, cache_progress=cache_progress,
                                      splits=("val",) if stream else ("train", "val"))
    if stream is not None:
        spec = StreamSpec(seed=stream.seed, heldout_seed=stream.heldout_seed, groups_per_chunk=stream.groups,
                          model_frames=config.frames, model_size=config.frame_size)
        datasets["train"] = SceneStream(stream.folder or out / "stream", spec, config.text_length,
                                        passes=stream.passes, patch=config.patch)
    clip = training_clip_seconds(captions_path, stream)
    if clip is not None:  # so the best weights tell `index` what windows fit them
        save_clip_seconds(out / "best", *clip)
    model, trainable = initial_model(config, cfg, init, train_only)
    result: TrainResult = train(
        model, datasets["train"], datasets["val"], cfg, out, resume=resume, trainable=trainable, progress=progress
    )
    return RunSummary(
        str(out), len(datasets["train"]), len(datasets["val"]), failed, result.steps, result.resumed_at,
        result.seconds, result.best_epoch, result.best_r1, init, cfg.to_dict(),
    )


def training_clip_seconds(captions_path: str | Path, stream: StreamOptions | None) -> tuple[float, str] | None:
    """The length of the clips a run trains on, and where it comes from: the synthetic stream's,
    or a `pvl-search synth` captions file's (frames / fps); None for other captions, whose
    videos differ in length (the model folder then records none)."""
    if stream is not None:
        return StreamSpec.seconds, "the synthetic training stream (scene_stream.StreamSpec)"
    try:
        generator = json.loads(Path(captions_path).read_text())["generator"]
        return float(generator["frames"]) / float(generator["fps"]), f"the synth videos of {captions_path}"
    except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError):
        return None


def check_init_options(init: str | None, train_only: str) -> None:
    """Refuse a --train-only that the --init does not allow (before any model is built)."""
    if train_only == "all":
        return
    if init and init.startswith(MODEL_INIT_PREFIX):
        raise ValueError("--train-only cross is stage one after a CLIP init; it does not apply to --init model:")
    if not init:
        raise ValueError("--train-only cross needs --init clip:MODEL:PATH (nothing is pre-trained otherwise)")


def initial_model(
    config: ModelConfig, cfg: TrainConfig, init: str | None, train_only: str
) -> tuple[PerceiverVL, list[torch.nn.Parameter] | None]:
    """The model to train (fresh, from CLIP or from an own checkpoint), and the parameters to
    train when only some are (None: all)."""
    check_init_options(init, train_only)
    torch.manual_seed(cfg.seed)
    model = PerceiverVL(config)
    trainable = None
    if init and init.startswith(MODEL_INIT_PREFIX):
        init_from_checkpoint(model, init[len(MODEL_INIT_PREFIX):])
    elif init:
        from pvl_search.training.clip_init import init_from_clip, parse_init_spec, trainable_parameters

        name, weights = parse_init_spec(init)
        report = init_from_clip(model, name, weights)
        if train_only != "all":
            trainable = trainable_parameters(model, train_only, copied=report.copied)
    return model, trainable


RUN_RECORD = "run.json"


def run_decisions(
    captions_path: str | Path, config: ModelConfig, cfg: TrainConfig, init: str | None, train_only: str,
    stream: StreamOptions | None, limit: int | None,
) -> dict:
    """Everything that decides what a run trains, as plain JSON values: a resume must match it."""
    return json.loads(json.dumps({
        "captions": str(captions_path), "config": config.to_dict(), "train": cfg.to_dict(), "init": init,
        "train_only": train_only, "stream": None if stream is None else asdict(stream), "limit": limit,
    }, default=str))


def record_run(out: Path, decisions: dict, *, resume: bool) -> None:
    """out/run.json: what the run was started with, and on what. A resume of a checkpointed
    run keeps the record, refuses changed options (it would no longer be the same run) and
    notes where and when it continued; a new run into a checkpointed folder is refused."""
    if resume:  # before anything in `out` is made or touched, or a video decoded
        check_resumable(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / RUN_RECORD
    where = {"torch": torch.__version__, "threads": torch.get_num_threads(),
             "machine": platform.processor() or platform.machine(), "at": time.strftime("%Y-%m-%d %H:%M:%S")}
    checkpointed = has_checkpoint(out)
    if checkpointed and not resume:  # starting over would overwrite its checkpoints and mix its log
        raise ValueError(f"{out} already holds a training run; pass --resume to continue it, or choose another --out")
    if resume and path.exists() and checkpointed:
        record = json.loads(path.read_text())
        changed = _changed_options(record, decisions)
        if changed:
            raise ValueError(f"--resume: {out} was started with other options ({'; '.join(changed)}); pass the "
                             f"same options to continue it, or start a new run (--init model:{out / 'last'} "
                             "keeps its weights on a fresh schedule)")
        record.setdefault("resumed", []).append(where)
    else:
        record = {**decisions, "torch": where["torch"], "threads": where["threads"], "machine": where["machine"],
                  "started": where["at"]}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, path)


# A run may continue on another device; every other recorded option decides the result.
_MAY_CHANGE_ON_RESUME = ("train.device",)


def _changed_options(recorded: dict, now: dict, prefix: str = "") -> list[str]:
    """One "name was X, now Y" line for each option of `now` that the record holds with
    another value (an option the record predates is not compared)."""
    changed = []
    for key, value in now.items():
        name = prefix + key
        if key not in recorded or name in _MAY_CHANGE_ON_RESUME:
            continue
        if isinstance(value, dict) and isinstance(recorded[key], dict):
            changed += _changed_options(recorded[key], value, name + ".")
        elif recorded[key] != value:
            changed.append(f"{name} was {recorded[key]}, now {value}")
    return changed
