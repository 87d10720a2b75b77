"""Which windows an indexing run cuts videos into: the rule, in one place.

- Asked for (`--window` / `--stride`): those. Only `--window`: its stride follows the model's
  share of the window (pvl_search/media/windows.py).
- Not asked for: what the index records (windows.json); an index that holds videos but records
  none was made before windows were recorded, with the legacy 10 s / 5 s unless its maker said
  otherwise, so new videos get those too; a new index gets the model's own windows (its
  clip length, clip.json).
- Windows other than the recorded ones would leave the index cut two ways, so they need
  `--reindex`, which cuts every video again. Nothing is ever re-cut without it: the run's
  summary offers it when the index is not on the model's windows.
"""

from __future__ import annotations

from pvl_search.media.windows import (
    LEGACY_STRIDE_S,
    LEGACY_WINDOW_S,
    STRIDE_FRACTION,
    Windows,
    model_windows,
)


def choose_windows(
    window_s: float | None,
    stride_s: float | None,
    *,
    recorded: Windows | None,
    holds_videos: bool,
    clip_s: float | None,
    reindex: bool,
    shots: bool | None = None,
) -> Windows:
    """The run's windows (see the module doc); ValueError when they would mix two cuttings."""
    if window_s is not None and window_s <= 0 or stride_s is not None and stride_s <= 0:
        raise ValueError(f"--window and --stride must be positive seconds, got {window_s}, {stride_s}")
    current = recorded or (Windows(LEGACY_WINDOW_S, LEGACY_STRIDE_S) if holds_videos else None)
    base = model_windows(clip_s) if reindex or current is None else current
    if window_s is None and stride_s is None and shots is None:
        return base
    window = window_s if window_s is not None else base.window_s
    stride = stride_s if stride_s is not None else (
        round(window * STRIDE_FRACTION, 3) if window_s is not None else base.stride_s)
    chosen = Windows(float(window), float(stride), base.shots if shots is None else shots)
    if holds_videos and not reindex and recorded is not None and chosen != recorded:
        raise ValueError(
            f"this index cuts videos into {_describe(recorded)}; {_describe(chosen)} for new videos would mix "
            "two cuttings: add --reindex to cut every video again, or leave out --window/--stride/--shots")
    return chosen


def _describe(windows: Windows) -> str:
    shots = " and one per shot" if windows.shots else ""
    return f"{windows.window_s:g} s windows every {windows.stride_s:g} s{shots}"


def reindex_hint(current: Windows, clip_s: float | None) -> str | None:
    """A one-line offer to re-cut an index whose windows are not the model's; None when they are."""
    wanted = model_windows(clip_s)
    if clip_s is None or current == wanted:
        return None
    return (f"this index cuts videos into {_describe(current)}; this model's own are {_describe(wanted)} "
            "(moments land closer): `--reindex` cuts every video again")
