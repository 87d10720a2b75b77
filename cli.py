"""pvl-search command line: the only place that parses arguments and prints. The search
engine's commands live here (index, status, search, serve, demo); the data ones (synth, shards)
in cli_data.py, the model-research ones in cli_research.py; shared options in cli_common.py;
how results look in cli_views.py."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer

import cli_data  # noqa: F401 - registers synth and shards on the same app
import cli_reranker  # noqa: F401 - registers train-reranker on the same app
import cli_research  # noqa: F401 - registers the research commands on the same app
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
from indexer.search.request import DEFAULT_K, DEFAULT_RERANK_K, RerankMode
from pvl_search.media.backends import Backend
from pvl_search.ranking import FUSION_HELP, Fusion


@app.command()
def index(
    paths: Annotated[list[Path], typer.Argument(help="Video files or folders (searched recursively).")] = None,
    index_dir: IndexDir = Path("pvl-index"),
    db: DbUrl = None,
    model: ModelDir = None,
    window: Annotated[float | None, typer.Option(
        help="Segment length in seconds; shorter videos are one segment. Default: what the index records, else "
             "the clip length the model was trained on (3 s for the shipped one).")] = None,
    stride: Annotated[float | None, typer.Option(
        help="Seconds between segment starts (at most). Default: the index's, else 2/3 of the window.")] = None,
    shots: Annotated[bool | None, typer.Option("--shots/--no-shots",
        help="Also one segment per shot, cut where the video cuts (moments start where events start). Default: "
             "the index's choice, else yes with the model's own windows.")] = None,
    reindex: Annotated[bool, typer.Option(
        help="Cut and encode every video again, changed or not: to move an index to other windows (or, with no "
             "--window, to the model's own).")] = False,
    batch_size: Annotated[int, typer.Option(help="Clips per encoder call.")] = 8,
    workers: Annotated[int, typer.Option(help="Decoder processes.")] = 2,
    timeout: Annotated[float, typer.Option(help="Seconds a decoder may make no progress before it is killed.")] = 60.0,
    decoder: Annotated[Backend, typer.Option(help="auto (decord, then PyAV), decord or pyav.")] = "auto",
    store_latents: Annotated[bool | None, typer.Option("--store-latents/--no-store-latents",
        help="Keep each segment's full N x D latents (the latent reranker reads them). Default: yes for a model with "
             "a latent reranker, else no; an existing index keeps its choice.")] = None,
    store_patches: Annotated[bool | None, typer.Option("--store-patches/--no-store-patches",
        help="Store the patch tokens of every segment (the patch reranker reads them; 512 x 192 float16 values, "
             "196 KB a segment, for the tiny model). Default: yes for a model with a patch reranker; an existing "
             "index keeps its choice.")] = None,
    faiss_factory: Annotated[str | None, typer.Option(help="FAISS factory string, e.g. HNSW32 (default: exact, "
                                                           "switching to IVF past 50k segments); a new index "
                                                           "only.")] = None,
    retry_failed: Annotated[bool, typer.Option(help="Retry files that failed before even if unchanged.")] = False,
    rebuild: Annotated[bool, typer.Option(help="Only recreate the FAISS index (or Milvus collection) from the stored "
                                          "embeddings; with --vectors, move the vectors there first.")] = False,
    vectors: Annotated[str | None, typer.Option(
        help="Where the vectors live: faiss (a file in the index folder) or milvus:URI, URI a Milvus Lite file "
             "(PATH.db) or http://HOST:19530, optionally #HNSW etc. (default FLAT, exact). Recorded in the index: "
             "search, serve, eval and status follow it. Default: what the index records (faiss for a new one). "
             "An existing index moves only with --rebuild. Needs the cluster extra.")] = None,
    ray: Annotated[str | None, typer.Option(
        help="Decode and encode on Ray: local (start one here), auto (the cluster `ray start` made here) or "
             "ray://HOST:PORT (a Ray client port; it must accept a connection within 10 s). "
             "Every worker must see the files (and --model) at the same paths as this machine: a shared "
             "filesystem. This process writes the index. Needs the cluster extra.")] = None,
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

    from indexer.ingest.pipeline import IndexOptions, build_index, rebuild_vectors
    from indexer.ingest.ray_producer import RayOptions
    from indexer.store.index_store import IndexStore
    from indexer.store.vectors.choice import parse_vectors, require_cluster_extra

    try:
        if ray is not None:
            require_cluster_extra("--ray", "ray")
            quiet_ray_logs()
        if vectors is not None:
            parse_vectors(vectors)  # a bad --vectors is refused before the model loads
        if rebuild:
            count = rebuild_vectors(index_dir, db, vectors)
            console.print(json.dumps({"rebuilt_vectors": count}) if as_json else f"rebuilt vectors: {count}")
            return
        if not paths:
            raise fail("give at least one video file or folder to index")
        runner = _load_runner(model, device, dtype=dtype)
        ray_options = None if ray is None else RayOptions(ray, ray_workers, ray_gpus_per_worker,
                                                          model_dir=str(model.resolve()) if model else None,
                                                          dtype=dtype)
        options = IndexOptions(window_s=window, stride_s=stride, shots=shots, reindex=reindex, batch_size=batch_size,
                               workers=workers,
                               timeout_s=timeout, backend=decoder, store_latents=store_latents,
                               store_patches=store_patches,
                               faiss_factory=faiss_factory, retry_failed=retry_failed, thumbnails=thumbnails,
                               vectors=vectors, ray=ray_options)
        with IndexStore(index_dir, db) as store, Progress(
            TextColumn("[bold]indexing"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[segments]} segments"), TextColumn("{task.fields[rate]:.1f} videos/s"),
            TimeRemainingColumn(),
            console=err_console, disable=as_json, transient=False,
        ) as bar:
            # Hidden until the first file is planned, so a refusal (e.g. a model mismatch)
            # prints its error without an empty bar above it.
            task = bar.add_task("index", total=None, rate=0.0, segments=0, visible=False)
            started = time.perf_counter()

            def on_progress(p) -> None:  # noqa: ANN001
                # Files under way count in part: the bar moves within a long film.
                rate = (p.done + p.partial) / max(1e-9, time.perf_counter() - started)
                bar.update(task, completed=p.done + p.partial, total=p.total, rate=rate,
                           segments=p.segments + p.segments_underway, visible=True)

            summary = build_index(paths, store, runner, options, progress=on_progress)
    except _domain_errors() as exc:
        raise fail(str(exc)) from None
    if as_json:
        print(json.dumps(summary.to_dict()))
    else:
        console.print(
            f"indexed {summary.indexed} ({summary.segments} segments), unchanged {summary.unchanged}, "
            f"removed {summary.removed}, failed {len(summary.failed)} — {summary.seconds:.1f} s, {summary.dtype}"
            + (f", {summary.windows['window_s']:g} s windows every {summary.windows['stride_s']:g} s"
               + (" and one per shot" if summary.windows.get("shots") else "") if summary.windows else "")
            + (f"; thumbnails made for {summary.thumbnails_added} older segments" if summary.thumbnails_added else "")
        )
        for path, reason in summary.failed.items():
            err_console.print(f"[yellow]failed:[/yellow] {path}: {reason}", highlight=False)
        if summary.continued_reindex:
            err_console.print("note: an earlier `--reindex` was interrupted; this run cut every video again",
                              highlight=False)
        if summary.reindex_hint:
            err_console.print(f"note: {summary.reindex_hint}", highlight=False)
        if summary.decoder_messages:  # FFmpeg's warnings about damaged streams: the files indexed anyway
            err_console.print(f"decoder warnings: {summary.decoder_messages} lines, in {summary.decoder_log}",
                              highlight=False)
    if summary.failed:
        raise typer.Exit(code=2)


@app.command()
def status(index_dir: IndexDir = Path("pvl-index"), db: DbUrl = None, as_json: AsJson = False) -> None:
    """Counts, bytes on disk per store, the model that built the index, recent failures."""
    from indexer.store.index_reader import IndexReader

    try:
        with IndexReader(index_dir, db) as store:
            stats = store.stats()
    except _domain_errors() as exc:
        raise fail(str(exc)) from None
    if as_json:
        print(json.dumps({"index": str(index_dir), **stats.to_dict()}))
        return
    console.print(views.status_table(stats, index_dir))
    for path, error in stats.recent_failures:
        err_console.print(f"[yellow]failed:[/yellow] {path}: {error}", highlight=False)


@app.command()
def search(
    query: Annotated[str, typer.Argument(help="What to look for, in words.")],
    index_dir: IndexDir = Path("pvl-index"),
    k: Annotated[int, typer.Option("-k", help="Videos to return.")] = DEFAULT_K,
    rerank_k: Annotated[int | None, typer.Option(
        help=f"Segments retrieved by FAISS and reranked. Default: the model's choice (its search_defaults.json), "
             f"else {DEFAULT_RERANK_K}.")] = None,
    rerank: Annotated[RerankMode, typer.Option(
        help="auto (the reranker the model's validation chose), stacked (latent + patch logits, the patch one "
             "weighted by the model's search_defaults.json), patch (a cross-encoder: the query reads each "
             "candidate's stored patch tokens), joint (a cross-encoder over the query's and the "
             "stored video latents), mixed (the paper's [CLS] decoder from stored rerank states), latent (query "
             "latents attend over stored video latents), single (decode again; slow), none.")] = "auto",
    fusion: Annotated[Fusion | None, typer.Option(
        help=FUSION_HELP + " Default: the model's choice, else calibrated.")] = None,
    cross_layers: Annotated[int | None, typer.Option(
        help="Keep only the first C cross-attentions for the query.")] = None,
    glob: Annotated[str | None, typer.Option(help="Only videos whose full path matches this pattern, e.g. "
                                                     "'*/news/*' (* and ? wildcards; case-sensitive).")] = None,
    min_duration: Annotated[float | None, typer.Option(help="Only videos at least this many seconds long.")] = None,
    max_duration: Annotated[float | None, typer.Option(help="Only videos at most this many seconds long.")] = None,
    since: Annotated[str | None, typer.Option(help="Only videos added since this ISO 8601 date or date/time "
                                                      "(UTC when it has no offset), or seconds since 1970.")] = None,
    db: DbUrl = None,
    model: ModelDir = None,
    device: Device = None,
    dtype: Dtype = "auto",
    as_json: AsJson = False,
) -> None:
    """Find the videos (and the moment inside each) that match a text query."""
    from indexer.search.request import search_request

    try:  # the same rules as the HTTP API (indexer/search/request.py), checked before the model loads
        request = search_request(query, k=k, rerank_k=rerank_k, rerank=rerank, fusion=fusion, glob=glob,
                                 min_duration=min_duration, max_duration=max_duration, since=since)
        from indexer.search.searcher import Searcher

        runner = _load_runner(model, device, cross_layers, dtype)
        with Searcher(index_dir, db_url=db, runner=runner) as searcher:
            result = searcher.run(request)
    except _domain_errors() as exc:
        raise fail(str(exc)) from None
    if result.truncated:
        err_console.print(f"note: the query is longer than {runner.config.text_length} tokens; the rest was ignored")
    if as_json:  # one line per hit, each saying the dtypes of the query and of the index
        for hit in result.hits:
            print(json.dumps({**hit.to_dict(), "dtype": result.dtype, "index_dtype": result.index_dtype,
                              "windows": None if result.windows is None else asdict(result.windows)}))
        return
    console.print(views.search_table(result, query, rerank))
    if not result.hits:
        console.print("no matching videos")


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
    from indexer.demo import STEPS, run_demo

    def on_step(step) -> None:  # noqa: ANN001 - indexer.demo.DemoStep
        err_console.print(f"{step.number}/{STEPS} {step.message} ...")

    try:
        demo_run = run_demo(out, n, seed, _load_runner(model, None), progress=on_step)
    except _domain_errors() as exc:
        raise fail(str(exc)) from None
    indexed = demo_run.indexed
    err_console.print(f"    {indexed.indexed} new, {indexed.unchanged} unchanged, {len(indexed.failed)} failed "
                      f"in {indexed.seconds:.1f} s")
    for example in demo_run.examples:
        console.print(views.example_table(example.query, example.wanted, example.result.hits, example.span))
    for renderable in views.eval_tables(demo_run.report, f"demo: {n} unseen synthetic videos, every caption a query"):
        console.print(renderable)
    if demo_run.moments is not None:
        console.print(views.moment_table(demo_run.moments, "the long video's events, each searched as a moment"))
    console.print(f"try: pvl-search search \"a red circle moves left\" --index {out / 'index'}")


@app.command()
def serve(
    index_dir: IndexDir = Path("pvl-index"),
    host: Annotated[str, typer.Option(help="Address to listen on (loopback by default).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    db: DbUrl = None,
    model: ModelDir = None,
    device: Device = None,
    cross_layers: Annotated[int | None, typer.Option(
        help="Keep only the first C cross-attentions for queries.")] = None,
    token: Annotated[str | None, typer.Option(
        envvar="PVL_SEARCH_TOKEN", show_envvar=True,  # = pvl_web.auth.TOKEN_ENV
        help="Secret every request must carry (the page asks for it once; programs send "
             "'Authorization: Bearer TOKEN'); required for any --host but loopback. At least 16 characters; "
             "prefer the environment variable, a command line is visible to other users.")] = None,
    docs: Annotated[bool | None, typer.Option(
        "--docs/--no-docs", help="Serve the API docs (/docs, /redoc). Default: on for a loopback --host only.")] = None,
    path_root: Annotated[Path | None, typer.Option(
        help="Show video paths relative to this folder (a file outside it by its name alone), not as "
             "absolute host paths.")] = None,
    dtype: Dtype = "auto",
    # Defaults = indexer.search.batching.BATCH_WINDOW_S / MAX_BATCH and indexer.search.state.QUERY_CACHE
    # (not imported here: they pull in torch before --help could print).
    batch_window_ms: Annotated[float, typer.Option(
        min=0, help="Searches arriving within this many milliseconds of the first waiting one are encoded "
                    "together (one text-encoder call); a lone search waits at most this long.")] = 5.0,
    max_batch: Annotated[int, typer.Option(min=1, help="Searches answered together at most.")] = 16,
    query_cache: Annotated[int, typer.Option(
        min=0, help="Query encodings kept: the same words with other filters or k are not encoded again "
                    "(0: off).")] = 1024,
    allowed_host: Annotated[list[str] | None, typer.Option(
        "--allowed-host", metavar="NAME",
        help="Also answer requests whose Host is NAME (repeatable; '*': any). By default only localhost, "
             "127.0.0.1, ::1 and the --host address are answered (with 0.0.0.0 or ::, any IP address): "
             "a guard against DNS rebinding.")] = None,
    workers: Annotated[int, typer.Option(
        min=1, help="Server processes answering on the one port, each with its own copy of the model and "
                    "cores / N torch threads. One process answers about 100 tiny searches a second (its Python "
                    "lock is the limit); more raise the throughput of many clients, not one client's speed.")] = 1,
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
                     query_cache=query_cache, allowed_hosts=allowed_host or (), workers=workers)
    except (*_domain_errors(), OSError) as exc:
        raise fail(str(exc)) from None


if __name__ == "__main__":
    app()
