"""Issue #27 (8, 11, 12): what `pvl-search index` says, and what it keeps off the terminal.
Real `pvl-search index` subprocesses, a real local Ray, real encoded (and damaged) videos.

- `--ray auto` with no cluster, `--ray ray://` at a port nobody answers, and a local Ray that
  cannot start each end in one `error:` line of pvl-search's own (exit code 1): no Ray advice
  about flags pvl-search does not have, no Ray warning, and the log folder of a local start
  that failed after its one retry.
- FFmpeg's warnings about a damaged h264 stream go to the index folder's decoder.log, counted,
  not through the progress bar; the file is indexed (exit code 0), locally and on Ray.
- The progress callback moves while one long video is decoded and encoded.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
from pathlib import Path

import numpy as np
import pytest
from index_helpers import pattern, pvl_search, video

from indexer.encoding import ModelRunner
from indexer.ingest.pipeline import IndexOptions, IndexProgress, build_index
from indexer.store.index_store import IndexStore
from pvl_search.media.sample_files import write_video

DECODER_LOG = "decoder.log"  # in the index folder; the summary names it
FFMPEG_NOISE = ("[h264 @", "error while decoding", "decode_slice_header")
RAY_NOISE = ("Token authentication", "UserWarning", "warnings.warn", "--address", "RAY_ADDRESS")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def damaged_h264(path: Path) -> Path:
    """A real h264 mp4 with bytes overwritten in the middle of its frames: FFmpeg decodes it,
    complaining on stderr ("error while decoding MB ...")."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_video(path, width=160, height=120, fps=8, seconds=8, gop=8, frame_fn=pattern(3))
    data = bytearray(path.read_bytes())
    rng = np.random.default_rng(0)
    for share in (0.3, 0.5, 0.7):  # the index (moov) is at the end: these land in frame data
        at = int(len(data) * share)
        data[at : at + 64] = rng.integers(0, 256, 64, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))
    return path


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("media")
    damaged_h264(folder / "damaged.mp4")
    video(folder / "clean.mp4", 1)
    return folder


def index(media: Path, folder: Path, model_dir: Path, *extra: str, env: dict | None = None,
          prefix: list[str] | None = None) -> subprocess.CompletedProcess:
    """`pvl-search index` as a user runs it, stdout and stderr apart."""
    command = [*(prefix or []), pvl_search(), "index", str(media), "--index", str(folder), "--model", str(model_dir),
               "--dtype", "float32", "--workers", "1", "--window", "3", "--stride", "3", *extra]
    environment = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    environment.update({"OMP_NUM_THREADS": "1", "COLUMNS": "200", **(env or {})})
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=environment)


def assert_one_error_line(done: subprocess.CompletedProcess, starts: str) -> str:
    """Exit code 1 and nothing on stderr but one `error:` line starting with `starts`."""
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {starts}"), done.stderr
    assert "Traceback" not in done.stderr and not any(n in done.stderr for n in RAY_NOISE), done.stderr
    return lines[0]


# -- Ray messages (8) ------------------------------------------------------------------------


def _alone() -> list[str]:
    """A command prefix that hides this machine's other processes (Ray finds a running
    cluster by looking for its processes), or skips when neither that nor a quiet machine."""
    if shutil.which("unshare") and subprocess.run(["unshare", "-pf", "--mount-proc", "true"]).returncode == 0:
        return ["unshare", "-pf", "--mount-proc"]
    if any("gcs_server" in _comm(pid) for pid in os.listdir("/proc") if pid.isdigit()):
        pytest.skip("a Ray cluster runs on this machine and processes cannot be hidden from the command")
    return []


def _comm(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text()
    except OSError:
        return ""


def test_ray_auto_without_a_cluster(media: Path, tmp_path: Path, model_dir: Path) -> None:
    done = index(media, tmp_path / "idx", model_dir, "--ray", "auto", env={"RAY_TMPDIR": str(tmp_path)},
                 prefix=_alone())
    line = assert_one_error_line(done, "no Ray cluster found for --ray auto")
    assert "ray start --head" in line and "--ray local" in line


def test_ray_client_address_nobody_answers(media: Path, tmp_path: Path, model_dir: Path) -> None:
    address = f"ray://127.0.0.1:{free_port()}"
    done = index(media, tmp_path / "idx", model_dir, "--ray", address)
    assert address in assert_one_error_line(done, f"cannot reach the Ray cluster at {address}")


def test_ray_local_that_cannot_start_names_its_logs(media: Path, tmp_path: Path, model_dir: Path) -> None:
    # A real start that fails: Ray's sockets under this folder pass the 107-byte AF_UNIX limit.
    temp = tmp_path / ("t" * max(1, 100 - len(str(tmp_path))))
    temp.mkdir()
    done = index(media, tmp_path / "idx", model_dir, "--ray", "local", env={"RAY_TMPDIR": str(temp)})
    line = assert_one_error_line(done, "Ray did not start for --ray local")
    sessions = sorted((temp / "ray").glob("session_2*"))
    assert len(sessions) == 2  # tried twice
    logs = line.rpartition("Ray's logs: ")[2]
    assert Path(logs) == sessions[-1] / "logs" and Path(logs).is_dir()


def test_ray_local_run_is_quiet_and_logs_decoder_warnings(media: Path, tmp_path: Path, model_dir: Path) -> None:
    folder = tmp_path / "idx"
    done = index(media, folder, model_dir, "--ray", "local", "--ray-workers", "1", "--json")
    assert done.returncode == 0 and done.stderr == "", done.stderr
    summary = json.loads(done.stdout)
    assert (summary["indexed"], summary["failed"]) == (2, {})
    assert summary["decoder_messages"] > 0 and summary["decoder_log"] == str(folder / DECODER_LOG)
    log = (folder / DECODER_LOG).read_text()
    assert "damaged.mp4" in log and "[h264 @" in log and "clean.mp4" not in log


# -- decoder warnings (11) -------------------------------------------------------------------


def test_decoder_warnings_go_to_the_log_not_the_terminal(media: Path, tmp_path: Path, model_dir: Path) -> None:
    folder = tmp_path / "idx"
    done = index(media, folder, model_dir)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr and not any(n in done.stderr for n in FFMPEG_NOISE), done.stderr
    assert done.stdout.startswith("indexed 2 (")
    log = folder / DECODER_LOG
    assert "decoder warnings: " in done.stderr and f"lines, in {log}" in done.stderr
    text = log.read_text()
    assert text.startswith(f"== {media / 'damaged.mp4'}: ") and "[h264 @" in text and "clean.mp4" not in text
    again = index(media, tmp_path / "idx2", model_dir, "--json")  # decord repeats a line or two now and then
    assert again.returncode == 0 and again.stderr == "", again.stderr
    counted = json.loads(again.stdout)["decoder_messages"]
    header, *lines = (tmp_path / "idx2" / DECODER_LOG).read_text().splitlines()
    assert header.endswith(f": {counted} lines") and len(lines) == counted > 0


# -- progress within one long video (12) -----------------------------------------------------


def test_progress_moves_within_one_long_video(tmp_path: Path, runner: ModelRunner) -> None:
    media = tmp_path / "media"
    media.mkdir()
    write_video(media / "film.mp4", width=64, height=48, fps=4, seconds=600, frame_fn=pattern(7))  # 199 segments
    seen: list[IndexProgress] = []
    with IndexStore(tmp_path / "idx") as store:
        summary = build_index([media], store, runner, IndexOptions(window_s=6.0, stride_s=3.0, batch_size=4,
                                                                   workers=1, timeout_s=60.0), progress=seen.append)
    assert (summary.indexed, summary.segments) == (1, 199)
    *during, last = seen
    assert len(during) >= 20 and all(p.done == 0 and p.total == 1 for p in during)  # before: none
    assert (last.done, last.total, last.partial, last.segments) == (1, 1, 0.0, 199)
    shares = [p.partial for p in during]
    assert shares == sorted(shares) and 0 < shares[0] < 0.5 and 0.9 < shares[-1] < 1  # decoded, then encoded
    underway = [p.segments_underway for p in during]
    assert underway == sorted(underway) and underway[-1] > 150  # segments encoded before the file is written
