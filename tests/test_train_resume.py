"""`pvl-search train` SIGKILLed mid-run and started again with --resume ends where an
uninterrupted run ends, bit for bit, with the same log; a resume with changed options is refused."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from index_helpers import pvl_search, run_and_sigkill
from safetensors.torch import load_file

from pvl_search.data.synth import generate_corpus

STEPS = 9  # 12 training videos, batches of 4, 3 epochs


def train_command(captions: Path, out: Path, *extra: str) -> list[str]:
    # Every option a long run uses that a small corpus allows: twin batches from epoch 2,
    # the attribute curriculum, order heads, dense patch labels, the latent reranker, probes.
    return [pvl_search(), "train", "--captions", str(captions), "--out", str(out), "--epochs", "3",
            "--batch-size", "4", "--warmup", "2", "--checkpoint-every", "2", "--lr", "1e-3",
            "--mixed-nce", "1", "--latent-reranker", "--latent-nce", "1", "--attributes", "1",
            "--order-attributes", "1", "--token-attributes", "1", "--retrieval-from", "2",
            "--group-batches-from", "2", "--probe-videos", "8", "--json", *extra]


def logged_steps(out: Path) -> int:
    try:
        lines = (out / "log.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    return max([json.loads(line)["step"] for line in lines if '"kind": "step"' in line], default=0)


def log_records(out: Path) -> list[dict]:
    """log.jsonl without the timings (they differ between any two runs)."""
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("samples_per_s", "seconds")} for r in records]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


@pytest.mark.slow
def test_train_killed_mid_run_resumes_to_the_same_weights(tmp_path: Path) -> None:
    generate_corpus(tmp_path / "corpus", 24, seed=5, size=64, fps=8, seconds=1.5, workers=1,
                    splits=(0.5, 0.5, 0.0))
    captions = tmp_path / "corpus" / "captions.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same thread count in every run
    straight, split = tmp_path / "straight", tmp_path / "split"
    done = subprocess.run(train_command(captions, straight), env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr

    # Killed past the step-2 checkpoint, mid-way through the run.
    run_and_sigkill(train_command(captions, split), ready=lambda: logged_steps(split) >= 3,
                    log=tmp_path / "killed.log", waiting_for="third training step", seconds=300, env=env)
    assert logged_steps(split) < STEPS, "the kill did not land mid-run"

    resumed = subprocess.run(train_command(captions, split, "--resume"), env=env, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert 2 <= summary["resumed_at"] < STEPS and summary["steps"] == STEPS
    for name in ("last", "best"):
        a, b = weights(straight / name), weights(split / name)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}: {key}"
    # The log reads as the uninterrupted run's: no step or validation is repeated or lost.
    assert log_records(split) == log_records(straight)
    record = json.loads((split / "run.json").read_text())
    assert len(record["resumed"]) == 1 and record["started"]  # the first start is kept

    again = subprocess.run(train_command(captions, split), env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode != 0 and "already holds a training run" in again.stderr
    assert log_records(split) == log_records(straight)  # refused before it touched anything

    changed = subprocess.run(train_command(captions, split, "--resume", "--lr", "5e-4"), env=env,
                             capture_output=True, text=True, timeout=600)
    assert changed.returncode != 0
    message = changed.stderr.strip().splitlines()[-1]
    assert "--resume" in message and "train.lr was 0.001, now 0.0005" in message
