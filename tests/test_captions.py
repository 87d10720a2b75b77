"""Caption readers and writer on small hand-written files in each supported format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pvl_search.data.captions import CaptionRecord, load_captions, write_captions


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")  # the readers only locate videos; they never decode them
    return path


def test_write_then_load_round_trips_with_relative_paths(tmp_path: Path) -> None:
    records = [
        CaptionRecord("a", touch(tmp_path / "videos" / "a.mp4"), "train", ["a red circle moves left"], {"k": [1, 2]}),
        CaptionRecord("b", touch(tmp_path / "videos" / "sub" / "b.mp4"), "test", ["x", "y"], {}),
    ]
    out = tmp_path / "captions.json"
    write_captions(out, records, extra={"generator": {"seed": 3}})
    doc = json.loads(out.read_text())
    assert doc["generator"] == {"seed": 3} and doc["videos"][1]["path"] == "videos/sub/b.mp4"
    assert load_captions(out, check_files=True) == records
    moved = tmp_path / "moved"
    (tmp_path / "videos").rename(tmp_path / "moved_videos")
    moved.mkdir()
    (tmp_path / "moved_videos").rename(moved / "videos")
    out.rename(moved / "captions.json")
    assert [r.path for r in load_captions(moved / "captions.json")] == [moved / "videos" / "a.mp4",
                                                                         moved / "videos" / "sub" / "b.mp4"]


def test_empty_corpus_round_trips(tmp_path: Path) -> None:
    write_captions(tmp_path / "c.json", [])
    assert load_captions(tmp_path / "c.json") == []


def test_msrvtt_json(tmp_path: Path) -> None:
    touch(tmp_path / "video" / "video0.mp4")
    touch(tmp_path / "TestVideo" / "video7010.mp4")
    doc = {
        "info": {"year": 2016},
        "videos": [
            {"category": 9, "url": "https://www.youtube.com/watch?v=x", "video_id": "video0", "start time": 137.72,
             "end time": 149.44, "split": "train", "id": 0},
            {"category": 3, "video_id": "video7010", "split": "test", "id": 7010},
            {"category": 1, "video_id": "video500", "split": "validate", "id": 500},
        ],
        "sentences": [
            {"caption": "a car is shown", "video_id": "video0", "sen_id": 0},
            {"caption": "a man drives a car", "video_id": "video0", "sen_id": 1},
            {"caption": "people are dancing", "video_id": "video7010", "sen_id": 2},
        ],
    }
    (tmp_path / "train_val_test.json").write_text(json.dumps(doc))
    records = load_captions(tmp_path / "train_val_test.json")
    assert [(r.video_id, r.split, r.captions) for r in records] == [
        ("video0", "train", ["a car is shown", "a man drives a car"]),
        ("video7010", "test", ["people are dancing"]),
        ("video500", "val", []),
    ]
    assert records[0].path == tmp_path / "video" / "video0.mp4"
    assert records[1].path == tmp_path / "TestVideo" / "video7010.mp4"  # found in a usual subfolder
    assert records[2].path == tmp_path / "video" / "video500.mp4"  # not downloaded: the default place
    assert records[0].meta["start time"] == 137.72 and records[0].meta["category"] == 9
    with pytest.raises(ValueError, match=r"train_val_test\.json: 1 video file\(s\) not found, first 'video500'"):
        load_captions(tmp_path / "train_val_test.json", check_files=True)


def test_webvid_csv(tmp_path: Path) -> None:
    touch(tmp_path / "videos" / "000001_000050" / "1066674461.mp4")
    (tmp_path / "results_2M_val.csv").write_text(
        "videoid,contentUrl,duration,page_dir,name\n"
        '1066674461,https://example.org/1.mp4,PT00H00M15S,000001_000050,"Aerial shot of a lake, at dawn"\n'
        "31353427,https://example.org/2.mp4,PT00H00M22S,000001_000050,Boats in a harbour\n",
        encoding="utf-8",
    )
    records = load_captions(tmp_path / "results_2M_val.csv", default_split="val")
    assert [(r.video_id, r.captions, r.split) for r in records] == [
        ("1066674461", ["Aerial shot of a lake, at dawn"], "val"), ("31353427", ["Boats in a harbour"], "val")]
    assert records[0].path == tmp_path / "videos" / "000001_000050" / "1066674461.mp4"
    assert records[0].meta == {"contenturl": "https://example.org/1.mp4", "duration": "PT00H00M15S",
                               "page_dir": "000001_000050"}


def test_simple_path_caption_csv(tmp_path: Path) -> None:
    (tmp_path / "captions.csv").write_text(
        "path,caption,split\nclips/a.mp4,a dog runs,train\nclips/a.mp4,a dog is running,train\n"
        "/abs/b.mp4,snow falls,test\n", encoding="utf-8")
    records = load_captions(tmp_path / "captions.csv")
    assert [(r.video_id, r.path, r.split, r.captions) for r in records] == [
        ("clips/a.mp4", tmp_path / "clips" / "a.mp4", "train", ["a dog runs", "a dog is running"]),
        ("/abs/b.mp4", Path("/abs/b.mp4"), "test", ["snow falls"]),
    ]


def test_msrvtt_style_csv_finds_videos(tmp_path: Path) -> None:
    touch(tmp_path / "videos" / "all" / "video9770.mp4")
    (tmp_path / "MSRVTT_JSFUSION_test.csv").write_text(
        "key,vid_key,video_id,sentence\nret0,msr9770,video9770,a person is connecting something to a system\n")
    (record,) = load_captions(tmp_path / "MSRVTT_JSFUSION_test.csv", check_files=True)
    assert record.path == tmp_path / "videos" / "all" / "video9770.mp4" and record.split == "test"


VALID_VIDEO = {"video_id": "v", "path": "v.mp4", "split": "train", "captions": ["c"]}


@pytest.mark.parametrize("name, content, problem", [
    ("c.json", "{not json", "not valid JSON"),
    ("c.json", "[1, 2]", "'videos' list"),
    ("c.json", json.dumps({"videos": [{"path": "v.mp4", "captions": []}]}), r"videos\[0\] needs a str 'video_id'"),
    ("c.json", json.dumps({"videos": [VALID_VIDEO | {"captions": "c"}]}), "list of strings"),
    ("c.json", json.dumps({"videos": [VALID_VIDEO | {"split": "dev"}]}), "unknown split 'dev'"),
    ("c.json", json.dumps({"videos": [VALID_VIDEO, VALID_VIDEO]}), "'v' is listed twice"),
    ("c.json", json.dumps({"videos": [VALID_VIDEO | {"meta": 3}]}), "'meta' that is not an object"),
    ("c.json", json.dumps({"videos": [{"video_id": "v"}], "sentences": [{"video_id": "w", "caption": "x"}]}),
     r"sentences\[0\] refers to video_id 'w'"),
    ("c.json", json.dumps({"videos": [{"video_id": "v"}], "sentences": [{"video_id": "v"}]}), "str 'caption'"),
    ("c.csv", "file,text\na.mp4,x\n", "CSV header needs a caption column"),
    ("c.csv", "path,caption\na.mp4,\n", "line 2 is missing its caption"),
    ("c.txt", "a.mp4 a caption\n", "unsupported caption file type"),
])
def test_malformed_files_name_the_file_and_the_problem(tmp_path: Path, name: str, content: str, problem: str) -> None:
    (tmp_path / name).write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=problem) as info:
        load_captions(tmp_path / name)
    assert str(info.value).startswith(str(tmp_path / name))


def test_missing_file_bad_encoding_and_bad_split_argument(tmp_path: Path) -> None:
    (tmp_path / "latin1.csv").write_bytes("path,caption\na.mp4,caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.csv: not UTF-8 text"):
        load_captions(tmp_path / "latin1.csv")
    with pytest.raises(ValueError, match="no such caption file"):
        load_captions(tmp_path / "absent.json")
    with pytest.raises(ValueError, match="default_split"):
        load_captions(tmp_path / "absent.json", default_split="dev")
    with pytest.raises(ValueError, match="split 'dev'"):
        write_captions(tmp_path / "c.json", [CaptionRecord("v", tmp_path / "v.mp4", "dev", [], {})])


def test_msrvtt_video_caption_csv(tmp_path: Path) -> None:
    """MSR-VTT's plain `video,caption` CSV: the `video` column is the id, files found under video/."""
    touch(tmp_path / "video" / "video7010.mp4")
    touch(tmp_path / "video" / "video7011.mp4")
    (tmp_path / "msrvtt.csv").write_text(
        "video,caption\nvideo7010,a man is talking\nvideo7011,a dog runs\nvideo7010,someone speaks\n")
    first, second = load_captions(tmp_path / "msrvtt.csv", check_files=True)
    assert (first.video_id, first.captions, first.meta) == ("video7010", ["a man is talking", "someone speaks"], {})
    assert first.path == tmp_path / "video" / "video7010.mp4" and first.split == "test"
    assert second.path == tmp_path / "video" / "video7011.mp4"
