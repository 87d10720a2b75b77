"""The README's main command: `pvl-search demo` with the shipped model, end to end."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from pvl_search.model.checkpoint import load_model
from pvl_search.model.defaults import DEFAULT_MODEL_DIR


def test_shipped_model_loads_and_has_its_card() -> None:
    model = load_model(DEFAULT_MODEL_DIR)
    assert model.config.frame_size == 64 and (Path(DEFAULT_MODEL_DIR) / "MODEL_CARD.md").is_file()


def test_demo_runs_end_to_end(tmp_path) -> None:
    """A real subprocess, as a user runs it: corpus, index, queries, evaluation table."""
    proc = subprocess.run([sys.executable, "-m", "cli", "demo", "--n", "8", "--out", str(tmp_path / "demo")],
                          capture_output=True, text=True, timeout=600, cwd=Path(__file__).parent.parent)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "4/4 evaluating" in proc.stderr
    for method in ("multi", "mixed", "single"):
        assert method in proc.stdout
    assert (tmp_path / "demo" / "index").is_dir()
    assert len(list((tmp_path / "demo" / "corpus" / "videos").iterdir())) == 8
