"""pvl-search command line: the only place that parses arguments and prints."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from indexer.precision import DtypeChoice  # light: torch is not imported until a model loads

app = typer.Typer(
    name="pvl-search",
    help="Text-to-video search on Perceiver-VL: index a folder of videos, then query it in words.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True, soft_wrap=True)


def fail(message: str) -> typer.Exit:
    """One red line on stderr and exit code 1: how every domain error ends."""
    err_console.print(f"[red]error:[/red] {message}", highlight=False)
    return typer.Exit(code=1)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        console.print(f"pvl-search {version('pvl-search')}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Text-to-video search on Perceiver-VL."""


@app.command()
def profile(
    config: Annotated[str, typer.Option(help="Model preset: base (the paper's) or tiny.")] = "base",
    frames: Annotated[Optional[int], typer.Option(help="Frames per video (default: the preset's).")] = None,
    latents: Annotated[Optional[int], typer.Option(help="Latent array size N (default: the preset's).")] = None,
    cross_layers: Annotated[
        Optional[int], typer.Option(help="Keep only the first C cross-attentions at inference.")
    ] = None,
    candidates: Annotated[int, typer.Option(help="Candidates scored at once by the reranker.")] = 50,
    dtype: Annotated[str, typer.Option(help="float32 or bfloat16.")] = "float32",
    repeats: Annotated[int, typer.Option(help="Timed runs per row (median reported).")] = 3,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per row instead of a table.")] = False,
) -> None:
    """Parameters, GFLOPs and CPU latency of the video/text encoders, a single-stream pair and the
    mixed-stream reranker per candidate (plain decoder vs. factorised rerank states)."""
    import torch

    from pvl_search.config import preset
    from pvl_search.profiling import profile_model

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
    table = Table(title=f"Perceiver-VL {config}: {cfg.frames} frames, N={cfg.latents}, {dtype}, "
                  f"cross-layers {cross_layers or cfg.blocks}/{cfg.blocks}")
    for column in ("component", "params (M)", "GFLOPs", "latency ms", "note"):
        table.add_column(column, justify="left" if column in ("component", "note") else "right")
    for row in rows:
        table.add_row(row.name, f"{row.params / 1e6:.1f}", f"{row.gflops:.4g}", f"{row.latency_ms:.3g}", row.note)
    console.print(table)
    by_name = {row.name: row for row in rows}
    plain, factorised = by_name["mixed decoder, plain"], by_name["mixed decoder, factorised"]
    console.print(
        f"reranking one candidate: factorised costs {plain.gflops / factorised.gflops:.0f}x fewer FLOPs "
        f"than the plain decoder"
    )


# --------------------------------------------------------------------------- shared options
IndexDir = Annotated[Path, typer.Option("--index", "-i", help="Index folder (SQLite database, FAISS and stores live here).")]
DbUrl = Annotated[  # the timeouts are indexer.database.PG_*_TIMEOUT_S (a test keeps them equal)
    Optional[str],
    typer.Option("--db", help="SQLAlchemy URL of the metadata database, e.g. postgresql+psycopg://u@host/db "
                 "(default: SQLite inside the index folder). PostgreSQL timeouts: connect 10 s, statement 60 s; "
                 "change them with the URL parameters connect_timeout and statement_timeout (seconds)."),
]
ModelDir = Annotated[
    Optional[Path], typer.Option("--model", help="Model folder (config.json + model.safetensors); default: the shipped model.")
]
Device = Annotated[Optional[str], typer.Option(help="cpu or cuda (default: cuda when available).")]
Dtype = Annotated[DtypeChoice, typer.Option(
    help="What the model runs in. auto: bfloat16 on CUDA and on CPUs with native bf16 matmul "
         "(AVX512_BF16, AMX, Arm BF16), else float32. Stored vectors are float either way: an index built "
         "in one dtype is searched in the other.")]
AsJson = Annotated[bool, typer.Option("--json", help="Machine-readable JSON output.")]


def _domain_errors() -> tuple[type[Exception], ...]:
    from indexer.errors import IndexStoreError
    from pvl_search.checkpoint import CheckpointError
    from pvl_search.video import VideoDecodeError

    # OSError: disk full, a folder that cannot be read or written: one line like the rest.
    return (IndexStoreError, CheckpointError, VideoDecodeError, OSError, ValueError)


def _load_runner(model: Path | None, device: str | None, cross_layers: int | None = None,  # noqa: ANN202
                 dtype: DtypeChoice = "auto"):
    from indexer.encoding import ModelRunner

    return ModelRunner.from_folder(model, device=device, cross_layers=cross_layers, dtype=dtype)


@app.command()
def index(
    paths: Annotated[list[Path], typer.Argument(help="Video files or folders (searched recursively).")] = None,
    index_dir: IndexDir = Path("pvl-index"),
    db: DbUrl = None,
    model: ModelDir = None,
    window: Annotated[float, typer.Option(help="Segment length in seconds; shorter videos are one segment.")] = 10.0,
    stride: Annotated[float, typer.Option(help="Seconds between segment starts (at most).")] = 5.0,
    batch_size: Annotated[int, typer.Option(help="Clips per encoder call.")] = 8,
    workers: Annotated[int, typer.Option(help="Decoder processes.")] = 2,
    timeout: Annotated[float, typer.Option(help="Seconds a decoder may make no progress before it is killed.")] = 60.0,
    decoder: Annotated[str, typer.Option(help="auto (decord, then PyAV), decord or pyav.")] = "auto",
    store_latents: Annotated[Optional[bool], typer.Option("--store-latents/--no-store-latents", help="Keep each segment's full N x D latents (the latent reranker reads them). Default: yes for a model with a latent reranker, else no; an existing index keeps its choice.")] = None,
    faiss_factory: Annotated[Optional[str], typer.Option(help="FAISS factory string, e.g. HNSW32 (default: exact, "
                                                           "switching to IVF past 50k segments).")] = None,
    retry_failed: Annotated[bool, typer.Option(help="Retry files that failed before even if unchanged.")] = False,
    rebuild: Annotated[bool, typer.Option(help="Only recreate the FAISS index (or Milvus collection) from the stored "
                                          "embeddings; with --vectors, move the vectors there first.")] = False,
    vectors: Annotated[Optional[str], typer.Option(help="Where the vectors live: faiss (a file in the index folder) or "
                                                   "milvus:URI, URI a Milvus Lite file (PATH.db) or http://HOST:19530, "
                                                   "optionally #HNSW etc. (default FLAT, exact). Recorded in the index: "
                                                   "search, serve, eval and status follow it. Default: what the index "
                                                   "records (faiss for a new one). Needs the cluster extra.")] = None,
    ray: Annotated[Optional[str], typer.Option(help="Decode and encode on Ray: local (start one here), auto (the running "
                                               "cluster) or ray://HOST:PORT. Every worker must see the files (and "
                                               "--model) at the same paths as this machine: a shared filesystem. "
                                               "This process writes the index. Needs the cluster extra.")] = None,
    ray_workers: Annotated[int, typer.Option(min=1, help="Ray encoder actors (one model each).")] = 2,
    ray_gpus_per_worker: Annotated[float, typer.Option(min=0, help="GPUs per Ray actor (0: CPU).")] = 0.0,
    thumbnails: Annotated[bool, typer.Option(help="Keep a small JPEG per segment for the web page (taken from the "
                                             "frames decoded anyway; segments indexed without one get it).")] = True,
    device: Device = None,
    dtype: Dtype = "auto",
    as_json: AsJson = False,
) -> None:
    """Index videos: new and changed files are decoded and encoded, removed ones dropped.

    Safe to interrupt at any moment and run again. Exit code 0: all files indexed;
    2: some files failed (listed, and recorded in the index); 1: an error stopped the run.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from indexer.index_store import IndexStore
    from indexer.pipeline import IndexOptions, build_index, rebuild_vectors

    from indexer.ray_indexing import RayOptions
    from indexer.vector_backend import parse_vectors, require_cluster_extra

    try:
        if ray is not None:
            require_cluster_extra("--ray", "ray")
        if vectors is not None:
            parse_vectors(vectors)  # a bad --vectors is refused before the model loads
        if rebuild:
            count = rebuild_vectors(index_dir, db, vectors)
            console.print(json.dumps({"rebuilt_vectors": count}) if as_json else f"rebuilt vectors: {count}")
            return
        if not paths:
            raise fail("give at least one video file or folder to index")
        if decoder not in ("auto", "decord", "pyav"):
            raise fail(f"--decoder must be auto, decord or pyav, not {decoder!r}")
        runner = _load_runner(model, device, dtype=dtype)
        ray_options = None if ray is None else RayOptions(ray, ray_workers, ray_gpus_per_worker,
                                                          model_dir=str(model.resolve()) if model else None, dtype=dtype)
        options = IndexOptions(window, stride, batch_size, workers, timeout, decoder, store_latents,
                               faiss_factory, retry_failed, thumbnails=thumbnails, vectors=vectors, ray=ray_options)
        with IndexStore(index_dir, db) as store, Progress(
            TextColumn("[bold]indexing"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[rate]:.1f} videos/s"), TimeRemainingColumn(),
            console=err_console, disable=as_json, transient=False,
        ) as bar:
            # Hidden until the first file is planned, so a refusal (e.g. a model mismatch)
            # prints its error without an empty bar above it.
            task = bar.add_task("index", total=None, rate=0.0, visible=False)
            started = time.perf_counter()

            def on_progress(p) -> None:  # noqa: ANN001
                rate = p.done / max(1e-9, time.perf_counter() - started)
                bar.update(task, completed=p.done, total=p.total, rate=rate, visible=True)

            summary = build_index(paths, store, runner, options, progress=on_progress)
    except _domain_errors() as exc:
        raise fail(str(exc)) from None
    if as_json:
        print(json.dumps(summary.to_dict()))
    else:
        console.print(
            f"indexed {summary.indexed} ({summary.segments} segments), unchanged {summary.unchanged}, "
            f"removed {summary.removed}, failed {len(summary.failed)} — {summary.seconds:.1f} s, {summary.dtype}"
            + (f"; thumbnails made for {summary.thumbnails_added} older segments" if summary.thumbnails_added else "")
        )
        for path, reason in summary.failed.items():
            err_console.print(f"[yellow]failed:[/yellow] {path}: {reason}", highlight=False)
    if summary.failed:
        raise typer.Exit(code=2)


@app.command()
def status(index_dir: IndexDir = Path("pvl-index"), db: DbUrl = None, as_json: AsJson = False) -> None:
    """Counts, bytes on disk per store, the model that built the index, recent failures."""
    from indexer.index_store import IndexStore

    try:
        with IndexStore(index_dir, db, read_only=True) as store:
            stats = store.stats()
            config_json, fingerprint = store.model()
            dtype = store.encode_dtype()
    except _domain_errors() as exc:
        raise fail(str(exc)) from None
    model = json.loads(config_json) if config_json else {}
    data = {
        "index": str(index_dir), "videos": stats.videos, "segments": stats.segments,
        "removed_segments": stats.removed_segments, "vectors": stats.vectors, "faiss": stats.faiss,
        "bytes": stats.bytes, "thumbnails": stats.thumbnails, "model": {"fingerprint": fingerprint, "config": model, "dtype": dtype},
        "recent_failures": [{"path": p, "error": e} for p, e in stats.recent_failures],
    }
    if as_json:
        print(json.dumps(data))
        return
    table = Table(title=f"index {index_dir}", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    table.add_row("videos", ", ".join(f"{k} {v}" for k, v in stats.videos.items()))
    table.add_row("segments", f"{stats.segments} searchable, {stats.removed_segments} removed")
    table.add_row("vectors", f"{stats.vectors} ({stats.faiss})")
    table.add_row("thumbnails", str(stats.thumbnails))
    for name, size in stats.bytes.items():
        table.add_row(f"  {name}", f"{size / 1e6:.2f} MB")
    table.add_row("model", f"{fingerprint[:12] if fingerprint else '-'} (hidden {model.get('hidden')}, "
                  f"N={model.get('latents')}, {model.get('frames')} frames)")
    table.add_row("encoded in", (dtype or "not recorded").replace(",", " + "))
    console.print(table)
    for path, error in stats.recent_failures:
        err_console.print(f"[yellow]failed:[/yellow] {path}: {error}", highlight=False)


@app.command()
def search(
    query: Annotated[str, typer.Argument(help="What to look for, in words.")],
    index_dir: IndexDir = Path("pvl-index"),
    k: Annotated[int, typer.Option("-k", help="Videos to return.")] = 10,
    rerank_k: Annotated[int, typer.Option(help="Segments retrieved by FAISS and reranked.")] = 50,
    rerank: Annotated[str, typer.Option(help="auto (the reranker the model's validation chose), mixed (the paper's [CLS] decoder from stored rerank states), latent (query latents attend over stored video latents), single (decode again; slow), none.")] = "auto",
    fusion: Annotated[str, typer.Option(help="sum: retrieval similarity + rerank logit; rerank: the logit alone.")] = "sum",
    cross_layers: Annotated[Optional[int], typer.Option(help="Keep only the first C cross-attentions for the query.")] = None,
    glob: Annotated[Optional[str], typer.Option(help="Only videos whose full path matches this pattern, e.g. "
                                                     "'*/news/*' (* and ? wildcards; case-sensitive).")] = None,
    min_duration: Annotated[Optional[float], typer.Option(help="Only videos at least this many seconds long.")] = None,
    max_duration: Annotated[Optional[float], typer.Option(help="Only videos at most this many seconds long.")] = None,
    since: Annotated[Optional[str], typer.Option(help="Only videos added since this ISO 8601 date or date/time "
                                                      "(UTC when it has no offset), or seconds since 1970.")] = None,
    db: DbUrl = None,
    model: ModelDir = None,
    device: Device = None,
    dtype: Dtype = "auto",
    as_json: AsJson = False,
) -> None:
    """Find the videos (and the moment inside each) that match a text query."""
    from indexer.request import search_request

    try:  # the same rules as the HTTP API (indexer/request.py), checked before the model loads
        request = search_request(query, k=k, rerank_k=rerank_k, rerank=rerank, fusion=fusion, glob=glob,
                                 min_duration=min_duration, max_duration=max_duration, since=since)
        from indexer.searcher import Searcher

        runner = _load_runner(model, device, cross_layers, dtype)
        with Searcher(index_dir, db_url=db, runner=runner) as searcher:
            result = searcher.run(request)
    except _domain_errors() as exc:
        raise fail(str(exc)) from None
    if result.truncated:
        err_console.print(f"note: the query is longer than {runner.config.text_length} tokens; the rest was ignored")
    if as_json:  # one line per hit, each saying the dtypes of the query and of the index
        for hit in result.hits:
            print(json.dumps({**hit.to_dict(), "dtype": result.dtype, "index_dtype": result.index_dtype}))
        return
    table = Table(title=f"{query!r} ({rerank} rerank, {result.dtype}, {result.timings_ms['total']:.0f} ms)")
    for column in ("#", "score", "retrieval", "rerank", "moment", "path"):
        table.add_column(column, justify="right" if column not in ("moment", "path") else "left")
    for hit in result.hits:
        best = hit.best
        table.add_row(
            str(hit.rank), f"{hit.score:.3f}", f"{best.retrieval_score:.3f}",
            "-" if best.rerank_score is None else f"{best.rerank_score:.2f}",
            f"{best.start_s:.1f}-{best.end_s:.1f} s", hit.path,
        )
    console.print(table)
    if not result.hits:
        console.print("no matching videos")


@app.command()
def synth(
    out: Annotated[Path, typer.Argument(help="Folder to write videos/ and captions.json into.")],
    n: Annotated[int, typer.Option("--n", help="Number of videos (groups of four hard-negative twins).")] = 2000,
    seed: Annotated[int, typer.Option(help="Everything is deterministic from the seed.")] = 0,
    size: Annotated[int, typer.Option(help="Frame side in pixels.")] = 64,
    fps: Annotated[int, typer.Option(help="Frames per second.")] = 8,
    seconds: Annotated[float, typer.Option(help="Length of each video.")] = 3.0,
    workers: Annotated[int, typer.Option(help="Rendering processes.")] = 2,
    as_json: AsJson = False,
) -> None:
    """Write a synthetic video-caption benchmark: real MP4 files whose captions need motion,
    temporal order and attribute binding to match (train / val / test splits, hard negatives,
    held-out combinations in test)."""
    from rich.progress import Progress

    from pvl_search.synth import generate_corpus

    try:
        with Progress(console=err_console, disable=as_json) as bar:
            task = bar.add_task("rendering", total=n)
            summary = generate_corpus(out, n, seed, size=size, fps=fps, seconds=seconds, workers=workers,
                                      progress=lambda done, total: bar.update(task, completed=done, total=total))
    except ValueError as exc:
        raise fail(str(exc)) from None
    if as_json:
        print(json.dumps(summary.to_dict()))
        return
    table = Table(title=f"{summary.videos} videos in {summary.out_dir} ({summary.bytes_on_disk / 1e6:.1f} MB)")
    table.add_column("")
    for split in ("train", "val", "test"):
        table.add_column(split, justify="right")
    table.add_row("videos", *(str(summary.splits.get(sp, 0)) for sp in ("train", "val", "test")))
    for factor, counts in summary.factors.items():
        table.add_row(factor, *(str(counts.get(sp, 0)) for sp in ("train", "val", "test")))
    console.print(table)
    console.print(f"captions: {summary.captions_path}")


@app.command()
def train(
    captions: Annotated[Path, typer.Option(help="Captions file (pvl-search JSON, MSR-VTT JSON or WebVid CSV).")],
    out: Annotated[Path, typer.Option(help="Run folder: checkpoints last/ and best/, log.jsonl, run.json.")],
    config: Annotated[str, typer.Option(help="Model preset: tiny or base.")] = "tiny",
    text_mixer_layers: Annotated[Optional[int], typer.Option(help="Self-attention layers over the text tokens before the latents read them (binds a word to its neighbours; 0 = the paper's input). Default: the preset's.", min=0)] = None,
    temporal_kernel: Annotated[Optional[int], typer.Option(help="Frames in a depthwise convolution over time at each patch position (motion, event order; odd; 0 = the paper's input). Default: the preset's.", min=0)] = None,
    conv_stem: Annotated[Optional[int], typer.Option(help="Channels of a 3x3 convolutional stem before the patch projection (sees shape inside a patch; 0 = the paper's linear patch embedding). Default: the preset's.", min=0)] = None,
    epochs: Annotated[int, typer.Option(help="Passes over the training videos.")] = 30,
    batch_size: Annotated[int, typer.Option(help="Videos per step (in-batch negatives).")] = 32,
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW, warm-up then cosine).")] = 5e-4,
    warmup: Annotated[int, typer.Option(help="Warm-up steps.")] = 200,
    seed: Annotated[int, typer.Option(help="Seed for weights, batches and LayerDrop.")] = 0,
    mixed_vtm: Annotated[float, typer.Option(help="Weight of the mixed-stream VTM loss (hard negatives).")] = 1.0,
    mixed_nce: Annotated[float, typer.Option(help="Weight of the listwise mixed-stream loss (InfoNCE over all in-batch pairs).")] = 0.0,
    single_vtm: Annotated[float, typer.Option(help="Weight of the single-stream VTM loss.")] = 0.0,
    group_batches_from: Annotated[Optional[int], typer.Option(help="From this epoch (1-based) on, batch whole caption-file groups together (meta.group, e.g. hard-negative twins).", min=1)] = None,
    mlm: Annotated[float, typer.Option(help="Weight of masked language modelling.")] = 0.0,
    token_attributes: Annotated[float, typer.Option(help="Weight of the dense patch loss: a linear head on every video input token predicts the shape and the motion of the object covering it (needs scene metadata).", min=0)] = 0.0,
    latent_reranker: Annotated[bool, typer.Option(help="Add the latent reranker (text latents attend over a candidate's video latents) to the model.")] = False,
    latent_nce: Annotated[float, typer.Option(help="Weight of the latent reranker's listwise loss (needs --latent-reranker).", min=0)] = 0.0,
    attributes: Annotated[float, typer.Option(help="Weight of the auxiliary attribute loss: shared linear heads predict each event's colour, shape, size and motion, event order and binding from both embeddings (needs a synthetic benchmark's scene metadata).", min=0)] = 0.0,
    mined_negatives: Annotated[int, typer.Option(help="Extra negatives per caption for the listwise mixed loss, mined from a bank of all training videos by multi-stream similarity.", min=0)] = 0,
    rerank_only_groups: Annotated[bool, typer.Option(help="Same-group videos are negatives for the rerankers only: the multi-stream loss ignores them (first stage finds the group, the reranker picks within it).")] = False,
    stream_seed: Annotated[Optional[int], typer.Option(help="Train on fresh videos from the synthetic generator with this seed (written ahead in chunks by a background process) instead of the captions file's train split; the captions file (a `pvl-search synth` corpus with another seed) gives validation, and its held-out combinations never enter training.")] = None,
    stream_groups: Annotated[int, typer.Option(help="With --stream-seed: twin groups (4 videos each) per chunk; one chunk is one epoch.", min=1)] = 512,
    stream_passes: Annotated[int, typer.Option(help="With --stream-seed: epochs trained on each chunk before the next.", min=1)] = 1,
    val_every: Annotated[int, typer.Option(help="Epochs between validations (the last one is always validated).", min=1)] = 1,
    retrieval_from: Annotated[int, typer.Option(help="Curriculum: train only the attribute losses until this epoch (1-based), then every loss (1 = all from the start).", min=1)] = 1,
    probe_videos: Annotated[int, typer.Option(help="At each validation, fit linear probes on this many training videos' embeddings and report per-attribute accuracy on validation (0 = off; needs scene metadata).", min=0)] = 0,
    init: Annotated[Optional[str], typer.Option(help="Start from weights: clip:MODEL:PATH (a local CLIP checkpoint, e.g. clip:ViT-B-16:/models/vit_b16.safetensors) or model:DIR (an own model folder of the same architecture, trained further on a fresh schedule).")] = None,
    train_only: Annotated[str, typer.Option(help="all, or cross (stage one after --init: CLIP parts frozen).")] = "all",
    resume: Annotated[bool, typer.Option(help="Continue from OUT/last.")] = False,
    checkpoint_every: Annotated[int, typer.Option(help="Steps between checkpoints.")] = 200,
    limit: Annotated[Optional[int], typer.Option(help="Use at most this many videos per split.")] = None,
    device: Device = None,
    as_json: AsJson = False,
) -> None:
    """Train a Perceiver-VL model on (video, caption) pairs (contrastive + VTM with hard
    negatives [+ MLM]); keeps the checkpoint with the best validation R@1."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from indexer.encoding import pick_device
    from pvl_search.config import preset
    from pvl_search.losses import LossWeights
    from pvl_search.recipe import StreamOptions, corpus_seed, train_from_captions
    from pvl_search.train import TrainConfig

    try:
        cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, warmup_steps=warmup, seed=seed,
                          checkpoint_every=checkpoint_every, device=str(pick_device(device)),
                          group_batches_from=None if group_batches_from is None else group_batches_from - 1,
                          rerank_only_groups=rerank_only_groups, mined_negatives=mined_negatives,
                          val_every=val_every, probe_videos=probe_videos, retrieval_from=retrieval_from - 1,
                          losses=LossWeights(mixed_vtm=mixed_vtm, mixed_nce=mixed_nce, single_vtm=single_vtm,
                                             mlm=mlm, attributes=attributes, latent_nce=latent_nce,
                                             token_attributes=token_attributes))
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
                        bar.console.print(f"epoch {event['epoch'] + 1}: {_validation_line(event)}")

            summary = train_from_captions(captions, out, model_config, cfg, init=init, train_only=train_only,
                                          resume=resume, limit=limit, progress=on_step, cache_progress=on_cache,
                                          stream=None if stream_seed is None else StreamOptions(
                                              stream_seed, corpus_seed(captions), stream_groups, stream_passes))
    except _domain_errors() as exc:
        raise fail(str(exc)) from None
    if as_json:
        print(json.dumps(summary.to_dict()))
        return
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


def _print_eval(report, title: str) -> None:  # noqa: ANN001 - indexer.evaluation.EvalReport
    from indexer.evaluation import ROW_HEADER

    table = Table(title=title)
    for column in (*ROW_HEADER, "R@1 vs multi"):
        table.add_column(column, justify="left" if column == "method" else "right")
    versus = report.versus_retrieval()
    for result, (method, k, *numbers) in zip(report.methods, report.rows()):
        change = versus.get(result.label)
        # first places won / lost against retrieval alone, and the sign test's p-value
        paired = "" if change is None else f"+{change.gained}/-{change.lost} p={change.p_value:.2f}"
        table.add_row(method, "-" if k is None else str(k), *(f"{x:.1f}" for x in numbers), paired)
    console.print(table)
    subsets = report.subset_rows()
    if subsets:
        sub = Table(title="R@1 on subsets (videos with that kind of hard negative / held-out combination)")
        for column in ("method", "K", "subset", "queries", "R@1"):
            sub.add_column(column, justify="left" if column in ("method", "subset") else "right")
        for method, k, label, n, r1 in subsets:
            sub.add_row(method, "-" if k is None else str(k), label, str(n), f"{r1:.1f}")
        console.print(sub)
    twins = [m for m in report.methods if m.groups]
    if twins:
        labels = sorted({k for m in twins for k in m.groups if k.startswith("within_group_top1:")})
        table = Table(title="twin groups: own video above its hard-negative twins (within), its group first (group R@1)")
        for column in ("method", "K", "queries", "within", "group R@1", *(label.split(":", 1)[1] for label in labels)):
            table.add_column(column, justify="left" if column == "method" else "right")
        for m in twins:
            table.add_row(m.method, "-" if m.k is None else str(m.k), str(int(m.groups["queries"])),
                          f"{m.groups['within_group_top1']:.1f}", f"{m.groups['group_r1']:.1f}",
                          *(f"{m.groups.get(label, float('nan')):.1f}" for label in labels))
        console.print(table)
    console.print(f"{report.n_queries} queries over {report.n_videos} videos ({report.n_segments} segments); "
                  f"chance R@1 = {report.chance_r1:.2f}")


def _validation_line(event: dict) -> str:
    """One line of a training epoch's validation: R@1 per method, group metrics, probes."""
    methods = [k[4:] for k in event if k.startswith("val_") and isinstance(event[k], dict) and "r1" in event[k]]
    text = "val R@1 " + ", ".join(f"{m} {event['val_' + m]['r1']:.1f}" for m in methods)
    groups = event.get("val_groups", {}).get("multi")
    if groups:
        text += f"; multi group R@1 {groups['group_r1']:.1f}, within-group {groups['within_group_top1']:.1f}"
    for feature, row in event.get("val_probes", {}).items():
        text += f"; {feature} probes " + " ".join(f"{k} {v:.2f}" for k, v in row.items())
    return text


@app.command()
def probe(
    captions: Annotated[Path, typer.Option(help="A `pvl-search synth` captions file (its scene metadata gives the labels).")],
    model: ModelDir = None,
    fit_split: Annotated[str, typer.Option(help="Split whose videos and captions the probes are fitted on.")] = "train",
    test_split: Annotated[str, typer.Option(help="Split they are scored on.")] = "test",
    cache: Annotated[Optional[Path], typer.Option(help="Frame cache folder (reused when complete). Default: a folder beside the captions file.")] = None,
    limit: Annotated[Optional[int], typer.Option(help="At most this many videos per split.", min=1)] = None,
    as_json: AsJson = False,
) -> None:
    """Linear probes: how well each scene attribute (each event's colour, shape, size and
    motion, event order, colour-shape binding) can be read off the model's video and text
    embeddings and pooled latents. Says why retrieval fails where R@1 only says that it does."""
    from pvl_search.probes import probe_model
    from pvl_search.scene_labels import LABEL_NAMES

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
    columns = ["colour", "shape", "size", "motion", "shape_by_time", "motion_by_time", "order", "binding"]
    table = Table(title=f"linear probe accuracy, fitted on {fit_split}, scored on {test_split}")
    table.add_column("features")
    for column in columns:
        table.add_column(column, justify="right")
    for feature, row in report.items():
        values = row if feature != "chance" else _attribute_chance(row)
        table.add_row(feature, *(f"{values[c]:.2f}" for c in columns))
    console.print(table)
    console.print("shape/size/motion: each moving object's (mean of the two); colour and *_by_time: each event's "
                  f"in time order; every label: {', '.join(LABEL_NAMES)}")


def _attribute_chance(row: dict) -> dict:
    from pvl_search.probes import attribute_means

    return row | attribute_means(row)


@app.command(name="eval")
def evaluate(
    captions: Annotated[Path, typer.Option(help="Captions file with ground truth (pvl-search JSON, MSR-VTT, CSV).")],
    index_dir: IndexDir = Path("pvl-index"),
    split: Annotated[str, typer.Option(help="Which split's captions are the queries.")] = "test",
    rerank_k: Annotated[str, typer.Option(help="Rerank depths to evaluate, comma-separated.")] = "8,16,32,64,128",
    single: Annotated[bool, typer.Option(help="Also evaluate single-stream reranking (decodes candidates; slow).")] = True,
    exhaustive_limit: Annotated[int, typer.Option(help="Exhaustive single-stream over the corpus when it has at most this many videos (0: never).")] = 200,
    fusion: Annotated[str, typer.Option(help="sum (retrieval + rerank logit) or rerank (logit alone).")] = "sum",
    plot: Annotated[Optional[Path], typer.Option(help="Write a PNG: R@1 and latency against K.")] = None,
    db: DbUrl = None,
    model: ModelDir = None,
    device: Device = None,
    dtype: Dtype = "auto",
    as_json: AsJson = False,
) -> None:
    """How much reranking buys: every caption is a query; R@1/5/10, median/mean rank and
    per-query latency for retrieval alone, mixed rerank and single rerank at each K."""
    from rich.progress import Progress

    from indexer.evaluation import evaluate_index, plot_report
    from indexer.searcher import Searcher

    ks = _parse_ks(rerank_k)
    try:
        runner = _load_runner(model, device, dtype=dtype)
        with Searcher(index_dir, db_url=db, runner=runner) as searcher, Progress(console=err_console, disable=as_json) as bar:
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


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Folder for the demo corpus and index.")] = Path("pvl-demo"),
    n: Annotated[int, typer.Option("--n", help="Synthetic videos to make and index.")] = 64,
    seed: Annotated[int, typer.Option(help="Seed of the demo corpus (the model was trained on seed 0).")] = 7,
    model: ModelDir = None,
) -> None:
    """The whole engine in a few minutes: make a synthetic corpus the model has never seen,
    index it with the shipped model (SQLite + FAISS), run example queries, and print how
    much mixed- and single-stream reranking buy over retrieval alone."""
    from indexer.evaluation import evaluate_index
    from indexer.index_store import IndexStore
    from indexer.pipeline import build_index
    from indexer.searcher import Searcher
    from pvl_search.captions import load_captions
    from pvl_search.synth import generate_corpus

    try:
        runner = _load_runner(model, None)
        size = runner.config.frame_size
        corpus = out / "corpus"
        err_console.print(f"1/4 making {n} synthetic videos in {corpus} ...")
        summary = generate_corpus(corpus, n, seed, size=size, splits=(0.0, 0.0, 1.0))
        err_console.print(f"2/4 indexing them into {out / 'index'} ...")
        with IndexStore(out / "index") as store:
            indexed = build_index([corpus / "videos"], store, runner)
        err_console.print(f"    {indexed.indexed} new, {indexed.unchanged} unchanged, {len(indexed.failed)} failed "
                          f"in {indexed.seconds:.1f} s")
        records = load_captions(summary.captions_path)
        err_console.print("3/4 example queries (mixed-stream rerank):")
        with Searcher(out / "index", runner=runner) as searcher:
            for record in records[:: max(1, len(records) // 3)][:3]:
                query = record.captions[0]
                result = searcher.search(query, k=3, rerank_k=16)
                table = Table(title=f"{query!r}  (wanted: {record.path.name})")
                for column in ("#", "score", "moment", "video"):
                    table.add_column(column)
                for hit in result.hits:
                    mark = " <- wanted" if hit.path == str(record.path) else ""
                    table.add_row(str(hit.rank), f"{hit.score:.2f}", f"{hit.best.start_s:.1f}-{hit.best.end_s:.1f} s",
                                  Path(hit.path).name + mark)
                console.print(table)
            err_console.print("4/4 evaluating every caption as a query ...")
            report = evaluate_index(searcher, summary.captions_path, split="test", rerank_ks=(4, 8, 16),
                                    exhaustive_limit=0)
    except _domain_errors() as exc:
        raise fail(str(exc)) from None
    _print_eval(report, f"demo: {n} unseen synthetic videos, every caption a query")
    console.print(f"try: pvl-search search \"a red circle moves left\" --index {out / 'index'}")


@app.command()
def serve(
    index_dir: IndexDir = Path("pvl-index"),
    host: Annotated[str, typer.Option(help="Address to listen on (loopback by default).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    db: DbUrl = None,
    model: ModelDir = None,
    device: Device = None,
    cross_layers: Annotated[Optional[int], typer.Option(help="Keep only the first C cross-attentions for queries.")] = None,
    token: Annotated[Optional[str], typer.Option(
        envvar="PVL_SEARCH_TOKEN", show_envvar=True,  # = pvl_web.auth.TOKEN_ENV
        help="Secret every request must carry (the page asks for it once; programs send "
             "'Authorization: Bearer TOKEN'); required for any --host but loopback. At least 16 characters; "
             "prefer the environment variable, a command line is visible to other users.")] = None,
    docs: Annotated[Optional[bool], typer.Option(
        "--docs/--no-docs", help="Serve the API docs (/docs, /redoc). Default: on for a loopback --host only.")] = None,
    path_root: Annotated[Optional[Path], typer.Option(
        help="Show video paths relative to this folder (a file outside it by its name alone), not as "
             "absolute host paths.")] = None,
    dtype: Dtype = "auto",
    # Defaults = indexer.batching.BATCH_WINDOW_S / MAX_BATCH and indexer.searcher.QUERY_CACHE
    # (not imported here: they pull in torch before --help could print).
    batch_window_ms: Annotated[float, typer.Option(
        min=0, help="Searches arriving within this many milliseconds of the first waiting one are encoded "
                    "together (one text-encoder call); a lone search waits at most this long.")] = 5.0,
    max_batch: Annotated[int, typer.Option(min=1, help="Searches answered together at most.")] = 16,
    query_cache: Annotated[int, typer.Option(
        min=0, help="Query encodings kept: the same words with other filters or k are not encoded again "
                    "(0: off).")] = 1024,
) -> None:
    """Serve the index over HTTP: the search page at /, GET /search?q=&k=&rerank_k=, GET /videos/{id},
    GET /videos/{id}/file (Range), GET /segments/{id}/thumbnail, GET /health. Concurrent searches are
    batched; each answer is the one the search gets alone."""
    import server

    def ready(url: str) -> None:
        err_console.print(f"serving on {url}" + (" (token required: the page asks for it)" if token else ""))

    try:
        server.serve(index_dir, host=host, port=port, db_url=db, model_dir=model, device=device,
                     cross_layers=cross_layers, on_ready=ready, token=token, docs=docs, path_root=path_root,
                     dtype=dtype, batch_window_s=batch_window_ms / 1000, max_batch=max_batch,
                     query_cache=query_cache)
    except (*_domain_errors(), OSError) as exc:
        raise fail(str(exc)) from None


if __name__ == "__main__":
    app()
