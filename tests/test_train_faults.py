"""`pvl-search train` on broken input says what is wrong in one line and exits nonzero: a resume
whose checkpoint is cut short or absent, and a captions file none of whose videos exist."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from index_helpers import pvl_search

from pvl_search.data.synth import generate_corpus

# A run killed before its first checkpoint: a fresh start into its folder must not keep this.
STALE_STEP = {"kind": "step", "step": 7, "epoch": 0, "loss": 9.0}


def train_command(captions: Path, out: Path, *extra: str) -> list[str]:
    return [pvl_search(), "train", "--captions", str(captions), "--out", str(out), "--epochs", "1",
            "--batch-size", "4", "--warmup", "1", "--json", *extra]


def pvl(command: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def one_line_error(done: subprocess.CompletedProcess) -> str:
    """The error line of a refused command, after checking it is the only thing said."""
    assert done.returncode != 0, done.stdout
    assert "Traceback" not in done.stderr, done.stderr
    lines = [line for line in done.stderr.splitlines() if "━" not in line]  # progress bars aside
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(captions file, run folder) of one real, finished tiny run: 8 training videos, 2 steps."""
    root = tmp_path_factory.mktemp("faults")
    generate_corpus(root / "corpus", 16, seed=5, size=64, fps=8, seconds=1.5, workers=1, splits=(0.5, 0.5, 0.0))
    captions, run = root / "corpus" / "captions.json", root / "run"
    run.mkdir()
    (run / "log.jsonl").write_text(json.dumps(STALE_STEP) + "\n")
    done = pvl(train_command(captions, run))
    assert done.returncode == 0, done.stderr
    return captions, run


def test_a_fresh_run_starts_its_log_afresh(trained: tuple[Path, Path]) -> None:
    _, run = trained
    steps = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "step"]
    assert [s["step"] for s in steps] == [1, 2]


# Cut to nothing ("header too small") and inside the header ("invalid header length").
@pytest.mark.parametrize(("name", "size"), [("train_state.safetensors", 50), ("model.safetensors", 0)])
def test_resume_from_a_truncated_checkpoint_names_the_file(
    trained: tuple[Path, Path], tmp_path: Path, name: str, size: int
) -> None:
    captions, finished = trained
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    os.truncate(run / "last" / name, size)
    record = (run / "run.json").read_text()

    line = one_line_error(pvl(train_command(captions, run, "--resume")))
    assert f"{run / 'last' / name}: not a readable safetensors file" in line
    assert "cannot be resumed" in line and f"--init model:{run / 'best'}" in line  # what is left to start from
    assert (run / "run.json").read_text() == record  # refused before it touched anything
    # A fresh start into the folder is refused as before: it would overwrite the run.
    again = one_line_error(pvl(train_command(captions, run)))
    assert "already holds a training run" in again


def test_resume_with_no_checkpoint_is_an_error(trained: tuple[Path, Path], tmp_path: Path) -> None:
    captions, _ = trained
    run = tmp_path / "never-started"
    line = one_line_error(pvl(train_command(captions, run, "--resume")))
    assert "nothing to resume" in line and "leave out --resume" in line
    assert str(run / "last" / "train_state.safetensors") in line
    assert not run.exists()


def test_captions_none_of_whose_videos_exist_are_named(trained: tuple[Path, Path], tmp_path: Path) -> None:
    captions, _ = trained
    moved = tmp_path / "moved" / "captions.json"  # its relative video paths now point nowhere
    moved.parent.mkdir()
    shutil.copy(captions, moved)
    train_videos = [v for v in json.loads(captions.read_text())["videos"] if v["split"] == "train"]

    line = one_line_error(pvl(train_command(moved, tmp_path / "run")))
    assert f"none of the {len(train_videos)} train videos exist" in line
    assert str(moved.parent / train_videos[0]["path"]) in line
    assert f"and {len(train_videos) - 3} more not found" in line
    assert f"looked up from its folder {moved.parent}" in line


def test_a_truncated_safetensors_file_is_a_checkpoint_error(trained: tuple[Path, Path], tmp_path: Path) -> None:
    """The one reader behind model folders, training state and the joint reranker's resume."""
    from pvl_search.model.checkpoint import CheckpointError, load_model, read_safetensors

    _, run = trained
    model = tmp_path / "model"
    shutil.copytree(run / "best", model)
    assert read_safetensors(model / "model.safetensors", header_only=True)[1]["pvl_search"] == "1"
    os.truncate(model / "model.safetensors", 5000)
    for load in (lambda: read_safetensors(model / "model.safetensors"), lambda: load_model(model)):
        with pytest.raises(CheckpointError, match="model.safetensors: not a readable safetensors file"):
            load()
    with pytest.raises(CheckpointError, match="nothing.safetensors: missing"):
        read_safetensors(tmp_path / "nothing.safetensors")
