"""Storage layer on a real SQLite file, a real PostgreSQL server and real files: migrations,
and IndexStore consistency across SIGKILLs."""


from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from index_helpers import ids_of
from sqlalchemy import create_engine, inspect, text
from store_helpers import (
    CONFIG,
    D_EMB,
    D_RERANK,
    LAYOUT,
    WEIGHTS,
    add,
    assert_consistent,
    build_index,
    kill,
    start_paused,
    video_rows,
)

from indexer.errors import (
    IndexLockedError,
    IndexStoreError,
    ModelMismatchError,
    SchemaTooNewError,
)
from indexer.store.database import alembic_config, current_revisions, head_revision, open_database
from indexer.store.index_reader import IndexReader
from indexer.store.index_store import IndexStore
from indexer.store.records import (
    EMBEDDINGS_FILE,
    FAISS_FILE,
    RERANK_FILE,
    IndexLayout,
    VideoMeta,
    fingerprint_file,
)
from indexer.store.row_store import HEADER_SIZE
from indexer.store.schema import Base
from indexer.store.vectors.faiss_index import VectorIndex

# -- migrations ------------------------------------------------------------------------


def test_migrates_an_empty_database_to_head(db_url: str) -> None:
    db = open_database(db_url)
    try:
        tables = set(inspect(db.engine).get_table_names())
        assert {"videos", "segments", "index_info", "alembic_version"} <= tables and "captions" not in tables
        with db.engine.connect() as conn:
            assert current_revisions(conn) == (head_revision(),)
            # The migration creates exactly what the models describe.
            assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
    finally:
        db.close()
    open_database(db_url).close()  # a second open is a no-op upgrade


def test_upgrades_an_index_of_the_previous_schema(db_url: str, tmp_path: Path) -> None:
    """An index written at revision 0003 (the release before the captions table was dropped,
    captions rows included) opens at head with every segment, vector and search answer."""
    folder = tmp_path / "idx"
    build_index(folder, db_url)
    with IndexReader(folder, db_url) as reader:
        before = reader.stats(), reader.segments(reader.segment_ids())
    engine = create_engine(db_url)
    with engine.begin() as conn:
        command.downgrade(alembic_config(conn), "0003")
        conn.execute(text("INSERT INTO captions (id, video_id, text, split) VALUES (1, 1, 'a caption', 'test')"))
    engine.dispose()
    with IndexStore(folder, db_url) as store:  # a writer's open migrates
        stats, segments = store.stats(), store.segments(store.segment_ids())
        assert (stats.segments, stats.vectors, segments) == (before[0].segments, before[0].vectors, before[1])
    engine = create_engine(db_url)
    with engine.connect() as conn:
        assert current_revisions(conn) == (head_revision(),)
        assert "captions" not in inspect(conn).get_table_names()
    engine.dispose()


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
        IndexReader(tmp_path / "idx", db_url)


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
        assert ids_of(store, "/v/c") == [7, 8, 9, 10, 11]
        assert_consistent(store, db_url)
    with IndexStore(folder, db_url) as store:
        assert_consistent(store, db_url)
        known = store.known_videos()
        assert known["/v/b.mp4"].status == "removed"
        assert known["/v/a.mp4"] == (1001, 1.5, "f" * 64, "indexed")
        # A changed file is re-indexed in place: same video id, new rows, old ones removed.
        assert add(store, "/v/a.mp4", 2, seed=4, fingerprint="e" * 64) == a
        assert ids_of(store, "/v/a") == [12, 13]
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
            store.add_video("/v/a.mp4", (1, 1.0), "f", VideoMeta(), [(0, 1), (1, 2)], emb, rerank)
        spans = [(0, 1), (1, 2)]
        store.add_video("/v/a.mp4", (1, 1.0), "f", VideoMeta(), spans, emb, rerank, latents)
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
        assert ids_of(store, "/v/after") == [rows, rows + 1]
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
