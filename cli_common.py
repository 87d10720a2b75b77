"""What every command shares: the typer app (its --help is cli_help.py), the consoles, the
one-line failure, the common options (index folder, database, model, device, dtype, --json) and
loading a model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console, ConsoleDimensions

from cli_help import HelpApp, HelpGroup

# light imports only: torch is not imported until a model loads
from pvl_search.precision import DtypeChoice

app = HelpApp(
    name="pvl-search",
    help="Text-to-video search on Perceiver-VL: index a folder of videos, then query it in words.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=HelpGroup,
)


# -- results on stdout ------------------------------------------------------------------------

PIPE_WIDTH = 10_000  # the line length into a pipe or a file: a table is as wide as its cells


class OutputConsole(Console):
    """stdout. On a terminal rich fits tables to the terminal's width; into a pipe or a file
    (COLUMNS notwithstanding) lines are as long as their content, so no table cell is cut or
    wrapped. JSON is printed as it was: print_json never wraps."""

    @property
    def size(self) -> ConsoleDimensions:
        size = super().size
        return size if self.is_terminal else ConsoleDimensions(PIPE_WIDTH, size.height)


console = OutputConsole()


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


IndexDir = Annotated[Path, typer.Option("--index", "-i",
    help="Index folder (SQLite database, FAISS and stores live here).")]


DbUrl = Annotated[  # the timeouts are indexer.store.database.PG_*_TIMEOUT_S (a test keeps them equal)
    str | None,
    typer.Option("--db", help="SQLAlchemy URL of the metadata database, e.g. postgresql+psycopg://u@host/db "
                 "(default: SQLite inside the index folder). PostgreSQL timeouts: connect 10 s, statement 60 s; "
                 "change them with the URL parameters connect_timeout and statement_timeout (seconds)."),
]


ModelDir = Annotated[
    Path | None, typer.Option("--model",
        help="Model folder (config.json + model.safetensors); default: the shipped model.")
]


Device = Annotated[str | None, typer.Option(help="cpu or cuda (default: cuda when available).")]


Dtype = Annotated[DtypeChoice, typer.Option(
    help="What the model runs in. auto: bfloat16 on CUDA and on CPUs with native bf16 matmul "
         "(AVX512_BF16, AMX, Arm BF16), else float32. Stored vectors are float either way: an index built "
         "in one dtype is searched in the other.")]


AsJson = Annotated[bool, typer.Option("--json", help="Machine-readable JSON output.")]


def _domain_errors() -> tuple[type[Exception], ...]:
    from indexer.errors import IndexStoreError
    from pvl_search.media.video import VideoDecodeError
    from pvl_search.model.checkpoint import CheckpointError
    from pvl_search.ray_connect import RayConnectError
    from pvl_search.training.ray_train import TrainRunError

    # OSError: disk full, a folder that cannot be read or written: one line like the rest.
    # ImportError: an optional extra that is not installed (the message names it).
    return (IndexStoreError, CheckpointError, VideoDecodeError, RayConnectError, TrainRunError, OSError, ValueError,
            ImportError)


def quiet_ray_logs() -> None:
    """Ray's driver logs advice on stderr (token authentication, client ports, `--address`
    flags pvl-search does not have); what matters reaches the user as pvl-search's own one-line
    errors, and Ray's processes keep their log files. Its errors still show. The level, not a
    handler: ray.init drops the "ray" logger's handlers."""
    import logging

    import ray  # noqa: F401 - its import sets the "ray" logger up; this comes after

    logging.getLogger("ray").setLevel(logging.ERROR)


def _load_runner(model: Path | None, device: str | None, cross_layers: int | None = None,  # noqa: ANN202
                 dtype: DtypeChoice = "auto"):
    from indexer.encoding import ModelRunner

    return ModelRunner.from_folder(model, device=device, cross_layers=cross_layers, dtype=dtype)
