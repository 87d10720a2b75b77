"""Search filters as SQL: a shell-style path pattern that matches the same on SQLite and
PostgreSQL."""

from __future__ import annotations

from sqlalchemy import ColumnElement


def glob_to_like(pattern: str) -> str:
    """Shell glob (* and ? only) -> SQL LIKE pattern (escape character '\\')."""
    out = []
    for ch in pattern:
        if ch in "%_\\":
            out.append("\\" + ch)
        elif ch == "*":
            out.append("%")
        elif ch == "?":
            out.append("_")
        else:
            out.append(ch)
    return "".join(out)


def path_matches(column: ColumnElement[str], pattern: str, dialect: str) -> ColumnElement[bool]:
    """`column` matches the shell-style `pattern` (* any run of characters, / included; ?
    one character; everything else literal), case-sensitively on every backend, as shell
    globs and Linux paths are. SQLite's LIKE ignores ASCII case and PostgreSQL's does not,
    so SQLite uses GLOB (case-sensitive), with its one extra wildcard, [, made literal."""
    if dialect == "sqlite":
        return column.op("GLOB")(pattern.replace("[", "[[]"))
    return column.like(glob_to_like(pattern), escape="\\")
