"""How the command line's output looks at 80 columns and into a pipe: `--help` gives the option
texts most of the width (not a few words a line), a table written to a pipe or a file keeps
every cell whole, and JSON is printed as before. Real runs of the installed command (into a
pipe, and on a pseudo-terminal for the rich help), typer's CliRunner, and the views printed
through the CLI's own stdout console."""

from __future__ import annotations

import io
import json
import os
import pty
import re
import subprocess
from pathlib import Path

import pytest
import typer.main
from index_helpers import pvl_search
from rich.console import Console
from typer.testing import CliRunner

import cli_views as views
from cli import app
from cli_common import OutputConsole

WIDTH = 80
MIN_TEXT_WIDTH = 40  # at 80 columns an option's text may not be wrapped any narrower than this
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "NO_COLOR", "TTY_COMPATIBLE")}
    return {**env, "COLUMNS": str(WIDTH), "OMP_NUM_THREADS": "1", **extra}


def _piped(*args: str) -> str:
    """The installed command with stdout a pipe, as in `pvl-search ... | cat` or `> file`."""
    done = subprocess.run([pvl_search(), *args], capture_output=True, text=True, timeout=300, env=_env())
    assert done.returncode == 0, done.stderr
    return done.stdout


def _on_terminal(*args: str) -> str:
    """The installed command on an 80-column pseudo-terminal: what a user sees (colours kept)."""
    main, side = pty.openpty()
    process = subprocess.Popen([pvl_search(), *args], stdin=side, stdout=side, stderr=side,
                               env=_env(TERM="xterm-256color"))
    os.close(side)
    chunks = []
    while True:
        try:
            chunk = os.read(main, 1 << 16)
        except OSError:  # the other end closed
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(main)
    assert process.wait(timeout=60) == 0
    return b"".join(chunks).decode().replace("\r\n", "\n")


def _option_texts(command: str, longer_than: int = WIDTH) -> dict[str, str]:
    """The help texts of `command`'s options too long for one 80-column line."""
    params = typer.main.get_command(app).commands[command].params
    return {param.name: param.help for param in params if param.help and len(param.help) > longer_than}


def _wrapped(output: str, text: str) -> list[str] | None:
    """The pieces of `text` on successive lines of `output` (None if it is not there whole)."""
    lines = output.splitlines()
    start = next((i for i, line in enumerate(lines) if " ".join(text.split()[:3]) in line), None)
    if start is None:
        return None
    rest, pieces = " ".join(text.split()), []
    for line in lines[start:]:
        # where a line may end: after a word, or after a hyphen (click's plain help breaks there)
        ends = [m.end() for m in re.finditer(r"\S(?=\s|$)|-(?=\S)", rest)]
        fits = [end for end in ends if rest[:end] in line]
        if not fits:
            return None
        pieces.append(rest[:max(fits)])
        rest = rest[max(fits):].lstrip()
        if not rest:
            return pieces
    return None


def _assert_roomy(output: str, texts: dict[str, str]) -> None:
    """Every text whole, wrapped only where the next word would not fit in MIN_TEXT_WIDTH columns,
    and the text column (as wide as its longest line at least) MIN_TEXT_WIDTH wide or more."""
    assert texts, "no option text long enough to need wrapping"
    assert max(len(line) for line in output.splitlines()) <= WIDTH
    longest = 0
    for name, text in texts.items():
        pieces = _wrapped(output, text)
        assert pieces, f"--{name}'s help is not shown whole:\n{output}"
        needed = [len(piece) + 1 + len(after.split()[0]) for piece, after in zip(pieces, pieces[1:])]
        assert min(needed) > MIN_TEXT_WIDTH, f"--{name}'s help wrapped at {min(needed)} columns: {pieces}"
        longest = max(longest, *map(len, pieces))
    assert longest >= MIN_TEXT_WIDTH, output


@pytest.mark.parametrize("command", ["index", "search"])
def test_help_into_a_pipe_at_80_columns(command: str) -> None:
    output = _piped(command, "--help")
    assert "Usage: pvl-search " + command in output and "\x1b[" not in output
    _assert_roomy(output, _option_texts(command))


@pytest.mark.parametrize("command", ["index", "search"])
def test_help_on_a_terminal_at_80_columns(command: str) -> None:
    raw = _on_terminal(command, "--help")
    output = ANSI.sub("", raw)
    assert "\x1b[" in raw and "╭─ Options" in output  # rich help, in colour, on a terminal
    assert "…" not in output  # no name cut short
    _assert_roomy(output, _option_texts(command))


def test_help_through_the_cli_runner() -> None:
    result = CliRunner().invoke(app, ["index", "--help"], env={"COLUMNS": str(WIDTH)})
    assert result.exit_code == 0, result.output
    _assert_roomy(result.output, _option_texts("index"))


def test_command_list_keeps_each_first_paragraph_whole() -> None:
    group = typer.main.get_command(app)
    firsts = {name: " ".join(c.help.split("\n\n")[0].split()) for name, c in group.commands.items()}
    for output in (_piped("--help"), ANSI.sub("", _on_terminal("--help"))):
        assert "…" not in output  # and no text cut with "...": each is found whole below
        for name, first in firsts.items():
            assert _wrapped(output, first), f"{name}: {first!r} not whole in\n{output}"


def test_no_arguments_still_print_the_help_into_a_pipe() -> None:
    done = subprocess.run([pvl_search()], capture_output=True, text=True, timeout=60, env=_env())
    assert done.returncode == 2 and done.stdout.startswith("Usage: pvl-search [OPTIONS] COMMAND")
    assert all(f"  {name} " in done.stdout for name in typer.main.get_command(app).commands)


def test_a_table_into_a_pipe_keeps_every_cell_whole() -> None:
    """`profile` prints a table whose notes are longer than an 80-column cell leaves them."""
    output = _piped("profile", "--config", "tiny", "--repeats", "1")
    rows = [line for line in output.splitlines() if line.startswith("│")]
    assert len(rows) >= 5 and "…" not in output
    for row in rows:  # one line a row: no cell wrapped onto a second line
        cells = [cell.strip() for cell in row.strip("│").split("│")]
        assert len(cells) == 5 and all(cells), row
    assert max(len(line) for line in output.splitlines()) > WIDTH  # COLUMNS=80 did not squeeze it


def _probe_report(features: list[str]) -> tuple[dict, dict]:
    row = {column: 0.5 for column in views.PROBE_COLUMNS}
    return {feature: row for feature in features}, row


def test_a_view_written_to_a_file_through_the_cli_console(tmp_path: Path) -> None:
    features = ["video_embedding_after_the_projection_head", "text_embedding_after_the_projection_head",
                "pooled_latents_of_the_video_encoder"]
    report, chance = _probe_report(features)
    table = views.probe_table(report, "train", "test", chance)
    path = tmp_path / "probes.txt"
    with path.open("w") as file:
        OutputConsole(file=file).print(table)  # the console the CLI prints results with
    text = path.read_text()
    for feature in features:
        assert any(line.startswith(f"│ {feature} ") for line in text.splitlines()), text
    assert "…" not in text


def test_a_view_on_a_narrow_terminal_folds_instead_of_cutting() -> None:
    features = ["video_embedding_after_the_projection_head"]
    report, chance = _probe_report(features)
    out = io.StringIO()
    Console(file=out, width=WIDTH, force_terminal=True, color_system=None).print(
        views.probe_table(report, "train", "test", chance))
    first_cells = [line.split("│")[1].strip() for line in out.getvalue().splitlines() if line.startswith("│")]
    assert "…" not in out.getvalue() and "".join(first_cells).endswith(features[0])


def test_json_is_printed_as_before() -> None:
    """print_json never wraps: the wide pipe console writes the same bytes as an 80-column one."""
    data = json.dumps({"name": "mixed decoder, factorised", "note": "per candidate " * 20, "path": "/v/" + "x" * 150})
    before, after = io.StringIO(), io.StringIO()
    Console(file=before, width=WIDTH).print_json(data)
    OutputConsole(file=after).print_json(data)
    assert after.getvalue() == before.getvalue()
    assert json.loads(after.getvalue()) == json.loads(data)
