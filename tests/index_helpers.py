"""What several test files share: a small model config, real test videos, reading an index
back the way a searcher would, and the installed command."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select

from indexer.encoding import ModelRunner
from indexer.ingest.pipeline import IndexOptions, build_index
from indexer.store.base import StoreBase
from indexer.store.index_reader import IndexReader
from indexer.store.index_store import IndexStore
from indexer.store.records import EMBEDDINGS_FILE, RERANK_FILE, IndexStats
from indexer.store.row_store import HEADER_SIZE
from indexer.store.schema import Video
from pvl_search.media.sample_files import write_video
from pvl_search.model.config import preset


def ids_of(store: StoreBase, prefix: str) -> list[int]:
    """Live segment ids of the videos whose path starts with `prefix`, ascending."""
    info = store.segments(store.segment_ids())
    return sorted(i for i, seg in info.items() if seg.path.startswith(prefix))


# Small enough that encoding is instant; the pipeline does not care about the size.
CONFIG = preset("tiny").replace(
    hidden=64, heads=4, latents=8, blocks=1, self_layers=1, frame_size=32, patch=8, frames=4,
    token_dim=16, embed_dim=32,
)


def pattern(seed: int):  # noqa: ANN201 - a media.FrameFn
    """Frames of coloured blocks drawn from `seed`: videos that a model can tell apart."""

    def frame(index: int, width: int, height: int) -> np.ndarray:
        rng = np.random.default_rng(seed * 1000 + index // 2)
        blocks = rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
        return np.ascontiguousarray(blocks.repeat(8, 0).repeat(8, 1)[:height, :width])

    return frame


def video(path: Path, seed: int, seconds: float = 2.0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_video(path, seconds=seconds, frame_fn=pattern(seed))


def disk_rows(folder: Path, name: str, width: int) -> int:
    """Rows in a float16 row store file, from its size on disk."""
    return ((folder / name).stat().st_size - HEADER_SIZE) // (2 * width)


def assert_invariant(folder: Path, db_url: str) -> tuple[IndexStats, dict[str, list[int]]]:
    """Opened read-only, as a searcher would: every FAISS id is a live SQL segment of an
    indexed video with readable store rows, nothing is in FAISS twice, every live segment is
    in FAISS, segment ids are exactly the committed row numbers and the store files hold at
    least those rows. Returns the stats and path -> live segment ids."""
    with IndexReader(folder, db_url) as store:
        stats = store.stats()
        rows = stats.rows
        ids = store.vectors.ids()
        assert len(ids) == len(set(ids.tolist())), "an id is in FAISS twice"
        live = store.segment_ids()
        assert sorted(ids.tolist()) == live.tolist()
        everything = store.segments(np.arange(rows))
        assert sorted(everything) == list(range(rows))  # ids = row numbers, no gap
        known = store.known_videos()
        per_video: dict[str, list[int]] = {}
        for i in ids.tolist():
            segment = everything[i]
            assert not segment.removed and known[segment.path].status == "indexed"
            per_video.setdefault(segment.path, []).append(i)
        if len(ids):
            assert np.isfinite(store.embeddings(ids)).all() and np.isfinite(store.rerank_states(ids)).all()
        assert stats.vectors == stats.segments == len(ids)
        assert stats.segments + stats.removed_segments == rows
        for name, width in ((EMBEDDINGS_FILE, CONFIG.embed_dim), (RERANK_FILE, CONFIG.rerank_state_width)):
            assert disk_rows(folder, name, width) >= rows  # more only while a writer is mid-add
    return stats, {path: sorted(v) for path, v in per_video.items()}


def pvl_search() -> str:
    """The installed console script (next to this interpreter, else on PATH)."""
    beside = Path(sys.executable).parent / "pvl-search"
    found = str(beside) if beside.exists() else shutil.which("pvl-search")
    if not found:
        pytest.fail("the pvl-search command is not installed (pip install -e .)", pytrace=False)
    return found


# -- the installed command and index state (reliability tests) -----------------------------

OPTIONS = IndexOptions(window_s=10.0, stride_s=5.0, batch_size=4, workers=1, timeout_s=30.0)


# As root, permissions bind only a process without these capabilities (how the issue's
# probe made a file unreadable); as another user they bind anyway.
UNPRIVILEGED = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"] if os.geteuid() == 0 else []


TOKEN = "reliability-test-token-0123456789"


def index(folder: Path, paths: list[Path], runner: ModelRunner, db_url: str | None = None):  # noqa: ANN201
    with IndexStore(folder, db_url) as store:
        return build_index(paths, store, runner, OPTIONS)


def cli_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}


def cli(*args: str, prefix: list[str] | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The installed command, as a user runs it."""
    return subprocess.run([*(prefix or []), pvl_search(), *args], capture_output=True, text=True, timeout=600,
                          env=env or cli_env())


def assert_one_error_line(proc: subprocess.CompletedProcess, *words: str) -> str:
    """Exit code 1 and exactly one line on stderr, `error: ...`, naming what failed."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def index_state(folder: Path, db_url: str | None = None) -> tuple:
    """Everything a rerun must leave as it was: per-video rows, counts and the stored rows."""
    with IndexReader(folder, db_url) as store:
        stats = store.stats()
        ids = store.segment_ids()
        with store.db.sessions() as s:
            videos = s.execute(select(Video.id, Video.path, Video.path_bytes, Video.status, Video.error,
                                      Video.size, Video.mtime, Video.fingerprint).order_by(Video.id)).all()
        return ([tuple(v) for v in videos], stats.videos, stats.rows, stats.segments, ids.tolist(),
                store.embeddings(ids).tobytes() if len(ids) else b"")


def stop_process(proc: subprocess.Popen, timeout: float = 10) -> None:
    """Terminate a server process; kill it if it does not stop within `timeout` seconds."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def wait_until_stopped(proc: subprocess.Popen, log: Path, stage: str, timeout_s: float = 120) -> None:
    """Wait for a child that stops itself (SIGSTOP) at a PVL_TEST_PAUSE_AT `stage`; fail the
    test if it never gets there or ends first (its stderr, in `log`, says why)."""
    deadline, status = time.monotonic() + timeout_s, 0
    while time.monotonic() < deadline:
        pid, status = os.waitpid(proc.pid, os.WNOHANG | os.WUNTRACED)
        if pid:
            break
        time.sleep(0.02)
    else:
        proc.kill()
        pytest.fail(f"child never reached {stage}")
    assert os.WIFSTOPPED(status), f"child ended before {stage}:\n{log.read_text()}"


def run_and_sigkill(command: list[str], *, ready: Callable[[], bool], log: Path, waiting_for: str,
                    seconds: float = 180, cwd: Path | None = None, env: dict | None = None) -> None:
    """Start `command` (stderr to `log`) and SIGKILL it as soon as `ready()` holds: the crash,
    wherever the run happens to be. Fails the test when the command ends first, or when
    `waiting_for` has not happened in `seconds`."""
    with open(log, "wb") as err:
        proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + seconds
        while not ready():
            if proc.poll() is not None:
                pytest.fail(f"pvl-search {command[1]} ended (rc {proc.returncode}) before it could be killed:\n"
                            f"{log.read_text()}")
            if time.monotonic() > deadline:
                pytest.fail(f"no {waiting_for} in {seconds:.0f} s:\n{log.read_text()}")
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
