"""How `pvl-search --help` looks: readable at any width. On a terminal, panels of two columns
(the option names, and the help text in the rest of the line); into a pipe or a file, click's
plain help. `cli_common.app` is built with these classes."""

from __future__ import annotations

import inspect
from typing import Any

import typer
import typer.core
from rich.console import Console, Group
from rich.highlighter import RegexHighlighter
from rich.padding import Padding
from rich.panel import Panel
from rich.table import Table
from rich.text import Text
from rich.theme import Theme

# -- --help: readable at any width ---------------------------------------------------------
# typer's own rich help gives each option a row of six auto-sized columns (names, short name,
# negative names, type, help); at 80 columns rich shrinks them all alike and the help text ends
# up a few words a line. Here: on a terminal, two columns, the names (wrapped at a third of the
# width at most) and the text in all the rest; into a pipe or a file, click's plain help.


class _HelpHighlighter(RegexHighlighter):
    base_style = "help."
    highlights = [  # noqa: RUF012 - rich's own pattern: a class attribute
        r"(?P<option>(?<![\w-])--?[a-zA-Z][\w-]*)",
        r"(?P<metavar><[^<>\s]+(?: range)?>)",
        r"(?P<extra>\[(?:default|required|env var|x[<>]|[\d.-]+<)[^\]]*\])",
    ]


_HELP_THEME = Theme({"help.option": "bold cyan", "help.metavar": "bold yellow", "help.extra": "dim",
                     "help.usage": "bold", "help.deprecated": "red"})


def _paragraphs(text: str | None) -> list[str]:
    """A help text's paragraphs the way click shows them: single line breaks joined, a paragraph
    that starts with \\b kept as written, whatever follows \\f left out."""
    text = inspect.cleandoc(text or "").partition("\f")[0]
    return [p.strip("\b\n") if p.startswith("\b") else " ".join(p.split()) for p in text.split("\n\n") if p.strip()]


def _help_panels(command: Any, ctx: Any) -> list[tuple[str, list[tuple[str, str]]]]:
    """(names with type, help with default) per shown parameter, as click's plain help has them,
    by panel: the arguments' panels first, then the options'."""
    panels: dict[tuple[bool, str], list[tuple[str, str]]] = {}
    for param in command.get_params(ctx):
        record = None if getattr(param, "hidden", False) else param.get_help_record(ctx)
        if record is not None:
            is_option = param.param_type_name == "option"
            title = getattr(param, "rich_help_panel", None) or ("Options" if is_option else "Arguments")
            panels.setdefault((is_option, title), []).append(record)
    return [(title, rows) for (_, title), rows in sorted(panels.items(), key=lambda item: item[0][0])]


def _command_rows(group: Any, ctx: Any) -> list[tuple[str, str]]:
    rows = []
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        if command is not None and not command.hidden:
            text = command.short_help or next(iter(_paragraphs(command.help)), "")
            rows.append((name, ("(deprecated) " if command.deprecated else "") + text))
    return rows


def _help_panel(title: str, rows: list[tuple[str, str]], name_width: int, highlight: RegexHighlighter) -> Panel:
    table = Table.grid(padding=(0, 2, 0, 0), expand=True)
    table.add_column(width=name_width, overflow="fold")  # wraps at spaces; a longer name folds
    table.add_column(ratio=1)
    for names, text in rows:
        table.add_row(highlight(Text(names)), highlight(Text(text)))
    return Panel(table, title=title, title_align="left", border_style="dim")


def print_rich_help(command: Any, ctx: Any, console: Console | None = None) -> None:
    """`command --help` on a terminal: usage, text, then panels of two columns, the names and
    the help text, which gets two thirds of the width or more."""
    out = console or Console(theme=_HELP_THEME)
    highlight = _HelpHighlighter()
    out.print(Padding(Text(command.get_usage(ctx), style="help.usage"), (1, 1), expand=False))
    paragraphs = _paragraphs(command.help)
    if command.deprecated or paragraphs:
        first = Text("(deprecated) " if command.deprecated else "", style="help.deprecated")
        first.append(paragraphs[0] if paragraphs else "")
        rest = [Text("\n" + p, style="dim") for p in paragraphs[1:]]
        out.print(Padding(Group(first, *rest), (0, 1, 1, 1), expand=False))
    panels = _help_panels(command, ctx)
    inner = out.width - 4  # a panel's border and padding
    names = [len(name) for _, rows in panels for name, _ in rows]
    name_width = min(max(names, default=1), max(12, inner // 3))
    for title, rows in panels:
        out.print(_help_panel(title, rows, name_width, highlight))
    if hasattr(command, "list_commands"):
        rows = _command_rows(command, ctx)
        if rows:
            out.print(_help_panel("Commands", rows, max(len(name) for name, _ in rows), highlight))
    if command.epilog:
        out.print(Padding(Text("\n\n".join(_paragraphs(command.epilog))), 1, expand=False))


class _Help:
    """--help: print_rich_help on a terminal; click's plain help (the names, then the text
    wrapped in the rest of the line) into a pipe or a file, or when rich help is turned off."""

    rich_markup_mode: Any

    def format_help(self, ctx: Any, formatter: Any) -> None:
        if not self.rich_markup_mode or not getattr(typer.core, "HAS_RICH", True):
            super().format_help(ctx, formatter)  # type: ignore[misc] - rich help off: typer's plain help
            return
        if Console().is_terminal:
            print_rich_help(self, ctx)
            return
        # Typer's plain help, printed here the way typer prints its rich help: with rich on, typer
        # prints nothing of what a bare `pvl-search` (no_args_is_help) gets back.
        plain, markup = ctx.make_formatter(), self.rich_markup_mode
        self.rich_markup_mode = None
        try:
            super().format_help(ctx, plain)  # type: ignore[misc]
        finally:
            self.rich_markup_mode = markup
        typer.echo(plain.getvalue().rstrip("\n"))


class HelpCommand(_Help, typer.core.TyperCommand):
    def get_short_help_str(self, limit: int = 45) -> str:
        """The group's plain help lists the whole first paragraph (click cuts it at `limit`)."""
        return self.short_help or next(iter(_paragraphs(self.help)), "")


class HelpGroup(_Help, typer.core.TyperGroup):
    pass


class HelpApp(typer.Typer):
    """A typer app whose commands default to HelpCommand."""

    def command(self, name: str | None = None, *, cls: type[typer.core.TyperCommand] | None = None,
                **kwargs: Any) -> Any:
        return super().command(name, cls=cls or HelpCommand, **kwargs)
