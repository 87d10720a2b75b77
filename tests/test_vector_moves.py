"""Issue #27, items 1, 4 and 7: moving an index's vectors between FAISS and Milvus.

- A move (`index --rebuild --vectors`) that fails, FAISS -> Milvus (a Milvus Lite file in a
  folder that does not exist or cannot be made, a server that is down) or Milvus -> FAISS (the
  FAISS file cannot be written; the Milvus Lite file held by a running `serve`), leaves the
  index on its old store, searching exactly as before; a later good move works.
- A new index given a Milvus URI that cannot be opened records nothing: a rerun with a good
  URI makes the index.
- Milvus Lite failures are one `error:` line naming the reason, no traceback.
- `--vectors` naming another store than the index records, without `--rebuild`, is refused.

Real Milvus Lite, real `pvl-search` processes where the point is what a user sees, a real
tiny model and real video files.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from index_helpers import assert_one_error_line, cli, cli_env, pvl_search, stop_process, video

from indexer.encoding import ModelRunner
from indexer.errors import IndexStoreError
from indexer.ingest.pipeline import IndexOptions, build_index, rebuild_vectors
from indexer.search.searcher import Searcher
from indexer.store.index_reader import IndexReader
from indexer.store.index_store import IndexStore
from indexer.store.records import FAISS_FILE

QUERIES = ["a red circle moves left", "blue square", "two shapes"]
Ranking = list[list[tuple[str, float]]]


def options(**changes: object) -> IndexOptions:
    return IndexOptions(window_s=6.0, stride_s=3.0, batch_size=4, workers=1, timeout_s=30.0, **changes)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("corpus")
    for i in range(4):
        video(folder / f"v{i}.mp4", seed=i, seconds=9.0 if i == 0 else 2.0)  # v0: several segments
    return folder


@pytest.fixture(scope="module")
def faiss_index(tmp_path_factory: pytest.TempPathFactory, corpus: Path, runner: ModelRunner) -> Path:
    folder = tmp_path_factory.mktemp("faiss") / "idx"
    with IndexStore(folder) as store:
        summary = build_index([corpus], store, runner, options())
    assert summary.indexed == 4 and not summary.failed
    return folder


def copy_of(faiss_index: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "idx"
    shutil.copytree(faiss_index, folder)
    return folder


def on_milvus(faiss_index: Path, tmp_path: Path) -> tuple[Path, str]:
    """A copy of the FAISS index moved to a Milvus Lite file (closed again: its lock is free)."""
    folder, spec = copy_of(faiss_index, tmp_path), f"milvus:{tmp_path / 'v.db'}"
    assert rebuild_vectors(folder, vectors=spec) == segments(folder)
    return folder, spec


def segments(folder: Path) -> int:
    with IndexReader(folder) as store:
        return store.stats().segments


def searched(folder: Path, runner: ModelRunner) -> tuple[str | None, list[int], Ranking]:
    """What a searcher finds: the store the index records, the ids it holds, the ranked videos."""
    with Searcher(folder, runner=runner) as searcher:
        recorded, ids = searcher.store.layout.vectors, sorted(searcher.store.vectors.ids().tolist())
        ranked = [[(h.path, h.score) for h in searcher.search(q, k=4, rerank_k=20, rerank="mixed").hits]
                  for q in QUERIES]
    return recorded, ids, ranked


def assert_same_ranking(a: Ranking, b: Ranking, runner: ModelRunner) -> None:
    # FAISS and Milvus sum the inner products in another order: scores agree to rounding.
    tolerance = 1e-4 * max(1.0, runner.retrieval_scale)
    for one, other in zip(a, b):
        assert [p for p, _ in one] == [p for p, _ in other] and one
        np.testing.assert_allclose([s for _, s in one], [s for _, s in other], rtol=1e-4, atol=tolerance)


# -- item 1 (and 4): a failed move leaves the old store in use -------------------------------


@pytest.mark.parametrize(("where", "reason"), [
    ("missing-folder", "exist"),  # the milvus:/nonexistent/d/v.db
    ("proc", "No such file or directory"),  # a folder nothing can be made in: Milvus Lite logged a traceback
    ("server-down", "cannot reach Milvus at http://127.0.0.1:1"),
])
def test_a_failed_move_to_milvus_leaves_the_index_on_faiss(where: str, reason: str, tmp_path: Path,
                                                           faiss_index: Path, runner: ModelRunner) -> None:
    folder = copy_of(faiss_index, tmp_path)
    before = searched(folder, runner)
    uri = {"missing-folder": str(tmp_path / "missing" / "v.db"), "proc": "/proc/v.db",
           "server-down": "http://127.0.0.1:1"}[where]
    moved = cli("index", "--index", str(folder), "--rebuild", "--vectors", f"milvus:{uri}")
    assert_one_error_line(moved, uri, reason)
    assert searched(folder, runner) == before  # still FAISS, the same vectors, the same answers
    assert before[0] is None and (folder / FAISS_FILE).exists()

    good = f"milvus:{tmp_path / 'v.db'}"  # a later good move works
    assert rebuild_vectors(folder, vectors=good) == len(before[1])
    recorded, ids, ranked = searched(folder, runner)
    assert (recorded, ids) == (good, before[1])
    assert_same_ranking(ranked, before[2], runner)


def test_a_failed_move_to_faiss_leaves_the_index_on_milvus(tmp_path: Path, faiss_index: Path,
                                                           runner: ModelRunner) -> None:
    folder, spec = on_milvus(faiss_index, tmp_path)
    before = searched(folder, runner)
    blocker = folder / FAISS_FILE  # the FAISS file cannot be written (as on a full disk)
    blocker.unlink()  # the one from before the move to Milvus
    blocker.mkdir()
    (blocker / "keep").write_text("a folder where the file would go")
    with pytest.raises(OSError):
        rebuild_vectors(folder, vectors="faiss")
    assert searched(folder, runner) == before and before[0] == spec

    shutil.rmtree(blocker)  # a later good move works
    assert rebuild_vectors(folder, vectors="faiss") == len(before[1])
    recorded, ids, ranked = searched(folder, runner)
    assert (recorded, ids) == (None, before[1])
    assert_same_ranking(ranked, before[2], runner)


def test_a_new_index_with_a_bad_milvus_uri_records_nothing(tmp_path: Path, corpus: Path, faiss_index: Path,
                                                           model_dir: Path, runner: ModelRunner) -> None:
    folder, bad = tmp_path / "idx", tmp_path / "missing" / "v.db"
    made = cli("index", str(corpus), "--index", str(folder), "--model", str(model_dir), "--dtype", "float32",
               "--workers", "1", "--window", "6", "--stride", "3", "--vectors", f"milvus:{bad}")
    assert_one_error_line(made, str(bad), "exist")
    with IndexStore(folder) as store:
        assert store.layout is None  # no model, no store: a rerun starts afresh

    good = f"milvus:{tmp_path / 'v.db'}"
    with IndexStore(folder) as store:
        summary = build_index([corpus], store, runner, options(vectors=good))
    assert summary.indexed == 4 and not summary.failed
    recorded, ids, ranked = searched(folder, runner)
    expected = searched(faiss_index, runner)
    assert (recorded, ids) == (good, expected[1])
    assert_same_ranking(ranked, expected[2], runner)


# -- item 4: Milvus Lite held by another process ---------------------------------------------


def test_a_milvus_lite_file_held_by_a_running_server(tmp_path: Path, faiss_index: Path, model_dir: Path,
                                                     runner: ModelRunner) -> None:
    folder, spec = on_milvus(faiss_index, tmp_path)
    before = searched(folder, runner)
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        server = subprocess.Popen([pvl_search(), "serve", "--index", str(folder), "--port", "0", "--model",
                                   str(model_dir), "--device", "cpu", "--dtype", "float32"],
                                  stdout=out, stderr=subprocess.STDOUT, env=cli_env())
    try:
        deadline = time.monotonic() + 120
        while "serving on" not in log.read_text():
            assert server.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        found = cli("search", "blue square", "--index", str(folder), "--model", str(model_dir), "--dtype", "float32")
        assert_one_error_line(found, spec.removeprefix("milvus:"), "another process holds it")
        moved = cli("index", "--index", str(folder), "--rebuild", "--vectors", "faiss")  # Milvus -> FAISS
        assert_one_error_line(moved, "another process holds it")
    finally:
        stop_process(server, timeout=20)
    assert searched(folder, runner) == before and before[0] == spec


# -- item 7: --vectors without --rebuild ------------------------------------------------------


def test_vectors_without_rebuild_on_an_existing_index_is_refused(tmp_path: Path, corpus: Path, faiss_index: Path,
                                                                 model_dir: Path, runner: ModelRunner) -> None:
    folder, target = copy_of(faiss_index, tmp_path), tmp_path / "v.db"
    before = searched(folder, runner)
    run = cli("index", str(corpus), "--index", str(folder), "--model", str(model_dir), "--dtype", "float32",
              "--workers", "1", "--window", "6", "--stride", "3", "--vectors", f"milvus:{target}")
    assert_one_error_line(run, "--rebuild")
    assert not target.exists() and searched(folder, runner) == before

    # Nor is a FAISS factory other than the index's (it is chosen when an index is made).
    run = cli("index", str(corpus), "--index", str(folder), "--model", str(model_dir), "--dtype", "float32",
              "--workers", "1", "--window", "6", "--stride", "3", "--faiss-factory", "HNSW32")
    assert_one_error_line(run, "--faiss-factory", "new folder")
    assert searched(folder, runner) == before

    # The other way too; naming the store the index records already is no move at all.
    milvus_folder, spec = on_milvus(faiss_index, tmp_path / "m")
    with IndexStore(milvus_folder) as store, pytest.raises(IndexStoreError, match="--rebuild"):
        build_index([corpus], store, runner, options(vectors="faiss"))
    with IndexStore(milvus_folder) as store:
        assert build_index([corpus], store, runner, options(vectors=spec)).unchanged == 4
        assert store.layout.vectors == spec
