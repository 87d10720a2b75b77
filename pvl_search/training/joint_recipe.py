"""A reranker training run (`pvl-search train-reranker`): the frozen model, fresh chunks of
the scene stream, validation on a captions file's val split, checkpoints that resume exactly.
`kind` "joint" trains the cross-encoder over video latents, "patch" the one over patch tokens.

Per chunk: render it (pvl_search.data.scene_stream), encode it with the frozen towers, train
`passes` listwise passes over its captions (pvl_search.training.joint_reranker), validate,
checkpoint. `OUT/last/` is the newest state (reranker, optimizer, schedule, random state, the
chunk it finished); `OUT/best/` the reranker with the best validation R@1 at the selection K;
`OUT/log.jsonl` one line per chunk. A killed run started again with the same options continues
from `OUT/last/` and ends with the weights an uninterrupted run would have.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from pvl_search.data.pairs import load_pair_sets
from pvl_search.data.scene_stream import StreamSpec, read_chunk, write_chunk
from pvl_search.model.checkpoint import load_model, read_safetensors
from pvl_search.model.joint_reranker import JointReranker, JointRerankerConfig, load_reranker, save_reranker
from pvl_search.model.patch_reranker import (
    PatchReranker,
    PatchRerankerConfig,
    load_patch_reranker,
    save_patch_reranker,
)
from pvl_search.model.tokenizer import Tokenizer
from pvl_search.training.joint_reranker import (
    JointTrainConfig,
    encode_pool,
    make_optimizer,
    train_on_pool,
    validate,
)

STATE_FILE = "train_state.safetensors"
META_FILE = "train_state.json"


@dataclass(frozen=True)
class JointRun:
    model_dir: str  # the frozen retrieval model
    captions: str  # validation captions (a `pvl-search synth` corpus)
    out: str
    stream_seed: int
    heldout_seed: int  # the evaluation corpus whose held-out triples stay out of training
    chunks: int
    groups_per_chunk: int = 512
    layers: int = 2
    heads: int = 4
    select_k: int = 16  # validation R@1 at this K picks the best checkpoint
    train: JointTrainConfig = field(default_factory=JointTrainConfig)
    kind: str = "joint"  # "joint" (reads video latents) or "patch" (reads patch tokens)
    width: int = 64  # the patch reranker's own width
    init: str | None = None  # a folder whose reranker (of this kind) the run starts from


def run_joint_training(run: JointRun, *, resume: bool = False, on_event: Callable[[dict], None] | None = None
                       ) -> dict:
    """Train (or resume) the run; returns its last log line."""
    if not 0 <= run.train.random_candidates < run.train.candidates:
        raise ValueError(f"random candidates ({run.train.random_candidates}) must be fewer than the candidates "
                         f"({run.train.candidates})")
    out = Path(run.out)
    out.mkdir(parents=True, exist_ok=True)
    _check_run_record(out, run, resume)
    model = load_model(run.model_dir)
    for p in model.parameters():
        p.requires_grad_(False)
    config = model.config
    torch.manual_seed(run.train.seed)  # the reranker's initial weights
    reranker = new_reranker(run, config)
    if run.init is not None:
        reranker.load_state_dict(_load(reranker, Path(run.init)).state_dict())
    patches = run.kind == "patch"
    steps_per_chunk = run.train.passes * (4 * run.groups_per_chunk * 4 // run.train.batch_queries)  # ~4 captions each
    optimizer, schedule = make_optimizer(reranker, run.train, run.chunks * steps_per_chunk)
    generator = torch.Generator().manual_seed(run.train.seed)
    start, best = 0, -1.0
    if resume and (out / "last" / META_FILE).is_file():
        start, best = _load_state(out / "last", reranker, optimizer, schedule, generator)
    val = encode_pool(model, _val_pairs(run, config, out), patches=patches)
    spec = StreamSpec(seed=run.stream_seed, heldout_seed=run.heldout_seed, groups_per_chunk=run.groups_per_chunk,
                      model_frames=config.frames, model_size=config.frame_size)
    tokenizer = Tokenizer(config.text_length)
    line: dict = {}
    for chunk in range(start, run.chunks):
        began = time.perf_counter()
        write_chunk(out / "stream", spec, chunk)
        pool = encode_pool(model, read_chunk(out / "stream", spec, chunk, tokenizer), patches=patches)
        losses: list[float] = []
        train_on_pool(reranker, pool, run.train, model.retrieval_scale, optimizer, schedule, generator,
                      on_step=losses.append)
        metrics = validate(reranker, val, model.retrieval_scale)
        selected = metrics[f"joint@{run.select_k}"]["r1"]
        line = {"chunk": chunk, "steps": schedule.last_epoch, "loss": sum(losses) / max(1, len(losses)),
                "seconds": round(time.perf_counter() - began, 1), "val": metrics}
        if selected > best:
            best = selected
            _save(reranker, out / "best")
        _save_state(out / "last", reranker, optimizer, schedule, generator, chunk + 1, best)
        with open(out / "log.jsonl", "a") as log:
            log.write(json.dumps(line) + "\n")
        _drop_chunk(out / "stream", chunk)
        if on_event is not None:
            on_event(line)
    return line


def new_reranker(run: JointRun, config: object) -> JointReranker | PatchReranker:
    """The untrained reranker `run.kind` names, shaped for the frozen model's `config`."""
    if run.kind == "joint":
        return JointReranker(JointRerankerConfig(config.hidden, config.latents, config.latents,
                                                 heads=run.heads, layers=run.layers))
    if run.kind == "patch":
        return PatchReranker(PatchRerankerConfig(config.hidden, config.latents, config.patch_tokens, width=run.width,
                                                 heads=run.heads, layers=run.layers))
    raise ValueError(f"reranker kind must be joint or patch, got {run.kind!r}")


def _save(reranker: JointReranker | PatchReranker, folder: Path) -> Path:
    return (save_patch_reranker if isinstance(reranker, PatchReranker) else save_reranker)(reranker, folder)


def _load(like: JointReranker | PatchReranker, folder: Path) -> JointReranker | PatchReranker:
    """The reranker of `like`'s kind saved in `folder` (ValueError when it holds none)."""
    saved = (load_patch_reranker if isinstance(like, PatchReranker) else load_reranker)(folder)
    if saved is None:
        raise ValueError(f"{folder} holds no {'patch' if isinstance(like, PatchReranker) else 'joint'} reranker")
    return saved


def _val_pairs(run: JointRun, config: object, out: Path):  # noqa: ANN202 - a PairSet
    sets, _ = load_pair_sets(run.captions, config, out / "frame-cache", splits=("val",))
    return sets["val"]


def _check_run_record(out: Path, run: JointRun, resume: bool) -> None:
    """run.json keeps the options; a resume with other options, or a new run over an old one,
    is refused."""
    record = out / "run.json"
    mine = asdict(run)
    if record.is_file():
        theirs = json.loads(record.read_text())
        if not resume:
            raise ValueError(f"{out} already holds a reranker run; pass --resume to continue it, or choose another "
                             "--out")
        if theirs != json.loads(json.dumps(mine)):
            raise ValueError(f"--resume: {out} was started with other options; pass the same ones")
        return
    if resume:
        raise ValueError(f"--resume: {out} holds no reranker run to continue")
    record.write_text(json.dumps(mine, indent=1))


def _save_state(folder: Path, reranker: JointReranker | PatchReranker, optimizer: torch.optim.Optimizer,
                schedule: torch.optim.lr_scheduler.LambdaLR, generator: torch.Generator, chunk: int,
                best: float) -> None:
    """Everything a resume needs, written to a temporary folder and renamed into place."""
    tmp = folder.with_name(folder.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    _save(reranker, tmp)
    tensors = {"generator": generator.get_state(), "torch_rng": torch.get_rng_state()}
    steps = {}
    for i, param in enumerate(p for group in optimizer.param_groups for p in group["params"]):
        state = optimizer.state.get(param, {})
        if state:
            tensors[f"{i}.exp_avg"], tensors[f"{i}.exp_avg_sq"] = state["exp_avg"], state["exp_avg_sq"]
            steps[i] = float(state["step"])
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / STATE_FILE))
    (tmp / META_FILE).write_text(json.dumps({"chunk": chunk, "best": best, "schedule": schedule.last_epoch,
                                             "steps": steps}))
    if folder.exists():
        old = folder.with_name(folder.name + ".old")
        os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old)
    else:
        os.replace(tmp, folder)


def _load_state(folder: Path, reranker: JointReranker | PatchReranker, optimizer: torch.optim.Optimizer,
                schedule: torch.optim.lr_scheduler.LambdaLR, generator: torch.Generator) -> tuple[int, float]:
    saved = _load(reranker, folder)
    reranker.load_state_dict(saved.state_dict())
    meta = json.loads((folder / META_FILE).read_text())
    tensors, _ = read_safetensors(folder / STATE_FILE)  # a cut-short file: one line naming it
    generator.set_state(tensors["generator"])
    torch.set_rng_state(tensors["torch_rng"])
    for i, param in enumerate(p for group in optimizer.param_groups for p in group["params"]):
        if str(i) in meta["steps"]:
            optimizer.state[param] = {"step": torch.tensor(meta["steps"][str(i)]),
                                      "exp_avg": tensors[f"{i}.exp_avg"], "exp_avg_sq": tensors[f"{i}.exp_avg_sq"]}
    schedule.last_epoch = meta["schedule"]
    schedule._last_lr = [base * schedule.lr_lambdas[0](schedule.last_epoch) for base in schedule.base_lrs]
    for group, lr in zip(optimizer.param_groups, schedule._last_lr):
        group["lr"] = lr
    return int(meta["chunk"]), float(meta["best"])


def _drop_chunk(stream_dir: Path, chunk: int) -> None:
    """A used chunk's frames are not needed again (the stream regenerates a chunk if asked)."""
    from pvl_search.data.scene_stream import chunk_name

    shutil.rmtree(stream_dir / chunk_name(chunk))
