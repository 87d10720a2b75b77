"""File paths as an index keeps them: canonical, lossless, readable.

- Canonical: a file is known by its real path (symlinks and `..` resolved), so a folder
  reached through an alias is the same files, not a second copy of them.
- Lossless: Linux file names are bytes. Python holds a name that is not valid UTF-8 with
  surrogate escapes (`os.fsdecode`), which no database text column accepts. Such a path is
  stored as its readable form (below) plus its exact bytes, and read back as the same
  Python path, so it still opens the same file.
- Readable: the form shown to people and written to SQL text is the UTF-8 name, with every
  byte that is not UTF-8 written as a \\xNN escape.
"""

from __future__ import annotations

import os


def shown(path: str | os.PathLike[str]) -> str:
    """The readable form of a path: itself when valid UTF-8, else with \\xNN escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def to_stored(path: str | os.PathLike[str]) -> tuple[str, bytes | None]:
    """(text for the path column, exact bytes when the text alone would lose them)."""
    raw = os.fsencode(path)
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError:
        return raw.decode("utf-8", "backslashreplace"), raw


def from_stored(text: str, raw: bytes | None) -> str:
    """The path a stored (text, bytes) pair stands for, as Python opens it."""
    return os.fsdecode(raw) if raw is not None else text


def relative_shown(path: str, root: str | os.PathLike[str] | None) -> str:
    """`path` as shown relative to `root` (the file name alone when it lies outside), so a
    server can show where a video is without exposing the host's folders."""
    if root is None:
        return path
    root_text = shown(os.path.realpath(root))
    if path == root_text or path.startswith(root_text.rstrip(os.sep) + os.sep):
        return os.path.relpath(path, root_text)
    return os.path.basename(path)
