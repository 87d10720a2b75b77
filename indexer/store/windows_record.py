"""The windows an index cuts its videos into (pvl_search/media/windows.py), recorded in the
index folder as `windows.json` so later runs add videos cut the same way and `status` and
`search --json` can show them.

A file beside the database rather than a column: an index made before windows were recorded
has none, and it must still open read-only and search (a new column would need a migration,
which only a writer runs). No file: not recorded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from indexer.errors import IndexStoreError
from pvl_search.media.windows import Windows

WINDOWS_FILE = "windows.json"


def _read(directory: Path) -> dict | None:
    path = Path(directory) / WINDOWS_FILE
    try:
        data = json.loads(path.read_text())
        Windows(float(data["window_s"]), float(data["stride_s"]))
        return data
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise IndexStoreError(f"{path}: not a windows record ({exc}); delete it to fall back to "
                              "the default windows") from None


def read_windows(directory: Path) -> Windows | None:
    """The recorded windows; None when the index records none."""
    data = _read(directory)
    if data is None:
        return None
    # An index recorded before shot windows existed has none.
    return Windows(float(data["window_s"]), float(data["stride_s"]), bool(data.get("shots", False)))


def reindex_pending(directory: Path) -> bool:
    """Whether a `--reindex` to the recorded windows began and has not finished: until it has,
    some videos may still be cut the old way, so the next run cuts them all again."""
    data = _read(directory)
    return bool(data and data.get("reindex_pending"))


def write_windows(directory: Path, windows: Windows, *, reindex_pending: bool = False) -> None:
    """Record `windows`, and whether a re-cut to them is under way (atomic: a crash leaves the
    old record or the new one)."""
    path = Path(directory) / WINDOWS_FILE
    tmp = path.with_name(WINDOWS_FILE + ".tmp")
    record = {"window_s": windows.window_s, "stride_s": windows.stride_s, "shots": windows.shots}
    if reindex_pending:
        record["reindex_pending"] = True
    with open(tmp, "w") as handle:
        json.dump(record, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
