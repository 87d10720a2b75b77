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


def read_windows(directory: Path) -> Windows | None:
    """The recorded windows; None when the index records none."""
    path = Path(directory) / WINDOWS_FILE
    try:
        data = json.loads(path.read_text())
        return Windows(float(data["window_s"]), float(data["stride_s"]))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise IndexStoreError(f"{path}: not a windows record ({exc}); delete it to fall back to "
                              "the default windows") from None


def write_windows(directory: Path, windows: Windows) -> None:
    """Record `windows` (atomic: a crash leaves the old record or the new one)."""
    path = Path(directory) / WINDOWS_FILE
    tmp = path.with_name(WINDOWS_FILE + ".tmp")
    with open(tmp, "w") as handle:
        json.dump({"window_s": windows.window_s, "stride_s": windows.stride_s}, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
