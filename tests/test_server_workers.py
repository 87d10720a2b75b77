"""`serve --workers N` (pvl_web/worker_processes.py), for real: a server process with two spawned
worker processes on one port. Every answer is the same whichever worker gives it; a worker
killed with SIGKILL is replaced while the other answers; a worker that cannot start fails
`serve` with its own one-line error; stopping the server stops every worker."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import pytest
from index_helpers import index, video
from test_server_reliability import start_server, stop_server

from indexer.encoding import ModelRunner


def _workers(parent: int) -> set[int]:
    """The worker processes of a server process (its spawned children, not the resource tracker)."""
    found = set()
    for task in Path(f"/proc/{parent}/task").iterdir():
        for pid in (task / "children").read_text().split():
            try:
                command = Path(f"/proc/{pid}/cmdline").read_bytes()
            except FileNotFoundError:  # exited between the two reads
                continue
            if b"spawn_main" in command and b"resource_tracker" not in command:
                found.add(int(pid))
    return found


def _wait_for(condition, what: str, seconds: float = 120.0):  # noqa: ANN001, ANN202 - a predicate, its value
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}", pytrace=False)


def test_two_workers_answer_alike_and_a_killed_one_is_replaced(tmp_path: Path, runner: ModelRunner,
                                                                model_dir: Path) -> None:
    media, folder, log = tmp_path / "media", tmp_path / "idx", tmp_path / "server.log"
    for i in range(3):
        video(media / f"v{i}.mp4", seed=i)
    index(folder, [media], runner)
    proc, url = start_server(folder, model_dir, log, workers=2)
    try:
        def two_workers(without: int = 0) -> set[int] | None:
            found = _workers(proc.pid)
            return found if len(found) == 2 and without not in found else None

        first = _wait_for(two_workers, "two workers")

        def answers() -> list[list[dict]]:
            # A new connection each time: any worker may accept it.
            return [httpx.get(f"{url}/search", params={"q": q, "k": 3}, timeout=60).json()["hits"]
                    for q in ("a red circle", "a blue square moves left", "anything")]

        def health_worker() -> int:
            return httpx.get(f"{url}/health", timeout=60).json()["worker"]

        expected = answers()
        assert {health_worker() for _ in range(4)} <= first
        for victim in sorted(first):  # kill each original worker in turn
            os.kill(victim, signal.SIGKILL)
            assert answers() == expected  # the other worker, or the new one, answers the same
            _wait_for(lambda v=victim: two_workers(without=v), "a replacement")
        replaced = _workers(proc.pid)
        assert not replaced & first
        assert answers() == expected
        assert {health_worker() for _ in range(4)} <= replaced  # only the replacements are left to answer
    finally:
        stop_server(proc, log)
    assert proc.returncode == 0
    for pid in first | replaced:  # every worker stopped with the server
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]


def test_a_worker_that_cannot_start_fails_serve_with_its_own_error(tmp_path: Path, model_dir: Path) -> None:
    import server
    from indexer.errors import IndexStoreError

    with pytest.raises(IndexStoreError) as one:
        server.serve(tmp_path / "missing", port=0, model_dir=model_dir, device="cpu")
    with pytest.raises(IndexStoreError) as two:
        server.serve(tmp_path / "missing", port=0, model_dir=model_dir, device="cpu", workers=2)
    assert str(two.value) == str(one.value) and "\n" not in str(two.value)


def test_workers_stop_when_their_server_process_is_killed(tmp_path: Path, runner: ModelRunner,
                                                          model_dir: Path) -> None:
    """SIGKILL of the parent (no chance to stop its workers): each worker sees it gone and stops
    itself, so no orphan goes on answering on the socket."""
    media, folder, log = tmp_path / "media", tmp_path / "idx", tmp_path / "server.log"
    video(media / "v0.mp4", seed=0)
    index(folder, [media], runner)
    proc, url = start_server(folder, model_dir, log, workers=2)
    workers = _wait_for(lambda: (found := _workers(proc.pid)) and len(found) == 2 and found, "two workers")
    assert httpx.get(f"{url}/health", timeout=60).json()["worker"] in workers
    proc.kill()
    proc.wait()
    _wait_for(lambda: not any(Path(f"/proc/{pid}").exists() for pid in workers), "the workers to stop", 60)
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{url}/health", timeout=5)
