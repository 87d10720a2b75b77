"""Read-only opens (searchers) beside a writer, on a real SQLite file and a real PostgreSQL
server: they write nothing, follow commits and survive a stopped writer."""


from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import create_engine, inspect
from sqlalchemy.engine import make_url
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

import indexer.store.index_reader as index_reader_module
from indexer.errors import (
    IndexLockedError,
    IndexStoreError,
    SchemaTooNewError,
)
from indexer.store.database import current_revisions, head_revision
from indexer.store.index_reader import IndexReader
from indexer.store.index_store import IndexStore
from indexer.store.records import (
    EMBEDDINGS_FILE,
    FAISS_FILE,
    IndexLayout,
    VideoMeta,
)
from indexer.store.row_store import HEADER_SIZE

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


def live_ids(store: IndexStore) -> list[int]:
    return sorted(store.vectors.ids().tolist())


def test_readers_alongside_a_writer(db_url: str, tmp_path: Path) -> None:
    folder = tmp_path / "idx"
    writer = IndexStore(folder, db_url)
    writer.set_model(CONFIG, WEIGHTS, LAYOUT)
    add(writer, "/v/a.mp4", 4, seed=1)
    add(writer, "/v/b.mp4", 3, seed=2)
    writer.save_vectors()
    # The writer holds the lock (the same process cannot open a second writer either).
    with pytest.raises(IndexLockedError):
        IndexStore(folder, db_url)
    first = IndexReader(folder, db_url)
    second = IndexReader(folder, db_url)  # several readers at once
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
    assert len(first.video_segments([3])[3].ids) == 0  # c's rows: not committed for this view yet
    assert first.refresh() is True and first.refresh() is False
    assert first.search(emb_c, 1)[1][:, 0].tolist() == [7, 8]
    assert first.video_segments([3])[3].ids.tolist() == [7, 8]  # the view moved: read again
    assert_consistent(first, db_url)
    writer.mark_removed("/v/a.mp4")
    writer.mark_failed("/v/b.mp4", "gone bad")
    assert first.refresh() is True
    assert live_ids(first) == [7, 8]
    # Segment rows it read before (and kept: IndexReader.segments) follow the removals.
    assert first.segments([0, 5, 7]).keys() == {0, 5, 7}
    assert first.segments([0])[0].removed and first.segments([5])[5].removed and not first.segments([7])[7].removed
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
        store.save_vectors()
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
        with IndexReader(folder, db_url) as reader:
            assert reader.stats().rows == 12, case
            assert live_ids(reader) == [0, 1, 2, 3, 7, 8, 9, 10, 11], case
            assert_consistent(reader, db_url)
            assert reader.refresh() is False
        assert_untouched(tmp_path, before)
    assert not (folder / FAISS_FILE).exists()


def test_a_reader_has_no_writes_and_writes_nothing(db_url: str, tmp_path: Path) -> None:
    folder = tmp_path / "idx"
    build_index(folder, db_url)
    (folder / FAISS_FILE).unlink()  # the reader builds FAISS in memory: it is "dirty"
    writes = ("add_video", "mark_failed", "mark_removed", "set_model", "record_dtype", "save_vectors",
              "rebuild_vectors", "sync_thumbnails")
    assert all(callable(getattr(IndexStore, name)) for name in writes)
    with IndexReader(folder, db_url) as reader:
        assert not [name for name in writes if hasattr(reader, name)]  # by construction: the class has none
        assert {p: v.status for p, v in reader.known_videos().items()} == {
            "/v/a.mp4": "indexed",
            "/v/b.mp4": "indexed",
        }
        reader.check_model(CONFIG, WEIGHTS)  # reads are fine
    assert not (folder / FAISS_FILE).exists()


def test_read_only_open_of_no_index(db_url: str, tmp_path: Path) -> None:
    missing = tmp_path / "nothing"
    with pytest.raises(IndexStoreError, match=r"no index at .*nothing \(run `pvl-search index`"):
        IndexReader(missing)
    assert not missing.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(IndexStoreError, match="no index at"):
        IndexReader(empty)  # default database: index.sqlite in the folder
    with pytest.raises(IndexStoreError, match="no index at"):
        IndexReader(empty, db_url)  # an empty database
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
        IndexReader(tmp_path / "idx", db_url)


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

    monkeypatch.setattr(index_reader_module, "ScriptDirectory", NewerScripts)
    with pytest.raises(IndexStoreError, match="open it for writing first") as raised:
        IndexReader(tmp_path / "idx", db_url)
    assert not isinstance(raised.value, SchemaTooNewError)
    engine = create_engine(db_url)
    with engine.connect() as conn:
        assert current_revisions(conn) == (head_revision(),)
    engine.dispose()


def test_reader_refresh_follows_a_new_layout(db_url: str, tmp_path: Path) -> None:
    folder = tmp_path / "idx"
    with IndexStore(folder, db_url) as writer:
        writer.set_model(CONFIG, WEIGHTS, LAYOUT)
        with IndexReader(folder, db_url) as reader:  # a model, no segments
            assert reader.stats().rows == 0 and reader.search(np.ones(D_EMB), 3)[1].max() == -1
            wide = IndexLayout(D_EMB, D_RERANK + 2)  # still empty: the layout may change
            writer.set_model(CONFIG, WEIGHTS, wide)
            emb, _ = video_rows(2, seed=1)
            spans = [(0, 1), (1, 2)]
            writer.add_video("/v/a.mp4", (1, 1.0), "f", VideoMeta(), spans, emb, np.ones((2, 12)))
            assert reader.refresh() is True
            assert reader.layout == wide and reader.rerank_states([1]).shape == (1, 12)
            assert_consistent(reader, db_url)


@pytest.mark.parametrize("stage", ["stores_appended", "sql_committed"])
def test_readers_while_a_writer_process_is_stopped(db_url: str, tmp_path: Path, stage: str) -> None:
    folder = tmp_path / "idx"
    build_index(folder, db_url)
    old = IndexReader(folder, db_url)
    child = start_paused(folder, db_url, "add", stage, tmp_path / "child.log")
    try:
        with pytest.raises(IndexLockedError):  # the child really holds the index
            IndexStore(folder, db_url)
        # Its rows are on disk (stores_appended) or committed too, FAISS file not saved.
        assert (folder / EMBEDDINGS_FILE).stat().st_size == HEADER_SIZE + 10 * D_EMB * 2
        committed = stage == "sql_committed"
        with IndexReader(folder, db_url) as new:
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
