"""The model-research commands: make the synthetic benchmark, train, probe, profile and
evaluate. Parse, call one library function, present (cli_views)."""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

import cli_views as views
from cli_common import (
    AsJson,
    DbUrl,
    Device,
    Dtype,
    IndexDir,
    ModelDir,
    _domain_errors,
    _load_runner,
    app,
    console,
    err_console,
    fail,
    quiet_ray_logs,
)
from pvl_search.ranking import FUSION_HELP, Fusion
from pvl_search.training.loss_weights import LOSSES


@app.command()
def profile(
    config: Annotated[str, typer.Option(help="Model preset: base (the paper's) or tiny.")] = "base",
    frames: Annotated[int | None, typer.Option(help="Frames per video (default: the preset's).")] = None,
    latents: Annotated[int | None, typer.Option(help="Latent array size N (default: the preset's).")] = None,
    cross_layers: Annotated[
        int | None, typer.Option(help="Keep only the first C cross-attentions at inference.")
    ] = None,
    candidates: Annotated[int, typer.Option(help="Candidates scored at once by the reranker.")] = 50,
    dtype: Annotated[str, typer.Option(help="float32 or bfloat16.")] = "float32",
    repeats: Annotated[int, typer.Option(help="Timed runs per row (median reported).")] = 3,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per row instead of a table.")] = False,
) -> None:
    """Parameters, GFLOPs and CPU latency of the video/text encoders, a single-stream pair and the
    mixed-stream reranker per candidate (plain decoder vs. factorised rerank states)."""
    import torch

    from pvl_search.model.config import preset
    from pvl_search.model.profiling import profile_model

    try:
        cfg = preset(config)
        overrides = {k: v for k, v in {"frames": frames, "latents": latents}.items() if v is not None}
        cfg = cfg.replace(**overrides)
        torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    except KeyError:
        raise fail(f"--dtype must be float32 or bfloat16, not {dtype!r}") from None
    except ValueError as exc:
        raise fail(str(exc)) from None
    try:
        rows = profile_model(
            cfg, cross_layers=cross_layers, candidates=candidates, dtype=torch_dtype, repeats=repeats
        )
    except ValueError as exc:
        raise fail(str(exc)) from None
    if as_json:
        for row in rows:
            console.print_json(json.dumps(row.to_dict()))
        return
    table, note = views.profile_table(rows, f"Perceiver-VL {config}: {cfg.frames} frames, N={cfg.latents}, {dtype}, "
                                            f"cross-layers {cross_layers or cfg.blocks}/{cfg.blocks}")
    console.print(table)
    console.print(note)


def _with_loss_options(after: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Give a command one `--NAME` weight option per declared loss that has a help
    (loss_weights.LOSSES), placed after its parameter `after` in the signature typer reads;
    the command receives them in its `**loss_weights`."""

    def add_options(command: Callable[..., None]) -> Callable[..., None]:
        signature = inspect.signature(command, eval_str=True)  # typer reads evaluated annotations
        params = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        at = [p.name for p in params].index(after) + 1
        options = [inspect.Parameter(spec.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=spec.default,
                                     annotation=Annotated[float, typer.Option(
                                         help=spec.help, min=0 if spec.nonnegative else None)])
                   for spec in LOSSES if spec.help is not None]
        command.__signature__ = signature.replace(parameters=params[:at] + options + params[at:])
        return command

    return add_options


@app.command()
@_with_loss_options(after="seed")
def train(
    out: Annotated[Path, typer.Option(help="Run folder: checkpoints last/ and best/, log.jsonl, run.json.")],
    captions: Annotated[Path | None, typer.Option(
        help="Captions file (pvl-search JSON, MSR-VTT JSON or CSV); its videos are decoded once into a frame "
             "cache. Give this or --shards.")] = None,
    shards: Annotated[Path | None, typer.Option(
        help="Shard folder written by `pvl-search shards` (streamed; trains on its train split, validates on its "
             "val split). Needed for --workers above 1.")] = None,
    config: Annotated[str, typer.Option(help="Model preset: tiny or base.")] = "tiny",
    text_mixer_layers: Annotated[int | None, typer.Option(
        help="Self-attention layers over the text tokens before the latents read them (binds a word to its "
             "neighbours; 0 = the paper's input). Default: the preset's.", min=0)] = None,
    temporal_kernel: Annotated[int | None, typer.Option(
        help="Frames in a depthwise convolution over time at each patch position (motion, event order; odd; 0 = the "
             "paper's input). Default: the preset's.", min=0)] = None,
    conv_stem: Annotated[int | None, typer.Option(
        help="Channels of a 3x3 convolutional stem before the patch projection (sees shape inside a patch; 0 = the "
             "paper's linear patch embedding). Default: the preset's.", min=0)] = None,
    epochs: Annotated[int, typer.Option(help="Passes over the training videos.")] = 30,
    batch_size: Annotated[int, typer.Option(help="Videos per step (in-batch negatives).")] = 32,
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW, warm-up then cosine).")] = 5e-4,
    warmup: Annotated[int, typer.Option(help="Warm-up steps.")] = 200,
    seed: Annotated[int, typer.Option(help="Seed for weights, batches and LayerDrop.")] = 0,
    # here: one --NAME option per loss weight (pvl_search.training.loss_weights), from _with_loss_options
    group_batches_from: Annotated[int | None, typer.Option(
        help="From this epoch (1-based) on, batch whole caption-file groups together (meta.group, e.g. hard-negative "
             "twins).", min=1)] = None,
    latent_reranker: Annotated[bool, typer.Option(
        help="Add the latent reranker (text latents attend over a candidate's video latents) to the model.")] = False,
    mined_negatives: Annotated[int, typer.Option(
        help="Extra negatives per caption for the listwise mixed loss, mined from a bank of all training videos by "
             "multi-stream similarity.", min=0)] = 0,
    rerank_only_groups: Annotated[bool, typer.Option(
        help="Same-group videos are negatives for the rerankers only: the multi-stream loss ignores them (first "
             "stage finds the group, the reranker picks within it).")] = False,
    stream_seed: Annotated[int | None, typer.Option(
        help="Train on fresh videos from the synthetic generator with this seed (written ahead in chunks by a "
             "background process) instead of the captions file's train split; the captions file (a `pvl-search "
             "synth` corpus with another seed) gives validation, and its held-out combinations never enter "
             "training.")] = None,
    stream_groups: Annotated[int, typer.Option(
        help="With --stream-seed: twin groups (4 videos each) per chunk; one chunk is one epoch.", min=1)] = 512,
    stream_passes: Annotated[int, typer.Option(
        help="With --stream-seed: epochs trained on each chunk before the next.", min=1)] = 1,
    val_every: Annotated[int, typer.Option(
        help="Epochs between validations (the last one is always validated).", min=1)] = 1,
    retrieval_from: Annotated[int, typer.Option(
        help="Curriculum: train only the attribute losses until this epoch (1-based), then every loss (1 = all from "
             "the start).", min=1)] = 1,
    probe_videos: Annotated[int, typer.Option(
        help="At each validation, fit linear probes on this many training videos' embeddings and report "
             "per-attribute accuracy on validation (0 = off; needs scene metadata).", min=0)] = 0,
    init: Annotated[str | None, typer.Option(
        help="Start from weights: clip:MODEL:PATH (a local CLIP checkpoint, e.g. "
             "clip:ViT-B-16:/models/vit_b16.safetensors) or model:DIR (an own model folder of the same architecture, "
             "trained further on a fresh schedule).")] = None,
    train_only: Annotated[str, typer.Option(help="all, or cross (stage one after --init: CLIP parts frozen).")] = "all",
    resume: Annotated[bool, typer.Option(
        help="Continue the run in OUT from its newest checkpoint (OUT/last) as if it had never stopped; "
             "pass the options it was started with (a changed one is refused).")] = False,
    checkpoint_every: Annotated[int, typer.Option(help="Steps between checkpoints.")] = 200,
    limit: Annotated[int | None, typer.Option(help="Use at most this many videos per split.")] = None,
    workers: Annotated[int, typer.Option(
        help="With --shards: data-parallel workers on Ray Train (--batch-size is per worker; the contrastive losses "
             "see every worker's batch). 1 = this process.", min=1)] = 1,
    ray: Annotated[str, typer.Option(
        help="With --workers above 1: local (start Ray here), auto (the running cluster) or ray://HOST:PORT. "
             "Every node must see --shards and --out at the same paths.")] = "local",
    gpus_per_worker: Annotated[float, typer.Option(
        help="With --workers: each worker's share of a GPU (> 0 trains on GPUs over NCCL; 0 = CPU over gloo).",
        min=0)] = 0.0,
    accumulate: Annotated[int, typer.Option(
        help="With --shards: micro-batches per optimizer step (gradient accumulation; in-batch negatives stay "
             "per micro-batch).", min=1)] = 1,
    lr_batch: Annotated[int | None, typer.Option(
        help="With --shards: the global batch --lr is meant for; the rate scales linearly with workers x "
             "--batch-size x --accumulate over it. Default: --batch-size (so N workers scale it N times).",
        min=1)] = None,
    precision: Annotated[str, typer.Option(
        help="With --shards: auto (bf16 autocast on GPUs and on CPUs with native bf16, else float32), float32 or "
             "bfloat16.")] = "auto",
    loader_workers: Annotated[int, typer.Option(
        help="With --shards: data-loader processes per worker.", min=0)] = 2,
    shuffle_buffer: Annotated[int, typer.Option(
        help="With --shards: samples each loader shuffles together (beside a fresh shard order each epoch); "
             "memory grows with it.", min=0)] = 256,
    max_failures: Annotated[int, typer.Option(
        help="With --workers: restarts after a worker or node dies (each resumes from the last checkpoint).",
        min=0)] = 3,
    device: Device = None,
    as_json: AsJson = False,
    **loss_weights: float,
) -> None:
    """Train a Perceiver-VL model on (video, caption) pairs with the weighted losses (by default
    the multi-stream contrastive loss and mixed-stream VTM with hard negatives; every other loss
    trains once given a weight); keeps the checkpoint with the best validation R@1."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from pvl_search.model.config import preset
    from pvl_search.model.defaults import pick_device
    from pvl_search.training.loop import TrainConfig
    from pvl_search.training.loss_weights import LossWeights
    from pvl_search.training.recipe import StreamOptions, corpus_seed, train_from_captions

    if (captions is None) == (shards is None):
        raise fail("give either --captions (a captions file) or --shards (a folder from `pvl-search shards`)")
    if shards is None and (workers > 1 or accumulate > 1 or lr_batch is not None or precision != "auto"):
        raise fail("--workers, --accumulate, --lr-batch and --precision need --shards (see docs/train.md)")
    try:
        cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, warmup_steps=warmup, seed=seed,
                          checkpoint_every=checkpoint_every, device=str(pick_device(device)),
                          group_batches_from=None if group_batches_from is None else group_batches_from - 1,
                          rerank_only_groups=rerank_only_groups, mined_negatives=mined_negatives,
                          val_every=val_every, probe_videos=probe_videos, retrieval_from=retrieval_from - 1,
                          losses=LossWeights(**loss_weights))
        overrides = {"text_mixer_layers": text_mixer_layers, "temporal_kernel": temporal_kernel,
                     "conv_stem": conv_stem, "latent_reranker": latent_reranker or None}
        model_config = preset(config).replace(**{k: v for k, v in overrides.items() if v is not None})
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"),
                      TimeRemainingColumn(), console=err_console, disable=as_json) as bar:
            cache_task = bar.add_task("decoding", total=None, info="")
            train_task = bar.add_task("training", total=None, info="", visible=False)

            def on_cache(done: int, total: int) -> None:
                bar.update(cache_task, completed=done, total=total, info=f"{done}/{total} videos")

            def on_step(event: dict) -> None:
                if event["kind"] == "step":
                    bar.update(train_task, visible=True, completed=event["step"], total=event["total_steps"],
                               info=f"epoch {event['epoch'] + 1} loss {event['loss']:.3f} "
                                    f"{event['samples_per_s']:.0f} samples/s")
                else:
                    if "val_multi" in event:
                        bar.console.print(f"epoch {event['epoch'] + 1}: {views.validation_line(event)}")

            if shards is not None:
                from pvl_search.training.ray_train import RayTrainOptions
                from pvl_search.training.shard_loop import ShardTrainOptions
                from pvl_search.training.shard_recipe import train_from_shards

                options = ShardTrainOptions(loader_workers=loader_workers, shuffle_buffer=shuffle_buffer,
                                            accumulate=accumulate, lr_batch=lr_batch, precision=precision)
                bar.update(cache_task, visible=False)
                if workers > 1:
                    quiet_ray_logs()
                summary = train_from_shards(shards, out, model_config, cfg, options, init=init,
                                            train_only=train_only, resume=resume, progress=on_step,
                                            ray=RayTrainOptions(ray, workers, gpus_per_worker, max_failures)
                                            if workers > 1 else None)
            else:
                summary = train_from_captions(captions, out, model_config, cfg, init=init, train_only=train_only,
                                          resume=resume, limit=limit, progress=on_step, cache_progress=on_cache,
                                          stream=None if stream_seed is None else StreamOptions(
                                              stream_seed, corpus_seed(captions), stream_groups, stream_passes))
    except _domain_errors() as exc:
        raise fail(str(exc)) from None
    if as_json:
        print(json.dumps(summary.to_dict()))
        return
    if summary.resumed_at:
        console.print(f"resumed {out} at step {summary.resumed_at}")
    console.print(f"trained {summary.steps} steps in {summary.seconds / 60:.1f} min on {summary.train_videos} videos; "
                  f"best val R@1 {summary.best_val_r1:.1f} (epoch {summary.best_epoch + 1}); model: {out / 'best'}")
    for key, reason in summary.failed_videos.items():
        err_console.print(f"[yellow]skipped:[/yellow] {key}: {reason}", highlight=False)


def _parse_ks(text: str) -> list[int]:
    try:
        ks = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise fail(f"--rerank-k takes comma-separated whole numbers, e.g. 8,16,32; got {text!r}") from None
    if not ks or min(ks) < 1:
        raise fail(f"--rerank-k values must be at least 1; got {text!r}")
    return ks


def _print_eval(report, title: str) -> None:  # noqa: ANN001 - indexer.evaluate.driver.EvalReport
    for renderable in views.eval_tables(report, title):
        console.print(renderable)


@app.command()
def probe(
    captions: Annotated[Path, typer.Option(
        help="A `pvl-search synth` captions file (its scene metadata gives the labels).")],
    model: ModelDir = None,
    fit_split: Annotated[str, typer.Option(help="Split whose videos and captions the probes are fitted on.")] = "train",
    test_split: Annotated[str, typer.Option(help="Split they are scored on.")] = "test",
    cache: Annotated[Path | None, typer.Option(
        help="Frame cache folder (reused when complete). Default: a folder beside the captions file.")] = None,
    limit: Annotated[int | None, typer.Option(help="At most this many videos per split.", min=1)] = None,
    as_json: AsJson = False,
) -> None:
    """Linear probes: how well each scene attribute (each event's colour, shape, size and
    motion, event order, colour-shape binding) can be read off the model's video and text
    embeddings and pooled latents. Says why retrieval fails where R@1 only says that it does."""
    from pvl_search.data.scene_labels import LABEL_NAMES
    from pvl_search.experiments.probes import probe_model

    try:
        runner = _load_runner(model, "cpu", dtype="float32")  # probes fit on float32 features, as before
        cache_dir = cache or captions.parent / f"probe-cache-{runner.config.frames}x{runner.config.frame_size}"
        with err_console.status("encoding and fitting probes ..."):
            report = probe_model(runner.model, str(captions), str(cache_dir), fit_split=fit_split,
                                 test_split=test_split, limit=limit)
    except _domain_errors() as exc:
        raise fail(str(exc)) from None
    if as_json:
        print(json.dumps(report))
        return
    console.print(views.probe_table(report, fit_split, test_split, _attribute_chance(report["chance"])))
    console.print("shape/size/motion: each moving object's (mean of the two); colour and *_by_time: each event's "
                  f"in time order; every label: {', '.join(LABEL_NAMES)}")


def _attribute_chance(row: dict) -> dict:
    from pvl_search.training.probes import attribute_means

    return row | attribute_means(row)


@app.command(name="eval")
def evaluate(
    captions: Annotated[Path, typer.Option(help="Captions file with ground truth (pvl-search JSON, MSR-VTT, CSV).")],
    index_dir: IndexDir = Path("pvl-index"),
    split: Annotated[str, typer.Option(help="Which split's captions are the queries.")] = "test",
    rerank_k: Annotated[str, typer.Option(help="Rerank depths to evaluate, comma-separated.")] = "8,16,32,64,128",
    single: Annotated[bool, typer.Option(
        help="Also evaluate single-stream reranking (decodes candidates; slow).")] = True,
    exhaustive_limit: Annotated[int, typer.Option(
        help="Exhaustive single-stream over the corpus when it has at most this many videos (0: never).")] = 200,
    fusion: Annotated[Fusion, typer.Option(help=FUSION_HELP)] = "calibrated",
    plot: Annotated[Path | None, typer.Option(help="Write a PNG: R@1 and latency against K.")] = None,
    db: DbUrl = None,
    model: ModelDir = None,
    device: Device = None,
    dtype: Dtype = "auto",
    as_json: AsJson = False,
) -> None:
    """How much reranking buys: every caption is a query; R@1/5/10, median/mean rank and
    per-query latency for retrieval alone, mixed rerank and single rerank at each K."""
    from rich.progress import Progress

    from indexer.evaluate.driver import evaluate_index
    from indexer.evaluate.plot import plot_report
    from indexer.search.searcher import Searcher

    ks = _parse_ks(rerank_k)
    try:
        runner = _load_runner(model, device, dtype=dtype)
        with Searcher(index_dir, db_url=db, runner=runner) as searcher, \
                Progress(console=err_console, disable=as_json) as bar:
            task = bar.add_task("evaluating", total=None)
            index_dtype = searcher.store.encode_dtype()
            report = evaluate_index(
                searcher, captions, split=split, rerank_ks=ks, single=single,
                exhaustive_limit=exhaustive_limit if single else 0, fusion=fusion,
                progress=lambda p: bar.update(task, completed=p.done, total=p.total),
            )
        if plot:
            plot_report(report, plot)
    except _domain_errors() as exc:
        raise fail(str(exc)) from None
    if as_json:
        versus = {label: vars(change) for label, change in report.versus_retrieval().items()}
        print(json.dumps({**report.to_dict(), "versus_retrieval": versus, "dtype": runner.dtype_name,
                          "index_dtype": index_dtype}))
        return
    _print_eval(report, f"text-to-video retrieval, {split} split of {captions.name} (queries in {runner.dtype_name}, "
                        f"index in {index_dtype or 'unrecorded dtype'})")
    if plot:
        console.print(f"plot: {plot}")
