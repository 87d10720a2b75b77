"""pvl-search command line: the only place that parses arguments and prints."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    name="pvl-search",
    help="Text-to-video search on Perceiver-VL: index a folder of videos, then query it in words.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)


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
    plain, factorised = rows[-2], rows[-1]
    console.print(
        f"reranking one candidate: factorised costs {plain.gflops / factorised.gflops:.0f}x fewer FLOPs "
        f"than the plain decoder"
    )


if __name__ == "__main__":
    app()
