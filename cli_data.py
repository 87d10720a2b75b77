"""The data commands: make the synthetic benchmark (`synth`) and write training shards
(`shards`). Parse, call one library function, present (cli_views)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

import cli_views as views
from cli_common import (
    AsJson,
    _domain_errors,
    app,
    console,
    err_console,
    fail,
    quiet_ray_logs,
)


@app.command()
def synth(
    out: Annotated[Path, typer.Argument(help="Folder to write videos/ and captions.json into.")],
    n: Annotated[int, typer.Option("--n", help="Number of videos (groups of four hard-negative twins).")] = 2000,
    seed: Annotated[int, typer.Option(help="Everything is deterministic from the seed.")] = 0,
    size: Annotated[int, typer.Option(help="Frame side in pixels.")] = 64,
    fps: Annotated[int, typer.Option(help="Frames per second.")] = 8,
    seconds: Annotated[float, typer.Option(help="Length of each video.")] = 3.0,
    workers: Annotated[int, typer.Option(help="Rendering processes.")] = 2,
    heldout_seed: Annotated[int | None, typer.Option(
        help="Hold out the (colour, shape, motion) triples of the corpus with this seed instead: a fresh test "
             "corpus whose unseen combinations stayed out of a model's training.")] = None,
    long: Annotated[bool, typer.Option(
        "--long", help="The moment benchmark instead: --n long videos of --events scenes each (cut hard, "
                       "3-4.5 s each), plus one of --long-events; one caption per event, its time span recorded "
                       "for `eval`.")] = False,
    events: Annotated[int, typer.Option(min=1, help="With --long: events per video.")] = 6,
    long_events: Annotated[int, typer.Option(min=0, help="With --long: events of the one extra long video "
                                                         "(0: none).")] = 40,
    as_json: AsJson = False,
) -> None:
    """Write a synthetic video-caption benchmark: real MP4 files whose captions need motion,
    temporal order and attribute binding to match (train / val / test splits, hard negatives,
    held-out combinations in test). With --long, the moment benchmark: long videos whose
    captions each describe one stretch of known start and end."""
    from rich.progress import Progress

    from pvl_search.data.synth import generate_corpus

    if long:
        _synth_long(out, n, seed, size, fps, events, long_events, as_json)
        return
    try:
        with Progress(console=err_console, disable=as_json) as bar:
            task = bar.add_task("rendering", total=n)
            summary = generate_corpus(out, n, seed, size=size, fps=fps, seconds=seconds, workers=workers,
                                      progress=lambda done, total: bar.update(task, completed=done, total=total),
                                      heldout_seed=heldout_seed)
    except ValueError as exc:
        raise fail(str(exc)) from None
    if as_json:
        print(json.dumps(summary.to_dict()))
        return
    console.print(views.synth_table(summary))
    console.print(f"captions: {summary.captions_path}")


def _synth_long(out: Path, videos: int, seed: int, size: int, fps: int, events: int, long_events: int,
                as_json: bool) -> None:
    from rich.progress import Progress

    from pvl_search.data.long_synth import generate_long_corpus

    try:
        with Progress(console=err_console, disable=as_json) as bar:
            task = bar.add_task("rendering", total=videos + (long_events > 0))
            summary = generate_long_corpus(out, videos, events, seed, long_events=long_events, size=size, fps=fps,
                                           progress=lambda done, total: bar.update(task, completed=done))
    except ValueError as exc:
        raise fail(str(exc)) from None
    if as_json:
        print(json.dumps(summary.to_dict()))
        return
    console.print(f"{summary.videos} long videos, {summary.events} events, {summary.seconds / 60:.1f} min in "
                  f"{summary.out_dir} ({summary.bytes_on_disk / 1e6:.1f} MB)")
    console.print(f"captions: {summary.captions_path}")


@app.command(name="shards")
def write_shard_folder(
    captions: Annotated[Path, typer.Argument(help="Captions file (pvl-search JSON, MSR-VTT JSON or CSV).")],
    out: Annotated[Path, typer.Option(help="Shard folder: SPLIT-000000.tar ... and manifest.json.")],
    config: Annotated[str, typer.Option(help="Model preset whose frames and frame size to store.")] = "tiny",
    frames: Annotated[int | None, typer.Option(help="Frames per video (default: the preset's).", min=1)] = None,
    size: Annotated[int | None, typer.Option(help="Frame side in pixels (default: the preset's).", min=1)] = None,
    samples_per_shard: Annotated[int, typer.Option(help="Videos per shard file.", min=1)] = 256,
    split: Annotated[list[str] | None, typer.Option(
        "--split", help="Only this split (repeat for several). Default: every split the file has.")] = None,
    workers: Annotated[int, typer.Option(help="Decoder processes (with --ray local: Ray's CPUs).", min=1)] = 2,
    ray: Annotated[str | None, typer.Option(
        help="One Ray task per shard: local, auto or ray://HOST:PORT (as `index --ray`; every node must see the "
             "videos and --out at the same paths). Needs the cluster extra.")] = None,
    as_json: AsJson = False,
) -> None:
    """Decode a captions file's videos once into WebDataset shards for `train --shards`: the frames
    the model sees, with captions and metadata. Safe to kill and run again (finished shards are
    kept); a video that cannot be decoded is left out and listed."""
    import importlib.util

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    from rich.table import Column, Table

    from pvl_search.model.config import preset
    from pvl_search.shards.writer import ShardWriteError, write_shards

    try:
        model_config = preset(config)
        if ray is not None and importlib.util.find_spec("ray"):  # without Ray, write_shards names the extra
            quiet_ray_logs()
        with Progress(TextColumn("[bold]decoding"), BarColumn(), MofNCompleteColumn(), TextColumn("videos"),
                      TimeRemainingColumn(), console=err_console, disable=as_json) as bar:
            # Hidden until the folder is checked: a refusal prints its line without an empty bar above it.
            task = bar.add_task("shards", total=None, visible=False)
            report = write_shards(captions, out, frames=frames or model_config.frames,
                                  size=size or model_config.frame_size, samples_per_shard=samples_per_shard,
                                  splits=split or None, workers=workers, ray_address=ray,
                                  progress=lambda done, total: bar.update(task, completed=done, total=total,
                                                                          visible=True))
    except (*_domain_errors(), ShardWriteError) as exc:
        raise fail(str(exc)) from None
    if as_json:
        print(json.dumps(report.to_dict()))
        return
    table = Table("split", *(Column(name, justify="right") for name in ("shards", "videos", "failed")))
    for name, part in report.splits.items():
        table.add_row(name, str(part.shards), str(part.samples), str(len(part.failed)))
    console.print(table)
    console.print(f"{report.out}: {report.frames} frames of {report.size} px, {report.samples_per_shard} videos per "
                  f"shard; wrote {report.written_now} shards, kept {report.already_there} already there, in "
                  f"{report.seconds:.1f} s; manifest sha256 {report.manifest_sha256[:16]}")
    for part in report.splits.values():
        for video_id, reason in part.failed.items():
            err_console.print(f"[yellow]failed:[/yellow] {video_id}: {reason}", highlight=False)
