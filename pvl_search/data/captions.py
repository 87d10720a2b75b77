"""Caption files: one in-memory model, three on-disk formats.

- pvl-search JSON (what `synth.generate_corpus` and `write_captions` write):
  {"videos": [{"video_id", "path" (relative to the JSON file), "split", "captions": [...], "meta": {...}}]}
  plus any extra top-level keys, which readers ignore.
- MSR-VTT JSON: {"videos": [{"video_id", "split", ...}], "sentences": [{"video_id", "caption"}]}; the video
  files are looked up next to the JSON (video/<id>.mp4 and the other usual folders).
- CSV with a header: WebVid (videoid, name, page_dir), or a simple caption file (path, caption) or
  (video_id|video, caption|sentence), e.g. MSR-VTT's `video,caption`. Several rows for one video
  give one record with several captions.

Every problem with a file is a ValueError whose message starts with the file's path, so the CLI
can show it as one line.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SPLITS = ("train", "val", "test")
_SPLIT_ALIASES = {"train": "train", "val": "val", "valid": "val", "validate": "val", "validation": "val",
                  "test": "test"}
_VIDEO_EXTENSIONS = (".mp4", ".avi", ".webm", ".mkv", ".mov")
# Where MSR-VTT-style downloads keep their videos, relative to the caption file.
_VIDEO_DIRS = ("video", "videos", "videos/all", "TrainValVideo", "TestVideo", "MSRVTT/videos/all", "all", ".")
_CAPTION_COLUMNS = ("caption", "name", "sentence", "text")
_ID_COLUMNS = ("video_id", "videoid", "video")  # "video": MSR-VTT's video,caption CSV


@dataclass
class CaptionRecord:
    video_id: str
    path: Path  # absolute path of the video file (it may not exist unless check_files was asked for)
    split: str  # train | val | test
    captions: list[str]
    meta: dict[str, Any] = field(default_factory=dict)


def load_captions(path: str | os.PathLike[str], *, default_split: str = "test",
                  check_files: bool = False) -> list[CaptionRecord]:
    """Read any supported caption file; files that carry no split give every video `default_split`.

    check_files=True also fails when a listed video file does not exist (useful before indexing;
    off by default because partial downloads of MSR-VTT are common)."""
    path = Path(path).absolute()
    if default_split not in SPLITS:
        raise ValueError(f"default_split must be one of {SPLITS}, got {default_split!r}")
    if not path.is_file():
        raise ValueError(f"{path}: no such caption file")
    if path.suffix.lower() == ".json":
        records = _load_json(path, default_split)
    elif path.suffix.lower() == ".csv":
        records = _load_csv(path, default_split)
    else:
        raise ValueError(f"{path}: unsupported caption file type {path.suffix!r} (expected .json or .csv)")
    if check_files:
        missing = [r for r in records if not r.path.is_file()]
        if missing:
            raise ValueError(f"{path}: {len(missing)} video file(s) not found, first {missing[0].video_id!r} "
                             f"at {missing[0].path}")
    return records


def write_captions(path: str | os.PathLike[str], records: Iterable[CaptionRecord], *,
                   extra: Mapping[str, Any] | None = None) -> None:
    """Write records as pvl-search JSON, paths relative to the file so the folder can move.

    `extra` adds top-level keys (e.g. generator settings) ahead of "videos". Written to a
    temporary name and renamed, so readers never see half a file."""
    path = Path(path).absolute()
    base = path.parent
    videos = []
    for r in records:
        if r.split not in SPLITS:
            raise ValueError(f"{path}: video {r.video_id!r} has split {r.split!r}, expected one of {SPLITS}")
        videos.append({"video_id": r.video_id, "path": Path(os.path.relpath(Path(r.path).absolute(), base)).as_posix(),
                       "split": r.split, "captions": list(r.captions), "meta": r.meta})
    # One video per line: greppable, diffable, and still one plain JSON document.
    head = "".join(f"{json.dumps(k)}: {_compact(v)},\n" for k, v in (extra or {}).items() if k != "videos")
    body = ",\n".join(_compact(v) for v in videos)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"{{{head}\"videos\": [\n{body}\n]}}\n", encoding="utf-8")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------- JSON


def _compact(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(", ", ": "))


def _load_json(path: Path, default_split: str) -> list[CaptionRecord]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("videos"), list):
        raise ValueError(f"{path}: expected a JSON object with a 'videos' list")
    if "sentences" in doc:
        return _load_msrvtt(path, doc, default_split)
    return _load_ours(path, doc["videos"], default_split)


def _require(path: Path, where: str, entry: Mapping[str, Any], key: str, kind: type) -> Any:
    value = entry.get(key)
    if not isinstance(value, kind) or (kind is str and not value):
        raise ValueError(f"{path}: {where} needs a {kind.__name__} '{key}', got {value!r}")
    return value


def _split(path: Path, where: str, value: Any, default_split: str) -> str:
    if value is None:
        return default_split
    split = _SPLIT_ALIASES.get(str(value).strip().lower())
    if split is None:
        raise ValueError(f"{path}: {where} has unknown split {value!r} (expected train, val or test)")
    return split


def _entry(path: Path, i: int, entry: Any) -> Mapping[str, Any]:
    if not isinstance(entry, dict):
        raise ValueError(f"{path}: videos[{i}] is not an object")
    return entry


def _load_ours(path: Path, videos: list[Any], default_split: str) -> list[CaptionRecord]:
    records: list[CaptionRecord] = []
    for i, raw in enumerate(videos):
        entry, where = _entry(path, i, raw), f"videos[{i}]"
        video_id = _require(path, where, entry, "video_id", str)
        rel = _require(path, where, entry, "path", str)
        captions = entry.get("captions")
        if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
            raise ValueError(f"{path}: {where} ({video_id}) needs 'captions' as a list of strings")
        meta = entry.get("meta", {})
        if not isinstance(meta, dict):
            raise ValueError(f"{path}: {where} ({video_id}) has a 'meta' that is not an object")
        split = _split(path, where, entry.get("split"), default_split)
        records.append(CaptionRecord(video_id, _resolve(path.parent, rel), split, captions, meta))
    _check_unique(path, records)
    return records


def _load_msrvtt(path: Path, doc: Mapping[str, Any], default_split: str) -> list[CaptionRecord]:
    if not isinstance(doc["sentences"], list):
        raise ValueError(f"{path}: 'sentences' must be a list")
    finder = _VideoFinder(path.parent)
    records: dict[str, CaptionRecord] = {}
    for i, raw in enumerate(doc["videos"]):
        entry, where = _entry(path, i, raw), f"videos[{i}]"
        video_id = _require(path, where, entry, "video_id", str)
        if video_id in records:
            raise ValueError(f"{path}: video_id {video_id!r} is listed twice")
        meta = {k: v for k, v in entry.items() if k not in ("video_id", "split")}
        records[video_id] = CaptionRecord(video_id, finder.find(video_id), _split(path, where, entry.get("split"),
                                          default_split), [], meta)
    for i, raw in enumerate(doc["sentences"]):
        where = f"sentences[{i}]"
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: {where} is not an object")
        video_id = _require(path, where, raw, "video_id", str)
        text = _require(path, where, raw, "caption", str)
        if video_id not in records:
            raise ValueError(f"{path}: {where} refers to video_id {video_id!r}, which 'videos' does not list")
        records[video_id].captions.append(text)
    return list(records.values())


# ----------------------------------------------------------------------------------- CSV


def _load_csv(path: Path, default_split: str) -> list[CaptionRecord]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = {(c or "").strip().lower(): c for c in reader.fieldnames or []}
            rows = list(reader)
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text") from None
    except csv.Error as e:
        raise ValueError(f"{path}: malformed CSV ({e})") from None
    caption_col = next((columns[c] for c in _CAPTION_COLUMNS if c in columns), None)
    id_col = next((columns[c] for c in _ID_COLUMNS if c in columns), None)
    path_col, page_col, split_col = columns.get("path"), columns.get("page_dir"), columns.get("split")
    if caption_col is None or (id_col is None and path_col is None):
        raise ValueError(f"{path}: CSV header needs a caption column ({', '.join(_CAPTION_COLUMNS)}) and "
                         f"'path' or 'videoid'/'video_id'/'video'; found {sorted(columns)}")
    finder = _VideoFinder(path.parent)
    records: dict[str, CaptionRecord] = {}
    for line, row in enumerate(rows, start=2):
        text = (row.get(caption_col) or "").strip()
        key = (row.get(path_col) if path_col else row.get(id_col)) or ""
        if not text or not key.strip():
            raise ValueError(f"{path}: line {line} is missing its caption or video")
        video_id = (row.get(id_col) or "").strip() if id_col else key.strip()
        if video_id not in records:
            if path_col:
                video = _resolve(path.parent, key.strip())
            elif page_col:
                video = _webvid_path(path.parent, (row.get(page_col) or "").strip(), video_id)
            else:
                video = finder.find(video_id)
            split = _split(path, f"line {line}", row.get(split_col) if split_col else None, default_split)
            records[video_id] = CaptionRecord(video_id, video, split, [], _csv_meta(row, columns))
        records[video_id].captions.append(text)
    return list(records.values())


def _csv_meta(row: Mapping[str, Any], columns: Mapping[str, str]) -> dict[str, Any]:
    used = set(_CAPTION_COLUMNS) | set(_ID_COLUMNS) | {"path", "split"}
    return {name: row[col] for name, col in columns.items() if name not in used and row.get(col) not in (None, "")}


def _webvid_path(base: Path, page_dir: str, video_id: str) -> Path:
    candidates = [base / "videos" / page_dir / f"{video_id}.mp4", base / page_dir / f"{video_id}.mp4",
                  base / "videos" / f"{video_id}.mp4", base / f"{video_id}.mp4"]
    return next((c for c in candidates if c.is_file()), candidates[0])


# --------------------------------------------------------------------------------- paths


def _resolve(base: Path, rel: str) -> Path:
    return Path(os.path.normpath(base / rel))


def _check_unique(path: Path, records: list[CaptionRecord]) -> None:
    seen: set[str] = set()
    for r in records:
        if r.video_id in seen:
            raise ValueError(f"{path}: video_id {r.video_id!r} is listed twice")
        seen.add(r.video_id)


class _VideoFinder:
    """Finds <id>.<ext> in the usual download folders, listing each folder once (not per video)."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self._index: dict[str, Path] | None = None

    def find(self, video_id: str) -> Path:
        if self._index is None:
            self._index = {}
            for sub in _VIDEO_DIRS:
                folder = self.base / sub
                if not folder.is_dir():
                    continue
                for entry in sorted(os.scandir(folder), key=lambda e: e.name):
                    stem, ext = os.path.splitext(entry.name)
                    if ext.lower() in _VIDEO_EXTENSIONS and entry.is_file():
                        self._index.setdefault(stem, Path(os.path.normpath(entry.path)))
        return self._index.get(video_id, Path(os.path.normpath(self.base / "video" / f"{video_id}.mp4")))
