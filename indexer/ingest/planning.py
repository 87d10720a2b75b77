"""What an indexing run has to do: scan the given paths for media files (a bad directory
entry is recorded, never fatal) and compare them with what the index knows (new, changed,
unchanged, failed before, gone)."""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from stat import S_ISDIR

from indexer.paths import shown
from indexer.store.index_store import IndexStore
from indexer.store.records import KnownVideo, fingerprint_file
from indexer.store.schema import VideoStatus
from pvl_search.media.video import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS

MEDIA_EXTENSIONS = frozenset(VIDEO_EXTENSIONS) | frozenset(IMAGE_EXTENSIONS)


@dataclass(frozen=True)
class BadEntry:
    """A directory entry that cannot be indexed before any decoder sees it (a broken or
    looping symlink, a file or folder that cannot be read), recorded as failed."""

    path: Path  # as found (a link that leads nowhere has no real path)
    reason: str
    stat: os.stat_result | None  # its own lstat, to tell next time whether it changed


def _reason(error: OSError, path: Path) -> str:
    """Why `path` cannot be indexed, in a few words."""
    if error.errno == errno.ELOOP:
        return "symbolic link loop"
    if isinstance(error, (FileNotFoundError, NotADirectoryError)) and os.path.islink(path):
        return f"broken symbolic link (to {os.fsdecode(os.readlink(path))!r})"
    if isinstance(error, PermissionError):
        return "permission denied"
    return error.strerror or type(error).__name__


def _lstat(path: Path) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except OSError:
        return None


def scan(paths: Sequence[str | os.PathLike[str]]) -> tuple[list[Path], list[BadEntry]]:
    """(media files under `paths`, entries that cannot be read), both sorted. Files and
    folders are searched recursively; hidden ones are skipped. Every file is known by its
    real path (indexer/paths.py), so one reached through two aliases is listed once. A path
    given that does not exist at all is an error; a bad entry inside a folder is not."""
    found: set[Path] = set()
    bad: dict[Path, BadEntry] = {}

    def add(path: Path) -> None:
        try:
            found.add(Path(os.path.realpath(path, strict=True)))
        except OSError as error:
            bad[path] = BadEntry(path, _reason(error, path), _lstat(path))

    def unreadable_folder(error: OSError) -> None:
        folder = Path(error.filename)
        bad[folder] = BadEntry(folder, f"cannot list folder: {_reason(error, folder)}", _lstat(folder))

    for raw in paths:
        root = Path(raw).expanduser().absolute()
        if not os.path.lexists(root):
            raise FileNotFoundError(f"{shown(raw)}: no such file or folder")
        if not root.is_dir():
            add(root)  # named explicitly: indexed whatever its extension says
            continue
        for folder, dirs, files in os.walk(os.path.realpath(root), onerror=unreadable_folder):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            for name in files:
                if not name.startswith(".") and Path(name).suffix.lower() in MEDIA_EXTENSIONS:
                    add(Path(folder) / name)
    return sorted(found), [bad[p] for p in sorted(bad) if p not in found]


def _under(path: str, roots: Sequence[Path]) -> bool:
    return any(path == str(r) or path.startswith(str(r) + os.sep) for r in roots)


def _gone(path: str) -> bool:
    """Whether a known path no longer names a file of its own: deleted, a folder (recorded
    while it could not be listed, listed now), or an alias of a real path that is indexed
    under that name (a symlink fixed since, or an index made before paths were canonical)."""
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return True
    except OSError:
        return False  # cannot tell (e.g. a folder became unreadable): keep it
    return S_ISDIR(mode) or os.path.realpath(path) != path


@dataclass
class Plan:
    todo: list[tuple[Path, os.stat_result, str]]  # to index: (path, stat, fingerprint)
    bad: list[BadEntry]  # new or changed entries that cannot be read: recorded as failed
    gone: list[str]  # known paths no longer on disk: marked removed
    unchanged: int
    scanned: int


def plan(paths: Sequence[str | os.PathLike[str]], store: IndexStore, *, retry_failed: bool = False,
         reindex: bool = False) -> Plan:
    """What to do for each entry under `paths`, compared with what the index knows; `reindex`:
    every readable file is indexed again, changed or not."""
    given = [Path(p).expanduser().absolute() for p in paths]
    roots = given + [Path(os.path.realpath(p)) for p in given]
    files, bad = scan(paths)
    known = store.known_videos()
    result = Plan([], [], [], 0, len(files) + len(bad))

    def same(seen: KnownVideo | None, stat: os.stat_result | None) -> bool:
        """Known, not to be retried, and the same size and mtime: not even read."""
        if seen is None or seen.status == VideoStatus.REMOVED.value or stat is None or reindex:
            return False
        if seen.status == VideoStatus.FAILED.value and retry_failed:
            return False
        return seen.size == stat.st_size and seen.mtime == stat.st_mtime

    for path in files:
        seen = known.get(str(path))
        try:
            stat = path.stat()
            if same(seen, stat):
                result.unchanged += 1
                continue
            fingerprint = fingerprint_file(path)
        except OSError as error:  # e.g. unreadable: a failure of this file, not of the run
            entry = BadEntry(path, _reason(error, path), _lstat(path))
            if same(seen, entry.stat) and seen.status == VideoStatus.FAILED.value:
                result.unchanged += 1
            else:
                result.bad.append(entry)
            continue
        if (
            not reindex
            and seen is not None
            and seen.status == VideoStatus.INDEXED.value
            and seen.fingerprint == fingerprint
            and seen.size == stat.st_size
        ):
            result.unchanged += 1  # touched, not changed
            continue
        result.todo.append((path, stat, fingerprint))
    for entry in bad:
        seen = known.get(str(entry.path))
        if same(seen, entry.stat) and seen.status == VideoStatus.FAILED.value:
            result.unchanged += 1  # the same bad entry as last time: nothing to record
        else:
            result.bad.append(entry)
    listed = {str(p) for p in files} | {str(e.path) for e in bad}
    result.gone = [
        p for p, seen in known.items()
        if seen.status != VideoStatus.REMOVED.value and _under(p, roots) and p not in listed and _gone(p)
    ]
    return result
