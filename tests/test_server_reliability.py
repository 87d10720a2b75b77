"""Issue 12, built for real, part two: filters mean the same on SQLite and PostgreSQL, and the
server follows its index folder, stays responsive under slow requests and survives its database
going down. Real files, real PostgreSQL servers, a real server process."""


from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta, timezone
from pathlib import Path

import httpx
import pytest
from index_helpers import TOKEN, UNPRIVILEGED, cli_env, index, stop_process, video
from sqlalchemy import select

from indexer.encoding import ModelRunner
from indexer.search.request import search_request
from indexer.search.searcher import Searcher
from indexer.store.index_reader import IndexReader
from indexer.store.schema import Video

REPO = Path(__file__).resolve().parent.parent


# -- filters mean the same on every backend ----------------------------------------------


def test_since_and_glob_mean_the_same_on_every_backend(db_url: str, tmp_path: Path, runner: ModelRunner) -> None:
    media, folder = tmp_path / "media", tmp_path / "idx"
    lower = video(media / "news" / "clip.mp4", seed=1)
    upper = video(media / "News" / "Clip.mp4", seed=2)
    bracket = video(media / "x" / "a[1].mp4", seed=3)
    index(folder, [media], runner, db_url)
    with IndexReader(folder, db_url) as store, store.db.sessions() as s:
        added = s.scalars(select(Video.created_at)).all()
    assert all(t.tzinfo is not None and t.utcoffset() == timedelta(0) for t in added)  # aware UTC
    first, last = min(added), max(added)

    def found(**given: object) -> set[str]:
        request = search_request("anything", k=10, **given)
        with Searcher(folder, db_url=db_url, runner=runner) as searcher:
            return {hit.path for hit in searcher.run(request).hits}

    everything = {str(lower), str(upper), str(bracket)}
    # The same instants written with far-apart offsets: +14:00 a minute before, -05:00 after.
    before = (first - timedelta(minutes=1)).astimezone(timezone(timedelta(hours=14))).isoformat()
    after = (last + timedelta(minutes=1)).astimezone(timezone(timedelta(hours=-5))).isoformat()
    assert found(since=before) == everything
    assert found(since=after) == set()
    assert found(since=str((first - timedelta(minutes=1)).timestamp())) == everything  # seconds since 1970
    # Globs are case-sensitive everywhere, * and ? are the only wildcards.
    assert found(glob="*/news/*") == {str(lower)}
    assert found(glob="*/News/C?ip.mp4") == {str(upper)}
    assert found(glob="*/NEWS/*") == set()
    assert found(glob="*/a[1].mp4") == {str(bracket)}


# -- the server ---------------------------------------------------------------------------


def start_server(index_dir: Path, model_dir: Path, log: Path, *, db_url: str | None = None,
                 host: str = "127.0.0.1", prefix: list[str] | None = None,
                 **options: object) -> tuple[subprocess.Popen, str]:
    """A real `server.serve` process on a free port; returns it and its base URL."""
    kwargs = ", ".join(f"{k}={v!r}" for k, v in options.items())
    code = (f"import server; server.serve({str(index_dir)!r}, host={host!r}, port=0, db_url={db_url!r}, "
            f"model_dir={str(model_dir)!r}, device='cpu', on_ready=lambda url: print('READY', url, flush=True)"
            f"{', ' + kwargs if kwargs else ''})")
    env = {**cli_env(), "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    with open(log, "wb") as out:
        proc = subprocess.Popen([*(prefix or []), sys.executable, "-c", code], cwd=REPO, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while True:
        ready = [line for line in log.read_text().splitlines() if line.startswith("READY ")]
        if ready:
            port = ready[0].rsplit(":", 1)[1]
            return proc, f"http://127.0.0.1:{port}"
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"server did not start:\n{log.read_text()}", pytrace=False)
        time.sleep(0.1)


def stop_server(proc: subprocess.Popen, log: Path) -> None:
    stop_process(proc, timeout=20)
    assert "Traceback" not in log.read_text()


def test_the_server_follows_its_index_folder(tmp_path: Path, runner: ModelRunner, model_dir: Path) -> None:
    media, folder, log = tmp_path / "media", tmp_path / "idx", tmp_path / "server.log"
    for i in range(2):
        video(media / f"v{i}.mp4", seed=i)
    index(folder, [media], runner)
    # Beyond loopback (so with a token), paths shown relative to the media folder.
    proc, url = start_server(folder, model_dir, log, host="0.0.0.0", prefix=UNPRIVILEGED, token=TOKEN,
                             path_root=str(media))
    try:
        with httpx.Client(base_url=url, timeout=120, headers={"Authorization": f"Bearer {TOKEN}"}) as client:
            assert client.get("/health").json()["videos"] == 2
            assert client.get("/docs").status_code == 404  # off beyond loopback unless asked for
            hit = client.get("/search", params={"q": "anything"}).json()["hits"][0]
            assert hit["path"] in ("v0.mp4", "v1.mp4")
            assert client.get(f"/videos/{hit['video_id']}").json()["path"] == hit["path"]

            # Deleted: 503 with one line. Restored (a copy: new files): the same counts again.
            backup = tmp_path / "backup"
            shutil.move(folder, backup)
            gone = client.get("/health")
            assert gone.status_code == 503 and "no index" in gone.json()["detail"]
            assert "\n" not in gone.json()["detail"]
            shutil.copytree(backup, folder)
            assert client.get("/health").json()["videos"] == 2

            # Rebuilt in place with more videos: fresh counts at once, every time, and searchable.
            shutil.rmtree(folder)
            video(media / "v2.mp4", seed=2)
            index(folder, [media], runner)
            counts = {(h["videos"], h["segments"]) for h in (client.get("/health").json() for _ in range(6))}
            assert counts == {(3, 3)}
            search = client.get("/search", params={"q": "anything", "k": 10})
            assert search.status_code == 200 and len(search.json()["hits"]) == 3

            # Unreadable: 503 with a one-line reason; readable again: answers again, no restart.
            folder.chmod(0)
            try:
                for response in (client.get("/health"), client.get("/search", params={"q": "x"})):
                    assert response.status_code == 503, response.text
                    assert response.json()["detail"] and "\n" not in response.json()["detail"]
            finally:
                folder.chmod(0o755)
            assert client.get("/health").json()["videos"] == 3
    finally:
        stop_server(proc, log)


def test_a_burst_of_single_stream_requests_does_not_hold_up_a_plain_search(tmp_path: Path, runner: ModelRunner,
                                                                           model_dir: Path) -> None:
    media, folder, log = tmp_path / "media", tmp_path / "idx", tmp_path / "server.log"
    for i in range(6):
        video(media / f"v{i}.mp4", seed=i, seconds=12.0)  # 2 segments each: work to decode again
    index(folder, [media], runner)
    proc, url = start_server(folder, model_dir, log)
    finished: list[str] = []  # what completed, in order
    lock = threading.Lock()

    def get(kind: str, client: httpx.Client, **params: object) -> httpx.Response:
        response = client.get("/search", params={"q": "anything", **params})
        with lock:
            finished.append(f"{kind} {response.status_code}")
        return response

    try:
        with httpx.Client(base_url=url, timeout=300) as client:
            assert client.get("/docs").status_code == 200  # on for loopback
            burst = 12
            with ThreadPoolExecutor(burst + 1) as pool:
                singles = [pool.submit(get, "single", client, rerank="single", rerank_k=64) for _ in range(burst)]
                while not finished:  # the first refusal: the burst has reached the server
                    time.sleep(0.01)
                plain = pool.submit(get, "plain", client).result()
                responses = [f.result() for f in singles]
    finally:
        stop_server(proc, log)
    assert plain.status_code == 200 and plain.json()["hits"]
    refused = [r for r in responses if r.status_code == 429]
    assert refused and all(r.status_code in (200, 429) for r in responses)
    assert all(int(r.headers["Retry-After"]) >= 1 and "single-stream" in r.json()["detail"] for r in refused)
    # The plain search waited for at most the one single-stream request that was running.
    ahead = finished[: finished.index("plain 200")]
    assert ahead.count("single 200") <= 1, finished


def test_the_server_answers_503_while_postgres_is_down_and_recovers(private_postgres, tmp_path: Path,
                                                                     runner: ModelRunner, model_dir: Path) -> None:
    url, folder, log = private_postgres.url, tmp_path / "idx", tmp_path / "server.log"
    index(folder, [video(tmp_path / "media" / "a.mp4", seed=1)], runner, url)
    proc, base = start_server(folder, model_dir, log, db_url=url)
    try:
        with httpx.Client(base_url=base, timeout=120) as client:
            assert client.get("/health").json()["videos"] == 1
            private_postgres.stop()
            for response in (client.get("/health"), client.get("/search", params={"q": "x"})):
                assert response.status_code == 503, response.text
                detail = response.json()["detail"]
                assert detail.startswith("database postgresql+psycopg://") and "\n" not in detail
            private_postgres.start()
            assert client.get("/health").json()["videos"] == 1
            assert client.get("/search", params={"q": "x"}).status_code == 200
    finally:
        stop_server(proc, log)
