"""Issue #16 end to end: indexing on a real local Ray (2 worker processes) and vectors in a
real Milvus Lite, both embedded (a .db folder) and as its gRPC server in a subprocess, so the
network client path runs. Real video files, a real tiny model, real SQLite.

- Ray indexing stores the same segments and embeddings as local indexing.
- A Ray worker SIGKILLed mid-run: the run completes, every video indexed exactly once.
- A worker that cannot open a planned file stops the run with a clear error.
- Search over Milvus returns the videos FAISS Flat returns, in the same order, filters too.
- An indexer killed between the SQL commit and the Milvus insert: a rerun leaves
  segments == vectors.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import ray  # the cluster extra: scripts/test.sh installs it
from index_helpers import pattern, wait_until_stopped
from typer.testing import CliRunner

from cli import app
from indexer.encoding import ModelRunner
from indexer.errors import IndexStoreError
from indexer.ingest.pipeline import IndexOptions, IndexSummary, build_index, rebuild_vectors
from indexer.ingest.ray_producer import ACTOR_PREFIX, RayOptions
from indexer.search.searcher import Searcher, SearchFilters
from indexer.store.index_reader import IndexReader
from indexer.store.index_store import IndexStore
from indexer.store.records import PAUSE_ENV
from pvl_search.media.sample_files import write_video

REPO = Path(__file__).resolve().parent.parent
F16_TOL = {"rtol": 2e-3, "atol": 2e-3}
QUERIES = ["a red circle moves left", "blue square", "something green and small", "two shapes"]


def make_corpus(folder: Path, n: int, *, long_every: int = 4) -> list[Path]:
    """n small videos in two sub-folders; every `long_every`-th one is 12 s (3 segments)."""
    paths = []
    for i in range(n):
        path = folder / ("news" if i % 2 else "sport") / f"v{i:02d}.mp4"
        path.parent.mkdir(parents=True, exist_ok=True)
        seconds = 12.0 if i % long_every == 0 else 2.0
        paths.append(write_video(path, seconds=seconds, fps=2, frame_fn=pattern(i)))
    return paths


def options(**changes: object) -> IndexOptions:
    return IndexOptions(window_s=6.0, stride_s=3.0, batch_size=4, workers=1, timeout_s=30.0, **changes)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("corpus")
    make_corpus(folder, 10)
    return folder


@pytest.fixture(scope="module")
def local_ray():  # noqa: ANN201
    """A real local Ray with 2 CPUs: two encoder actors, each its own worker process."""
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024**2, log_to_driver=False,
             configure_logging=False)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def faiss_index(tmp_path_factory: pytest.TempPathFactory, corpus: Path, runner: ModelRunner) -> Path:
    """The corpus indexed locally, FAISS Flat: what the other paths are compared with."""
    folder = tmp_path_factory.mktemp("faiss") / "idx"
    with IndexStore(folder) as store:
        summary = build_index([corpus], store, runner, options())
    assert summary.indexed == 10 and not summary.failed
    return folder


@pytest.fixture(scope="module")
def milvus_server(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    """Milvus Lite's gRPC server as a subprocess on a free port: the network client path."""
    data, port = tmp_path_factory.mktemp("milvus-server") / "data", free_port()
    log = data.parent / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "milvus_lite", "server", "--data-dir", str(data),
                                 "--host", "127.0.0.1", "--port", str(port)], stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"Milvus Lite server did not start:\n{log.read_text()}")
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def per_video(folder: Path) -> dict[str, tuple[list[tuple[float, float]], np.ndarray, np.ndarray, int]]:
    """path -> (spans, embeddings, rerank states, thumbnails) of its live segments, in time order."""
    out = {}
    with IndexReader(folder) as store:
        segments = store.segments(store.segment_ids())
        have = set(store.thumbnails.ids())
        for path in sorted({s.path for s in segments.values()}):
            mine = sorted((s for s in segments.values() if s.path == path), key=lambda s: s.start_s)
            ids = [s.id for s in mine]
            out[path] = ([(s.start_s, s.end_s) for s in mine], store.embeddings(ids), store.rerank_states(ids),
                         sum(i in have for i in ids))
    return out


def assert_exactly_once(folder: Path, videos: int) -> None:
    """Every video indexed once: as many live segments as rows, none removed, every live
    segment once in the vector store."""
    with IndexReader(folder) as store:
        stats = store.stats()
        ids = store.vectors.ids()
        assert stats.videos == {"indexed": videos, "failed": 0, "removed": 0}
        assert stats.removed_segments == 0 and stats.segments == stats.rows
        assert len(ids) == len(set(ids.tolist())) == stats.vectors == stats.segments
        assert sorted(ids.tolist()) == store.segment_ids().tolist()


def segment_count(folder: Path) -> int:
    with IndexReader(folder) as store:
        return store.stats().segments


# -- Ray -------------------------------------------------------------------------------------


def test_ray_indexing_matches_local(local_ray, tmp_path: Path, corpus: Path, runner: ModelRunner,  # noqa: ANN001
                                    model_dir: Path, faiss_index: Path) -> None:
    folder = tmp_path / "idx"
    seen: list[int] = []
    with IndexStore(folder) as store:
        summary = build_index([corpus], store, runner,
                              options(ray=RayOptions("local", 2, model_dir=str(model_dir), files_per_task=2)),
                              progress=lambda p: seen.append(p.done))
    assert (summary.indexed, summary.failed) == (10, {})
    assert seen == list(range(1, 11))  # the progress bar moves as in local mode
    local, remote = per_video(faiss_index), per_video(folder)
    assert sorted(local) == sorted(remote)
    for path, (spans, emb, states, thumbs) in local.items():
        r_spans, r_emb, r_states, r_thumbs = remote[path]
        assert r_spans == pytest.approx(spans)
        np.testing.assert_allclose(r_emb, emb, **F16_TOL)
        np.testing.assert_allclose(r_states, states, **F16_TOL)
        assert r_thumbs == thumbs == len(spans)
    assert_exactly_once(folder, 10)
    again = IndexStore(folder)
    with again as store:  # a rerun plans as a local run does: nothing to do
        rerun = build_index([corpus], store, runner, options(ray=RayOptions("local", 2, model_dir=str(model_dir))))
    assert (rerun.indexed, rerun.unchanged) == (0, 10)


def test_sigkill_of_a_ray_worker_mid_run(local_ray, tmp_path: Path, runner: ModelRunner,  # noqa: ANN001
                                         model_dir: Path) -> None:
    media, folder = tmp_path / "media", tmp_path / "idx"
    make_corpus(media, 10, long_every=8)
    killed: list[int] = []

    def kill_one_worker(progress) -> None:  # noqa: ANN001 - IndexProgress
        if progress.done == 2 and not killed:
            names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                     if a["name"].startswith(ACTOR_PREFIX)]
            pid = ray.get(ray.get_actor(sorted(names)[0]).pid.remote())
            os.kill(pid, signal.SIGKILL)  # mid-run: both actors have batches in flight
            killed.append(pid)

    with IndexStore(folder) as store:
        summary: IndexSummary = build_index(
            [media], store, runner, options(ray=RayOptions("local", 2, model_dir=str(model_dir), files_per_task=1)),
            progress=kill_one_worker)
    assert killed, "no worker was killed"
    assert (summary.indexed, summary.failed) == (10, {})
    assert_exactly_once(folder, 10)


def test_a_worker_that_cannot_open_a_planned_file_stops_the_run(
    local_ray, tmp_path: Path, runner: ModelRunner, model_dir: Path  # noqa: ANN001
) -> None:
    media, folder = tmp_path / "media", tmp_path / "idx"
    paths = make_corpus(media, 4, long_every=99)
    last = sorted(paths)[-1]

    def vanish(progress) -> None:  # noqa: ANN001 - planned, then gone before a worker opens it
        if progress.done == 1 and last.exists():
            last.unlink()

    with IndexStore(folder) as store, pytest.raises(IndexStoreError, match="shared filesystem") as error:
        build_index([media], store, runner,
                    options(ray=RayOptions("local", 1, model_dir=str(model_dir), files_per_task=1)), progress=vanish)
    assert str(last) in str(error.value)
    with IndexReader(folder) as store:  # what was written before stays
        assert 1 <= store.stats().videos["indexed"] < 4


# -- Milvus ----------------------------------------------------------------------------------


def ranked(folder: Path, runner: ModelRunner, filters: SearchFilters | None = None,
           rerank: str = "mixed") -> list[list[tuple[str, float]]]:
    with Searcher(folder, runner=runner) as searcher:
        return [[(h.path, h.score) for h in searcher.search(q, k=5, rerank_k=20, rerank=rerank, filters=filters).hits]
                for q in QUERIES]


def assert_same_ranking(a: list[list[tuple[str, float]]], b: list[list[tuple[str, float]]],
                        runner: ModelRunner) -> None:
    # A reranked score holds the similarity times the model's temperature (calibrated fusion):
    # the tolerance is 1e-4 in similarity units either way.
    tolerance = 1e-4 * max(1.0, runner.retrieval_scale)
    for one, other in zip(a, b):
        assert [p for p, _ in one] == [p for p, _ in other]  # ties aside: scores must agree too
        np.testing.assert_allclose([s for _, s in one], [s for _, s in other], rtol=1e-4, atol=tolerance)


@pytest.mark.parametrize("mode", ["lite", "server"])
def test_milvus_search_matches_faiss_flat(mode: str, tmp_path: Path, corpus: Path, runner: ModelRunner,
                                          faiss_index: Path, request: pytest.FixtureRequest) -> None:
    uri = str(tmp_path / "vectors.db") if mode == "lite" else request.getfixturevalue("milvus_server")
    folder = tmp_path / "idx"
    with IndexStore(folder) as store:
        summary = build_index([corpus], store, runner, options(vectors=f"milvus:{uri}"))
    assert summary.indexed == 10
    with IndexReader(folder) as store:
        assert store.layout.vectors == f"milvus:{uri}"  # recorded: search/serve/status follow it
        assert store.vectors.description.startswith("Milvus FLAT")
    assert_exactly_once(folder, 10)
    for filters in (None, SearchFilters(path_glob="*/news/*"), SearchFilters(min_duration=5.0),
                    SearchFilters(path_glob="*/sport/*", max_duration=5.0)):
        assert_same_ranking(ranked(faiss_index, runner, filters), ranked(folder, runner, filters), runner)
    assert_same_ranking(ranked(faiss_index, runner, rerank="none"), ranked(folder, runner, rerank="none"), runner)

    # --rebuild re-creates the collection from the stored embeddings alone.
    segments = segment_count(faiss_index)
    assert rebuild_vectors(folder) == segments
    assert_same_ranking(ranked(faiss_index, runner), ranked(folder, runner), runner)
    cli = CliRunner()
    status = cli.invoke(app, ["status", "--index", str(folder), "--json"])
    assert status.exit_code == 0, status.output
    data = json.loads(status.stdout)
    assert data["vectors"] == data["segments"] == segments and data["faiss"].startswith("Milvus")


def test_switching_an_index_to_milvus_and_searching_from_the_cli(tmp_path: Path, corpus: Path, runner: ModelRunner,
                                                                 model_dir: Path, faiss_index: Path) -> None:
    import shutil

    folder = tmp_path / "idx"
    shutil.copytree(faiss_index, folder)
    cli = CliRunner()
    moved = cli.invoke(app, ["index", "--index", str(folder), "--rebuild", "--vectors",
                             f"milvus:{tmp_path / 'v.db'}", "--json"])
    assert moved.exit_code == 0, moved.output
    assert json.loads(moved.stdout) == {"rebuilt_vectors": segment_count(faiss_index)}
    args = ["--model", str(model_dir), "--dtype", "float32", "--json", "-k", "5", "--glob", "*/news/*"]
    for query in QUERIES[:2]:
        hits = [cli.invoke(app, ["search", query, "--index", str(f), *args]) for f in (faiss_index, folder)]
        assert all(h.exit_code == 0 for h in hits), [h.output for h in hits]
        paths = [[json.loads(line)["path"] for line in h.stdout.splitlines() if line.startswith("{")] for h in hits]
        assert paths[0] == paths[1] and paths[0]
    bad = cli.invoke(app, ["index", str(corpus), "--index", str(tmp_path / "x"), "--vectors", "milvus:nowhere"])
    assert bad.exit_code == 1 and bad.stderr.startswith("error: --vectors")


def test_kill_between_sql_commit_and_milvus_insert(tmp_path: Path, corpus: Path, runner: ModelRunner,
                                                   model_dir: Path) -> None:
    folder, uri = tmp_path / "idx", tmp_path / "vectors.db"
    command = [sys.executable, str(REPO / "cli.py"), "index", str(corpus), "--index", str(folder), "--model",
               str(model_dir), "--dtype", "float32", "--workers", "1", "--window", "6", "--stride", "3",
               "--vectors", f"milvus:{uri}", "--json"]
    env = {**os.environ, PAUSE_ENV: "sql_committed", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    log = tmp_path / "child.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=err)
    wait_until_stopped(proc, log, "sql_committed", timeout_s=180)
    os.kill(proc.pid, signal.SIGKILL)  # SQL has the first video; Milvus does not
    proc.wait()

    with IndexReader(folder) as store:  # a reader already finds what SQL has
        stats = store.stats()
        assert stats.videos["indexed"] == 1 and stats.vectors == stats.segments >= 1
    with IndexStore(folder) as store:
        summary = build_index([corpus], store, runner, options(vectors=f"milvus:{uri}"))
    assert (summary.indexed, summary.unchanged) == (9, 1)
    assert_exactly_once(folder, 10)
