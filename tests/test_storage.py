"""Storage layer on real files, a real SQLite file, a real PostgreSQL server and real FAISS:
migrations, row stores, the FAISS wrapper, and IndexStore consistency across SIGKILLs."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect, select, text
from sqlalchemy.engine import make_url

from indexer.database import current_revisions, head_revision, open_database
from indexer.errors import (
    IndexLockedError,
    IndexStoreError,
    ModelMismatchError,
    RowStoreError,
    SchemaTooNewError,
)
import indexer.index_store as index_store_module
from indexer.index_store import (
    EMBEDDINGS_FILE,
    FAISS_FILE,
    PAUSE_ENV,
    RERANK_FILE,
    IndexLayout,
    IndexStore,
    VideoInfo,
    fingerprint_file,
)
from indexer.row_store import HEADER_SIZE, RowStore
from indexer.schema import Base, IndexInfo, Segment, Video
from indexer.vector_index import VectorIndex

REPO = Path(__file__).resolve().parent.parent
D_EMB, D_RERANK = 16, 10
LAYOUT = IndexLayout(embedding_dim=D_EMB, rerank_width=D_RERANK)
CONFIG = '{"hidden": 192, "latents": 32}'
WEIGHTS = "a" * 64


def clustered(n: int, d: int, *, clusters: int = 64, seed: int = 0) -> np.ndarray:
    """Unit vectors from a gaussian mixture: structure an approximate index can exploit."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, d))
    x = centres[rng.integers(0, clusters, n)] + 0.35 * rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def recall_at(I: np.ndarray, gt: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / gt.shape[1] for a, b in zip(I, gt)]))


def video_rows(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    emb = rng.normal(size=(n, D_EMB))
    emb = (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32)
    return emb, rng.normal(size=(n, D_RERANK)).astype(np.float32)


def add(store: IndexStore, path: str, n: int, seed: int, fingerprint: str = "f" * 64) -> int:
    emb, rerank = video_rows(n, seed)
    spans = [(2.0 * i, 2.0 * i + 2.0) for i in range(n)]
    info = VideoInfo(duration=6.0, fps=25.0, width=64, height=48)
    stat = (1000 + seed, 1.5 * seed)
    return store.add_video(path, stat, fingerprint, info, spans, emb, rerank)


def assert_consistent(store: IndexStore, db_url: str) -> None:
    """The invariant: stores hold exactly the committed rows, segment ids are exactly those
    row numbers, and FAISS holds each searchable segment once and nothing else."""
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(select(IndexInfo.committed_rows)).scalar_one()
            seg_ids = sorted(conn.execute(select(Segment.id)).scalars())
            live = sorted(
                conn.execute(
                    select(Segment.id)
                    .join(Video)
                    .where(Segment.removed.is_(False), Video.status == "indexed")
                ).scalars()
            )
    finally:
        engine.dispose()
    assert seg_ids == list(range(rows))
    assert len(store.embedding_store) == len(store.rerank_store) == rows
    faiss_ids = store.vectors.ids()
    assert len(faiss_ids) == len(set(faiss_ids.tolist())), "an id is in FAISS twice"
    assert sorted(faiss_ids.tolist()) == live
    if live:  # every live id finds its own stored embedding first
        own = store.embeddings(live)
        _, I = store.search(own, 1)
        assert (I[:, 0] == np.asarray(live)).mean() > 0.95


# -- migrations ------------------------------------------------------------------------


def test_migrates_an_empty_database_to_head(db_url: str) -> None:
    db = open_database(db_url)
    try:
        tables = set(inspect(db.engine).get_table_names())
        assert {"videos", "segments", "captions", "index_info", "alembic_version"} <= tables
        with db.engine.connect() as conn:
            assert current_revisions(conn) == (head_revision(),)
            # The migration creates exactly what the models describe.
            assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
    finally:
        db.close()
    open_database(db_url).close()  # a second open is a no-op upgrade


def test_refuses_a_database_from_a_newer_version(db_url: str, tmp_path: Path) -> None:
    open_database(db_url).close()
    engine = create_engine(db_url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9999_from_the_future'"))
    engine.dispose()
    with pytest.raises(SchemaTooNewError, match="9999_from_the_future"):
        open_database(db_url)
    with pytest.raises(SchemaTooNewError, match="newer version"):
        IndexStore(tmp_path / "idx", db_url)
    # The refusal released the folder: nothing holds its lock.
    with pytest.raises(SchemaTooNewError):
        IndexStore(tmp_path / "idx", db_url)
    with pytest.raises(SchemaTooNewError, match="newer version"):
        IndexStore(tmp_path / "idx", db_url, read_only=True)


# -- row store -------------------------------------------------------------------------


def test_row_store_append_get_reopen(tmp_path: Path) -> None:
    path = tmp_path / "rows.f16"
    rows = np.random.default_rng(0).normal(size=(50, 12)).astype(np.float32)
    with RowStore(path, 12) as store:
        assert store.append(rows[:20]) == 0
        assert store.append(rows[20:]) == 20
        store.flush()
        assert len(store) == 50
        got = store.get([49, 0, 7, 7])
        assert got.dtype == np.float32 and got.shape == (4, 12)
        np.testing.assert_allclose(got, rows[[49, 0, 7, 7]], rtol=1e-3, atol=1e-3)  # float16
    assert path.stat().st_size == HEADER_SIZE + 50 * 12 * 2
    with RowStore(path, 12, create=False) as store:
        assert len(store) == 50
        np.testing.assert_allclose(store.get(np.arange(50)), rows, rtol=1e-3, atol=1e-3)
        with pytest.raises(RowStoreError, match="row 50 does not exist"):
            store.get([50])


def test_row_store_refuses_wrong_width_and_foreign_files(tmp_path: Path) -> None:
    path = tmp_path / "rows.f16"
    RowStore(path, 8, tag=b"\x01\x02").close()
    with pytest.raises(RowStoreError, match="width 8.*width 9 was expected"):
        RowStore(path, 9)
    with pytest.raises(RowStoreError, match="another index"):
        RowStore(path, 8, tag=b"\x09")
    with pytest.raises(RowStoreError, match="does not exist"):
        RowStore(tmp_path / "missing.f16", 8, create=False)
    (tmp_path / "junk.f16").write_bytes(b"not a store at all" * 10)
    with pytest.raises(RowStoreError, match="not a pvl-search row store"):
        RowStore(tmp_path / "junk.f16", 8)
    with RowStore(path, 8) as store:
        with pytest.raises(ValueError, match="shape"):
            store.append(np.zeros((2, 7)))
        with pytest.raises(ValueError, match="range"):
            store.append(np.full((1, 8), 1e6))  # float16 overflow is refused, not stored as inf
        assert len(store) == 0


def test_row_store_truncate_and_torn_row(tmp_path: Path) -> None:
    path = tmp_path / "rows.f16"
    with RowStore(path, 4) as store:
        store.append(np.arange(40, dtype=np.float32).reshape(10, 4))
        store.get([9])  # maps the file, which truncate must drop
        store.truncate(6)
        assert len(store) == 6
        with pytest.raises(RowStoreError):
            store.get([6])
        assert store.append(np.ones((1, 4))) == 6
        np.testing.assert_array_equal(store.get([5, 6]), [[20, 21, 22, 23], [1, 1, 1, 1]])
    with open(path, "ab") as f:  # a crash in the middle of a row
        f.write(b"\x00\x3c\x00")
    with RowStore(path, 4) as store:
        assert len(store) == 7
        assert path.stat().st_size == HEADER_SIZE + 7 * 8
        assert store.append(np.full((1, 4), 2.0)) == 7
        np.testing.assert_array_equal(store.get([7]), [[2, 2, 2, 2]])


def test_row_store_read_only(tmp_path: Path) -> None:
    path = tmp_path / "rows.f16"
    writer = RowStore(path, 4, tag=b"\x07")
    writer.append(np.arange(24, dtype=np.float32).reshape(6, 4))
    writer.flush()
    with open(path, "ab") as f:  # an append in progress: half a row
        f.write(b"\x00\x3c\x00")
    size = path.stat().st_size
    with pytest.raises(RowStoreError, match="does not exist"):
        RowStore(tmp_path / "missing.f16", 4, read_only=True)  # never created
    assert not (tmp_path / "missing.f16").exists()
    with pytest.raises(RowStoreError, match="another index"):
        RowStore(path, 4, tag=b"\x08", read_only=True)
    reader = RowStore(path, 4, tag=b"\x07", read_only=True)
    assert len(reader) == 6 and path.stat().st_size == size  # torn row ignored, not cut
    np.testing.assert_array_equal(reader.get([5]), [[20, 21, 22, 23]])
    for write in (
        lambda: reader.append(np.ones((1, 4))),
        reader.flush,
        lambda: reader.truncate(2),
    ):
        with pytest.raises(RowStoreError, match="read-only"):
            write()
    assert reader.refresh(upto=4) == 4  # capped at what the caller knows is committed
    with pytest.raises(RowStoreError, match="row 4 does not exist"):
        reader.get([4])
    writer.close()
    writer = RowStore(path, 4)  # the writer's open cuts the torn row; it appends more
    writer.append(np.full((2, 4), 7.0))
    writer.flush()
    assert reader.refresh() == 8
    np.testing.assert_array_equal(reader.get([7, 0]), [[7] * 4, [0, 1, 2, 3]])
    writer.close()
    reader.close()


# -- FAISS -----------------------------------------------------------------------------


def test_exact_while_small() -> None:
    xb, xq = clustered(800, 32), clustered(20, 32, seed=1)
    ids = np.arange(800) * 3 + 1
    index = VectorIndex(32, approx_threshold=1000)
    index.add(xb, ids)
    assert not index.is_approximate and index.description == "Flat"
    D, I = index.search(xq, 10)
    gt_D, gt_I = faiss.knn(xq, xb, 10, metric=faiss.METRIC_INNER_PRODUCT)
    np.testing.assert_array_equal(I, ids[gt_I])
    np.testing.assert_allclose(D, gt_D, rtol=1e-5)


def test_switches_to_approximate_past_the_threshold_with_good_recall() -> None:
    n, d = 20_000, 32
    xb, xq = clustered(n, d), clustered(200, d, seed=1)
    ids = np.arange(n, dtype=np.int64) + 100
    index = VectorIndex(d, approx_threshold=5_000)
    for lo in range(0, n, 2_500):  # grows past the threshold one batch at a time
        index.add(xb[lo : lo + 2_500], ids[lo : lo + 2_500])
        assert index.is_approximate == (lo + 2_500 >= 5_000)
    assert index.ntotal == n and index.description.startswith("IVF")
    assert sorted(index.ids().tolist()) == ids.tolist()
    _, gt = faiss.knn(xq, xb, 10, metric=faiss.METRIC_INNER_PRODUCT)
    _, I = index.search(xq, 10)
    assert recall_at(I, ids[gt]) >= 0.9


def test_user_factory_hnsw() -> None:
    n, d = 4_000, 32
    xb, xq = clustered(n, d), clustered(100, d, seed=1)
    index = VectorIndex(d, factory="HNSW32")
    index.add(xb, np.arange(n))
    assert index.is_approximate and index.description == "HNSW32"
    _, gt = faiss.knn(xq, xb, 10, metric=faiss.METRIC_INNER_PRODUCT)
    assert recall_at(index.search(xq, 10)[1], gt) >= 0.9
    assert index.remove_ids(np.arange(0, n, 2)) == n // 2  # HNSW cannot remove: rebuilt
    assert (index.search(xq, 10)[1] % 2 == 1).all()


@pytest.mark.parametrize("kind", ["exact", "ivf", "ivf-selector", "hnsw"])
def test_filtered_search_returns_k_allowed_results(kind: str) -> None:
    n, d, k = 12_000, 32, 10
    xb, xq = clustered(n, d), clustered(30, d, seed=2)
    ids = np.arange(n, dtype=np.int64) * 2
    index = VectorIndex(
        d,
        factory="HNSW32" if kind == "hnsw" else None,
        approx_threshold=1_000 if kind != "exact" else 50_000,
        exact_filter_limit=0 if kind == "ivf-selector" else 20_000,  # force the selector path
    )
    index.add(xb, ids)
    assert index.is_approximate == (kind != "exact")
    rng = np.random.default_rng(3)
    for size in (25, 3_000):  # very selective, then moderately
        rows = np.sort(rng.choice(n, size, replace=False))
        allowed = np.concatenate([ids[rows], [-5, 10**9]])  # ids not in the index are ignored
        D, I = index.search(xq, k, allowed_ids=allowed)
        assert (I >= 0).all(), "fewer than k results under a filter"
        assert np.isin(I, ids[rows]).all()
        _, gt = faiss.knn(xq, xb[rows], k, metric=faiss.METRIC_INNER_PRODUCT)
        if size == 25 or kind == "exact":
            np.testing.assert_array_equal(np.sort(I, axis=1), np.sort(ids[rows][gt], axis=1))
        else:
            assert recall_at(I, ids[rows][gt]) >= 0.9
    D, I = index.search(xq, k, allowed_ids=ids[:3])  # fewer allowed than k: -1 padding
    assert (I[:, :3] >= 0).all() and (I[:, 3:] == -1).all()


def test_remove_ids() -> None:
    xb = clustered(6_000, 16)
    for threshold in (100_000, 2_000):  # Flat, then IVF
        index = VectorIndex(16, approx_threshold=threshold)
        index.add(xb, np.arange(6_000))
        assert index.remove_ids(np.arange(0, 6_000, 3)) == 2_000
        assert index.remove_ids([0, 3]) == 0  # already gone
        assert index.ntotal == 4_000
        _, I = index.search(xb[:50], 20)
        assert (I % 3 != 0).all()


def test_save_is_atomic_and_load_checks(tmp_path: Path) -> None:
    path = tmp_path / "v.faiss"
    xb = clustered(3_000, 16)
    index = VectorIndex(16, approx_threshold=1_000)
    index.add(xb, np.arange(3_000) + 7)
    index.meta = {"rows": 3_007}
    Path(str(path) + ".tmp").write_bytes(b"half-written garbage from a crash")
    index.save(path)
    assert not Path(str(path) + ".tmp").exists()
    Path(str(path) + ".tmp").write_bytes(b"another crash, after the last save")
    loaded = VectorIndex.load(path)  # the leftover .tmp is ignored
    assert loaded.meta == {"rows": 3_007} and loaded.ntotal == 3_000
    assert loaded.description == index.description
    np.testing.assert_array_equal(loaded.search(xb[:20], 5)[1], index.search(xb[:20], 5)[1])
    path.write_bytes(path.read_bytes()[:1000])  # damaged
    with pytest.raises(IndexStoreError, match="damaged"):
        VectorIndex.load(path)
    with pytest.raises(IndexStoreError):
        VectorIndex.load(tmp_path / "missing.faiss")


# -- IndexStore ------------------------------------------------------------------------


def test_index_store_add_remove_reopen(db_url: str, tmp_path: Path) -> None:
    folder = tmp_path / "idx"
    with IndexStore(folder, db_url) as store:
        assert store.layout is None
        store.set_model(CONFIG, WEIGHTS, LAYOUT)
        a = add(store, "/v/a.mp4", 4, seed=1)
        b = add(store, "/v/b.mp4", 3, seed=2)
        c = add(store, "/v/c.mp4", 5, seed=3)
        assert store.stats().rows == 12
        emb_b, rerank_b = video_rows(3, seed=2)
        _, I = store.search(emb_b, 1)
        assert I[:, 0].tolist() == [4, 5, 6]
        meta = store.segments([5, -1, 999])
        assert list(meta) == [5]
        seg = meta[5]
        assert (seg.path, seg.video_id, seg.start_s, seg.end_s) == ("/v/b.mp4", b, 2.0, 4.0)
        np.testing.assert_allclose(store.rerank_states([4, 5, 6]), rerank_b, atol=2e-3)
        assert store.mark_removed(b) == 3
        _, I = store.search(emb_b, 12)
        assert not np.isin(I, [4, 5, 6]).any()
        assert store.segment_ids(path_prefix="/v/c").tolist() == [7, 8, 9, 10, 11]
        assert_consistent(store, db_url)
    with IndexStore(folder, db_url) as store:
        assert_consistent(store, db_url)
        known = store.known_videos()
        assert known["/v/b.mp4"].status == "removed"
        assert known["/v/a.mp4"] == (1001, 1.5, "f" * 64, "indexed")
        # A changed file is re-indexed in place: same video id, new rows, old ones removed.
        assert add(store, "/v/a.mp4", 2, seed=4, fingerprint="e" * 64) == a
        assert store.segment_ids(path_prefix="/v/a").tolist() == [12, 13]
        # A failure takes the video out of search and is reported.
        error = "decoder: moov atom not found"
        assert store.mark_failed("/v/c.mp4", error, (5, 1.0), "d" * 64) == c
        store.mark_failed("/v/bad.mp4", "unreadable")
        stats = store.stats()
        assert stats.videos == {"indexed": 1, "failed": 2, "removed": 1}
        assert (stats.segments, stats.removed_segments, stats.rows, stats.vectors) == (2, 12, 14, 2)
        assert {p for p, _ in stats.recent_failures} == {"/v/c.mp4", "/v/bad.mp4"}
        assert stats.bytes[EMBEDDINGS_FILE] == HEADER_SIZE + 14 * D_EMB * 2
        assert_consistent(store, db_url)
    with IndexStore(folder, db_url) as store:
        assert_consistent(store, db_url)
        assert store.known_videos()["/v/c.mp4"] == (5, 1.0, "d" * 64, "failed")


def test_index_store_model_checks_and_latents(db_url: str, tmp_path: Path) -> None:
    layout = IndexLayout(D_EMB, D_RERANK, latent_shape=(4, 6))
    with IndexStore(tmp_path / "idx", db_url) as store:
        with pytest.raises(IndexStoreError, match="no model"):
            add(store, "/v/a.mp4", 2, seed=1)
        store.set_model(CONFIG, WEIGHTS, LAYOUT)
        store.set_model(CONFIG, WEIGHTS, layout)  # still empty: the layout may change
        emb, rerank = video_rows(2, seed=1)
        latents = np.random.default_rng(0).normal(size=(2, 4, 6)).astype(np.float32)
        with pytest.raises(ValueError, match="keeps latents"):
            store.add_video("/v/a.mp4", (1, 1.0), "f", VideoInfo(), [(0, 1), (1, 2)], emb, rerank)
        spans = [(0, 1), (1, 2)]
        store.add_video("/v/a.mp4", (1, 1.0), "f", VideoInfo(), spans, emb, rerank, latents)
        np.testing.assert_allclose(store.latents([1, 0]), latents[[1, 0]], atol=2e-3)
        store.check_model('{"latents": 32, "hidden": 192}', WEIGHTS)  # same JSON, other order
        with pytest.raises(ModelMismatchError, match=r"hidden \(192 vs 768\)"):
            store.check_model('{"hidden": 768, "latents": 32}', WEIGHTS)
        with pytest.raises(ModelMismatchError, match="weights fingerprint"):
            store.check_model(CONFIG, "b" * 64)
        with pytest.raises(ModelMismatchError):
            store.set_model(CONFIG, WEIGHTS, LAYOUT)  # not empty any more: widths are fixed
        store.set_model(CONFIG, WEIGHTS, IndexLayout(D_EMB, D_RERANK, (4, 6), "HNSW32"))
        assert store.stats().faiss == "HNSW32"
        assert_consistent(store, db_url)


def test_one_writer_and_matching_folder(db_url: str, tmp_path: Path) -> None:
    folder = tmp_path / "idx"
    with IndexStore(folder, db_url) as store:
        store.set_model(CONFIG, WEIGHTS, LAYOUT)
        add(store, "/v/a.mp4", 2, seed=1)
        with pytest.raises(IndexLockedError, match="another process"):
            IndexStore(folder, db_url)
    # The same folder with another (fresh) database: refused, nothing truncated or deleted.
    size = (folder / EMBEDDINGS_FILE).stat().st_size
    with pytest.raises(IndexStoreError, match="another index"):
        IndexStore(folder, f"sqlite:///{tmp_path / 'other.sqlite'}")
    assert (folder / EMBEDDINGS_FILE).stat().st_size == size
    # A store that lost committed rows is damage, not a crash: refused, not "repaired".
    with open(folder / RERANK_FILE, "r+b") as f:
        f.truncate(HEADER_SIZE + D_RERANK * 2)
    with pytest.raises(IndexStoreError, match="lost data"):
        IndexStore(folder, db_url)


def test_faiss_file_is_derived(db_url: str, tmp_path: Path) -> None:
    folder = tmp_path / "idx"
    with IndexStore(folder, db_url) as store:
        store.set_model(CONFIG, WEIGHTS, LAYOUT)
        for i in range(4):
            add(store, f"/v/{i}.mp4", 3, seed=i)
        store.mark_removed("/v/1.mp4")
    (folder / FAISS_FILE).write_bytes(b"PVLFAISS garbage")
    with IndexStore(folder, db_url) as store:  # damaged: rebuilt from the embedding store
        assert_consistent(store, db_url)
    (folder / FAISS_FILE).unlink()
    with IndexStore(folder, db_url) as store:  # missing: rebuilt too
        assert_consistent(store, db_url)
        assert store.vectors.ntotal == 9


# -- crash recovery: a child process SIGKILLed inside each crash window -----------------

CHILD = """
import sys
import numpy as np
from indexer.index_store import IndexStore, VideoInfo
folder, url, op = sys.argv[1:4]
store = IndexStore(folder, url)
if op == "add":
    rng = np.random.default_rng(99)
    emb = rng.normal(size=(3, 16)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    store.add_video("/v/new.mp4", (7, 7.0), "n" * 64, VideoInfo(), [(0, 1), (1, 2), (2, 3)],
                    emb, rng.normal(size=(3, 10)))
else:
    store.mark_removed("/v/a.mp4")
store.close()
"""


def start_paused(folder: Path, db_url: str, op: str, stage: str, log: Path) -> subprocess.Popen:
    """A child writer running `op`, stopped (SIGSTOP, still alive, lock held) at `stage`."""
    env = {**os.environ, PAUSE_ENV: stage, "PYTHONPATH": str(REPO)}
    with open(log, "wb") as err:
        cmd = [sys.executable, "-c", CHILD, str(folder), db_url, op]
        proc = subprocess.Popen(cmd, env=env, stderr=err)
    deadline = time.monotonic() + 120
    status = 0
    while time.monotonic() < deadline:
        pid, status = os.waitpid(proc.pid, os.WNOHANG | os.WUNTRACED)
        if pid:
            break
        time.sleep(0.02)
    else:
        proc.kill()
        pytest.fail(f"child never reached {stage}")
    assert os.WIFSTOPPED(status), f"child ended before {stage}:\n{log.read_text()}"
    return proc


def kill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)  # the crash, inside the window
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


def run_until_killed(folder: Path, db_url: str, op: str, stage: str, log: Path) -> None:
    kill(start_paused(folder, db_url, op, stage, log))


@pytest.mark.parametrize(
    ("op", "stage"),
    [("add", "stores_appended"), ("add", "sql_committed"), ("remove", "sql_committed")],
)
def test_recovers_from_sigkill(db_url: str, tmp_path: Path, op: str, stage: str) -> None:
    folder = tmp_path / "idx"
    with IndexStore(folder, db_url) as store:
        store.set_model(CONFIG, WEIGHTS, LAYOUT)
        add(store, "/v/a.mp4", 4, seed=1)
        add(store, "/v/b.mp4", 3, seed=2)
    run_until_killed(folder, db_url, op, stage, tmp_path / "child.log")

    # The crash really happened inside the window.
    faiss_file = VectorIndex.load(folder / FAISS_FILE)
    assert faiss_file.meta["rows"] == 7 and faiss_file.ntotal == 7  # never saved by the child
    store_bytes = (folder / EMBEDDINGS_FILE).stat().st_size
    assert store_bytes == HEADER_SIZE + (10 if op == "add" else 7) * D_EMB * 2

    with IndexStore(folder, db_url) as store:
        assert_consistent(store, db_url)
        known = store.known_videos()
        if stage == "stores_appended":  # never committed: as if it never happened
            assert "/v/new.mp4" not in known and store.stats().rows == 7
        elif op == "add":  # committed: kept, searchable, not to be redone
            assert known["/v/new.mp4"].status == "indexed"
            assert store.vectors.ntotal == 10
        else:
            assert known["/v/a.mp4"].status == "removed" and store.vectors.ntotal == 3
        # Work goes on with the next row ids, with no gap and nothing twice.
        rows = store.stats().rows
        add(store, "/v/after.mp4", 2, seed=5)
        assert store.segment_ids(path_prefix="/v/after").tolist() == [rows, rows + 1]
        assert_consistent(store, db_url)
    with IndexStore(folder, db_url) as store:
        assert_consistent(store, db_url)
        assert VectorIndex.load(folder / FAISS_FILE).meta["rows"] == store.stats().rows


def test_fingerprint_file(tmp_path: Path) -> None:
    path = tmp_path / "v.bin"
    path.write_bytes(os.urandom(3 << 20))
    first = fingerprint_file(path)
    assert len(first) == 64 and first == fingerprint_file(path)
    with open(path, "r+b") as f:  # a change in the last MiB changes it
        f.seek((3 << 20) - 10)
        f.write(b"x")
    assert fingerprint_file(path) != first


# -- read-only opens (searchers) ---------------------------------------------------------


def folder_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def assert_untouched(root: Path, before: dict[str, str]) -> None:
    """Every file is byte-identical; the only new files may be SQLite's own -wal (empty)
    and -shm, which any connection to a WAL database creates."""
    after = folder_hashes(root)
    assert {k: after.get(k) for k in before} == before
    new = set(after) - set(before)
    assert all(name.endswith(("-wal", "-shm")) for name in new), new
    for name in new:
        if name.endswith("-wal"):
            assert (root / name).stat().st_size == 0


def build_index(folder: Path, db_url: str) -> None:
    with IndexStore(folder, db_url) as store:
        store.set_model(CONFIG, WEIGHTS, LAYOUT)
        add(store, "/v/a.mp4", 4, seed=1)  # ids 0-3
        add(store, "/v/b.mp4", 3, seed=2)  # ids 4-6


def live_ids(store: IndexStore) -> list[int]:
    return sorted(store.vectors.ids().tolist())


def test_readers_alongside_a_writer(db_url: str, tmp_path: Path) -> None:
    folder = tmp_path / "idx"
    writer = IndexStore(folder, db_url)
    writer.set_model(CONFIG, WEIGHTS, LAYOUT)
    add(writer, "/v/a.mp4", 4, seed=1)
    add(writer, "/v/b.mp4", 3, seed=2)
    writer.save_faiss()
    # The writer holds the lock (the same process cannot open a second writer either).
    with pytest.raises(IndexLockedError):
        IndexStore(folder, db_url)
    first = IndexStore(folder, db_url, read_only=True)
    second = IndexStore(folder, db_url, read_only=True)  # several readers at once
    for reader in (first, second):
        assert reader.stats().rows == 7 and live_ids(reader) == list(range(7))
        assert set(reader.known_videos()) == {"/v/a.mp4", "/v/b.mp4"}
        emb_b, rerank_b = video_rows(3, seed=2)
        _, I = reader.search(emb_b, 1)
        assert I[:, 0].tolist() == [4, 5, 6]
        assert reader.segments([5])[5].path == "/v/b.mp4"
        np.testing.assert_allclose(reader.rerank_states([4, 5, 6]), rerank_b, atol=2e-3)
        assert_consistent(reader, db_url)
        assert reader.refresh() is False  # nothing new
    # The writer goes on; readers see it on refresh, not before.
    add(writer, "/v/c.mp4", 2, seed=3)  # ids 7-8
    emb_c, _ = video_rows(2, seed=3)
    assert first.stats().rows == 7 and not np.isin(first.search(emb_c, 9)[1], [7, 8]).any()
    with pytest.raises(IndexStoreError, match=r"\[0, 7\)"):
        first.embeddings([7])  # not committed as far as this reader knows
    assert first.refresh() is True and first.refresh() is False
    assert first.search(emb_c, 1)[1][:, 0].tolist() == [7, 8]
    assert_consistent(first, db_url)
    writer.mark_removed("/v/a.mp4")
    writer.mark_failed("/v/b.mp4", "gone bad")
    assert first.refresh() is True
    assert live_ids(first) == [7, 8]
    assert first.known_videos()["/v/b.mp4"].status == "failed"
    assert_consistent(first, db_url)
    assert second.refresh() is True  # several changes at once, from the FAISS it had
    assert live_ids(second) == [7, 8]
    assert_consistent(second, db_url)
    # Readers hold no lock: with them open, the writer closes and a new one opens.
    writer.close()
    with IndexStore(folder, db_url) as writer:
        add(writer, "/v/d.mp4", 1, seed=4)  # id 9
    assert second.refresh() is True and live_ids(second) == [7, 8, 9]
    first.close()
    second.close()


def test_readers_write_nothing(db_url: str, tmp_path: Path) -> None:
    folder = tmp_path / "idx"
    with IndexStore(folder, db_url) as store:
        store.set_model(CONFIG, WEIGHTS, LAYOUT)
        add(store, "/v/a.mp4", 4, seed=1)
        add(store, "/v/b.mp4", 3, seed=2)
        store.save_faiss()
        stale = (folder / FAISS_FILE).read_bytes()  # 7 rows, removal_seq 0
        add(store, "/v/c.mp4", 5, seed=3)
        store.mark_removed("/v/b.mp4")
    # Rows of an append that never committed, the last one torn: a reader must not read
    # them, nor cut them off (that is the next writer's recovery).
    with open(folder / EMBEDDINGS_FILE, "ab") as f:
        f.write(b"\x00\x3c" * (D_EMB + 3))
    cases = {
        "current": lambda: None,
        "stale": lambda: (folder / FAISS_FILE).write_bytes(stale),
        "damaged": lambda: (folder / FAISS_FILE).write_bytes(b"PVLFAISS garbage"),
        "missing": lambda: (folder / FAISS_FILE).unlink(),
    }
    for case, prepare in cases.items():
        prepare()
        before = folder_hashes(tmp_path)
        with IndexStore(folder, db_url, read_only=True) as reader:
            assert reader.stats().rows == 12, case
            assert live_ids(reader) == [0, 1, 2, 3, 7, 8, 9, 10, 11], case
            assert_consistent(reader, db_url)
            assert reader.refresh() is False
        assert_untouched(tmp_path, before)
    assert not (folder / FAISS_FILE).exists()


def test_read_only_refuses_writes(db_url: str, tmp_path: Path) -> None:
    folder = tmp_path / "idx"
    build_index(folder, db_url)
    (folder / FAISS_FILE).unlink()  # the reader builds FAISS in memory: it is "dirty"
    emb, rerank = video_rows(1, seed=9)
    with IndexStore(folder, db_url, read_only=True) as reader:
        writes = {
            "add_video": lambda: reader.add_video(
                "/v/x.mp4", (1, 1.0), "x", VideoInfo(), [(0, 1)], emb, rerank
            ),
            "mark_failed": lambda: reader.mark_failed("/v/a.mp4", "no"),
            "mark_removed": lambda: reader.mark_removed("/v/a.mp4"),
            "set_model": lambda: reader.set_model(CONFIG, WEIGHTS, LAYOUT),
            "save_faiss": reader.save_faiss,
        }
        for name, write in writes.items():
            with pytest.raises(IndexStoreError, match="index opened read-only"):
                write()
        assert {p: v.status for p, v in reader.known_videos().items()} == {
            "/v/a.mp4": "indexed",
            "/v/b.mp4": "indexed",
        }
        reader.check_model(CONFIG, WEIGHTS)  # reads are fine
    assert not (folder / FAISS_FILE).exists()


def test_read_only_open_of_no_index(db_url: str, tmp_path: Path) -> None:
    missing = tmp_path / "nothing"
    with pytest.raises(IndexStoreError, match=r"no index at .*nothing \(run `pvl-search index`"):
        IndexStore(missing, read_only=True)
    assert not missing.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(IndexStoreError, match="no index at"):
        IndexStore(empty, read_only=True)  # default database: index.sqlite in the folder
    with pytest.raises(IndexStoreError, match="no index at"):
        IndexStore(empty, db_url, read_only=True)  # an empty database
    assert list(empty.iterdir()) == []
    url = make_url(db_url)
    if url.get_backend_name() == "sqlite":
        assert not Path(url.database).exists()
    else:  # nothing created in the database either
        engine = create_engine(db_url)
        assert inspect(engine).get_table_names() == []
        engine.dispose()
    # An index whose model is not set yet holds nothing to search either.
    with IndexStore(tmp_path / "idx", db_url):
        pass
    with pytest.raises(IndexStoreError, match="no index at"):
        IndexStore(tmp_path / "idx", db_url, read_only=True)


def test_read_only_open_does_not_migrate(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    build_index(tmp_path / "idx", db_url)

    class NewerScripts:  # this version knows a revision past the database's
        @staticmethod
        def from_config(_cfg: object) -> NewerScripts:
            return NewerScripts()

        def get_current_head(self) -> str:
            return "0002_future"

        def walk_revisions(self) -> list[object]:
            return [type("Rev", (), {"revision": r}) for r in (head_revision(), "0002_future")]

    monkeypatch.setattr(index_store_module, "ScriptDirectory", NewerScripts)
    with pytest.raises(IndexStoreError, match="open it for writing first") as raised:
        IndexStore(tmp_path / "idx", db_url, read_only=True)
    assert not isinstance(raised.value, SchemaTooNewError)
    engine = create_engine(db_url)
    with engine.connect() as conn:
        assert current_revisions(conn) == (head_revision(),)
    engine.dispose()


def test_reader_refresh_follows_a_new_layout(db_url: str, tmp_path: Path) -> None:
    folder = tmp_path / "idx"
    with IndexStore(folder, db_url) as writer:
        writer.set_model(CONFIG, WEIGHTS, LAYOUT)
        with IndexStore(folder, db_url, read_only=True) as reader:  # a model, no segments
            assert reader.stats().rows == 0 and reader.search(np.ones(D_EMB), 3)[1].max() == -1
            wide = IndexLayout(D_EMB, D_RERANK + 2)  # still empty: the layout may change
            writer.set_model(CONFIG, WEIGHTS, wide)
            emb, _ = video_rows(2, seed=1)
            spans = [(0, 1), (1, 2)]
            writer.add_video("/v/a.mp4", (1, 1.0), "f", VideoInfo(), spans, emb, np.ones((2, 12)))
            assert reader.refresh() is True
            assert reader.layout == wide and reader.rerank_states([1]).shape == (1, 12)
            assert_consistent(reader, db_url)


@pytest.mark.parametrize("stage", ["stores_appended", "sql_committed"])
def test_readers_while_a_writer_process_is_stopped(db_url: str, tmp_path: Path, stage: str) -> None:
    folder = tmp_path / "idx"
    build_index(folder, db_url)
    old = IndexStore(folder, db_url, read_only=True)
    child = start_paused(folder, db_url, "add", stage, tmp_path / "child.log")
    try:
        with pytest.raises(IndexLockedError):  # the child really holds the index
            IndexStore(folder, db_url)
        # Its rows are on disk (stores_appended) or committed too, FAISS file not saved.
        assert (folder / EMBEDDINGS_FILE).stat().st_size == HEADER_SIZE + 10 * D_EMB * 2
        committed = stage == "sql_committed"
        with IndexStore(folder, db_url, read_only=True) as new:
            assert new.stats().rows == (10 if committed else 7)
            assert ("/v/new.mp4" in new.known_videos()) == committed
            assert len(new.embedding_store) == new.stats().rows
            assert_consistent(new, db_url)
        assert old.refresh() is committed
        assert old.stats().rows == (10 if committed else 7)
        assert_consistent(old, db_url)
    finally:
        kill(child)
    with IndexStore(folder, db_url) as writer:  # recovery cuts uncommitted rows: harmless
        add(writer, "/v/after.mp4", 2, seed=5)
    rows = 12 if committed else 9
    assert old.refresh() is True and old.stats().rows == rows
    assert_consistent(old, db_url)
    old.close()
