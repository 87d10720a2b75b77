"""Shared by the storage tests: a small fake model identity and layout, deterministic rows,
the consistency check every crash test ends with, and a child process paused in a crash window."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
from index_helpers import wait_until_stopped
from sqlalchemy import create_engine, select

from indexer.store.index_store import IndexStore
from indexer.store.records import PAUSE_ENV, IndexLayout, VideoMeta
from indexer.store.schema import IndexInfo, Segment, Video

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
    info = VideoMeta(duration=6.0, fps=25.0, width=64, height=48)
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


CHILD = """
import sys
import numpy as np
from indexer.store.records import VideoMeta
from indexer.store.index_store import IndexStore
folder, url, op = sys.argv[1:4]
store = IndexStore(folder, url)
if op == "add":
    rng = np.random.default_rng(99)
    emb = rng.normal(size=(3, 16)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    store.add_video("/v/new.mp4", (7, 7.0), "n" * 64, VideoMeta(), [(0, 1), (1, 2), (2, 3)],
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
    wait_until_stopped(proc, log, stage)
    return proc


def kill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)  # the crash, inside the window
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


def build_index(folder: Path, db_url: str) -> None:
    with IndexStore(folder, db_url) as store:
        store.set_model(CONFIG, WEIGHTS, LAYOUT)
        add(store, "/v/a.mp4", 4, seed=1)  # ids 0-3
        add(store, "/v/b.mp4", 3, seed=2)  # ids 4-6
