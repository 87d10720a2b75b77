"""`pvl-search train-reranker`: train a cross-encoder reranker on frozen retrieval towers, the joint
reranker (over the stored video latents) or the patch reranker (over the stored patch tokens).
Parse, call one library function, present."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from cli_common import AsJson, ModelDir, _domain_errors, app, console, err_console, fail


@app.command(name="train-reranker")
def train_reranker(
    captions: Annotated[Path, typer.Option(
        help="Validation captions: a `pvl-search synth` corpus (its val split picks the best checkpoint).")],
    out: Annotated[Path, typer.Option(help="Run folder: last/ and best/ (each with reranker/), log.jsonl, run.json.")],
    stream_seed: Annotated[int, typer.Option(help="Seed of the fresh training videos (never the corpus's).")],
    model: ModelDir = None,
    heldout_seed: Annotated[int | None, typer.Option(
        help="Seed of the corpus whose held-out (colour, shape, motion) triples never enter training. "
             "Default: the captions corpus's.")] = None,
    chunks: Annotated[int, typer.Option(help="Chunks of fresh videos to train on.", min=1)] = 8,
    groups_per_chunk: Annotated[int, typer.Option(help="Twin groups (4 videos each) per chunk.", min=1)] = 512,
    candidates: Annotated[int, typer.Option(
        help="Each caption is reranked within its retrieval top K of the chunk (its own video forced in).",
        min=2)] = 16,
    batch_queries: Annotated[int, typer.Option(help="Captions per step.", min=1)] = 32,
    passes: Annotated[int, typer.Option(help="Passes over a chunk's captions.", min=1)] = 2,
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW, warm-up then cosine).")] = 3e-4,
    warmup: Annotated[int, typer.Option(help="Warm-up steps.", min=0)] = 100,
    layers: Annotated[int, typer.Option(help="Joint transformer blocks.", min=1)] = 2,
    heads: Annotated[int, typer.Option(help="Attention heads.", min=1)] = 4,
    select_k: Annotated[int, typer.Option(help="Validation R@1 at this K picks the best checkpoint.", min=1)] = 16,
    seed: Annotated[int, typer.Option(help="Seed of the reranker's weights and batches.")] = 0,
    kind: Annotated[str, typer.Option(
        help="joint (reads each candidate's video latents) or patch (the query reads its patch tokens).")] = "joint",
    width: Annotated[int, typer.Option(help="The patch reranker's own width.", min=8)] = 64,
    random_candidates: Annotated[int, typer.Option(
        help="Of the K candidates, this many are random videos of the chunk (easy negatives) instead of "
             "retrieval's next best.", min=0)] = 0,
    init: Annotated[Path | None, typer.Option(
        help="Start from the reranker saved in this folder (e.g. a run's best/).")] = None,
    fused_loss: Annotated[bool, typer.Option("--fused-loss/--logit-loss",
        help="Listwise loss on the fused score the search ranks by (learns retrieval's misses), or on the "
             "reranker's logit alone (learns the whole match; a patch reranker needs it to start).")] = True,
    resume: Annotated[bool, typer.Option(help="Continue the run in OUT from OUT/last (same options).")] = False,
    as_json: AsJson = False,
) -> None:
    """Train a reranker on frozen retrieval towers: each caption of fresh synthetic videos is
    reranked within its own retrieval top K (hard negatives by construction), listwise. Retrieval
    is untouched. To ship it, copy OUT/best/reranker (or patch-reranker) into the model folder and
    record "rerank": "joint" (or "patch") in its search_defaults.json."""
    from pvl_search.model.defaults import DEFAULT_MODEL_DIR
    from pvl_search.training.joint_recipe import JointRun, run_joint_training
    from pvl_search.training.joint_reranker import JointTrainConfig
    from pvl_search.training.recipe import corpus_seed

    def on_chunk(line: dict) -> None:
        if not as_json:
            joint, base = line["val"][f"joint@{select_k}"], line["val"]["retrieval"]
            err_console.print(f"chunk {line['chunk'] + 1}/{chunks}: loss {line['loss']:.3f}; val R@1 {base['r1']:.1f} "
                              f"-> {joint['r1']:.1f} at K={select_k}, within-group {joint['within_group_top1']:.1f}, "
                              f"group R@1 {joint['group_r1']:.1f} ({line['seconds']:.0f} s)", highlight=False)

    try:
        run = JointRun(model_dir=str(model or DEFAULT_MODEL_DIR), captions=str(captions), out=str(out),
                       stream_seed=stream_seed,
                       heldout_seed=corpus_seed(captions) if heldout_seed is None else heldout_seed,
                       chunks=chunks, groups_per_chunk=groups_per_chunk, layers=layers, heads=heads, select_k=select_k,
                       train=JointTrainConfig(candidates=candidates, batch_queries=batch_queries, passes=passes, lr=lr,
                                              warmup=warmup, seed=seed, fused_loss=fused_loss,
                                              random_candidates=random_candidates),
                       kind=kind, width=width, init=None if init is None else str(init))
        last = run_joint_training(run, resume=resume, on_event=on_chunk)
    except _domain_errors() as exc:
        raise fail(str(exc)) from None
    if as_json:
        print(json.dumps(last))
        return
    folder = "patch-reranker" if kind == "patch" else "reranker"
    console.print(f"reranker: {out / 'best' / folder} (copy it into the model folder to use it)")
