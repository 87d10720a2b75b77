"""Reranking evaluation: the rank logic on hand-made scores, then a tiny real index (random
small model, real encoded videos, real SQLite + FAISS) where evaluate_index's ranks must equal
a direct computation and the ranks `Searcher.search` gives."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from indexer.encoding import ModelRunner
from indexer.evaluate.driver import evaluate_index
from indexer.evaluate.plot import plot_report
from indexer.evaluate.report import EXHAUSTIVE, MIXED, MULTI, ROW_HEADER, SINGLE, EvalError, EvalProgress, EvalReport
from indexer.ingest.pipeline import IndexOptions, build_index
from indexer.search.searcher import Searcher
from indexer.store.index_reader import IndexReader
from indexer.store.index_store import IndexStore
from indexer.store.records import FAISS_FILE
from pvl_search.media.sample_files import write_video
from pvl_search.model.checkpoint import save_model
from pvl_search.model.config import preset
from pvl_search.model.perceiver import PerceiverVL

# ------------------------------------------------------------------ a tiny real index

COLOURS = [(220, 30, 30), (30, 200, 40), (40, 60, 230), (240, 220, 30), (20, 20, 20), (230, 230, 230)]
SECONDS = [2.0, 3.0, 2.0, 1.0, 3.0, 2.0]  # 1 s windows: 1 to 3 segments per video
CAPTIONS = [
    ["a red screen", "something red fills the frame"],
    ["green stripes moving right"],
    ["a blue square in the corner", "blue"],
    ["yellow flashes"],
    ["a dark night scene"],
    ["white bars across the picture", "bright white light"],
]
KS = (1, 2, 4, 8, 64)


def frame_fn(video: int):
    colour = np.array(COLOURS[video], dtype=np.uint8)

    def draw(i: int, width: int, height: int) -> np.ndarray:
        frame = np.full((height, width, 3), 128, dtype=np.uint8)
        if video % 3 == 0:
            frame[:] = colour
        elif video % 3 == 1:
            frame[:, (np.arange(width) + 6 * i) % 16 < 8] = colour  # moving stripes
        else:
            frame[: height // 2 + 2 * i, : width // 2] = colour  # a growing block
        return frame

    return draw


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("eval")
    torch.manual_seed(0)
    config = preset("tiny").replace(hidden=64, heads=4, latents=8, frame_size=32, patch=8, frames=4, token_dim=16)
    model_dir = root / "model"
    save_model(PerceiverVL(config), model_dir)
    videos = root / "videos"
    videos.mkdir()
    paths = [
        write_video(videos / f"v{i}.mp4", frame_fn=frame_fn(i), seconds=SECONDS[i], fps=4, width=48, height=40)
        for i in range(len(COLOURS))
    ]
    runner = ModelRunner.from_folder(model_dir, device="cpu")
    index = root / "index"
    with IndexStore(index) as store:
        summary = build_index([videos], store, runner, IndexOptions(window_s=1.0, stride_s=1.0, workers=1))
    assert summary.indexed == len(paths) and not summary.failed
    entries = [
        {"video_id": f"v{i}", "path": f"videos/v{i}.mp4", "split": "test", "captions": CAPTIONS[i],
         "meta": {"factors": (["order"] if i % 2 else []) + (["heldout"] if i < 2 else [])}}
        for i in range(len(paths))
    ]
    entries.append({"video_id": "train0", "path": "videos/v0.mp4", "split": "train", "captions": ["not a query"]})
    entries.append({"video_id": "gone", "path": "videos/gone.mp4", "split": "test", "captions": ["never indexed"]})
    captions = root / "captions.json"
    captions.write_text(json.dumps({"videos": entries}))
    return {"root": root, "index": index, "runner": runner, "captions": captions, "paths": paths}


@pytest.fixture(scope="module")
def report(corpus: dict) -> EvalReport:
    seen: list[EvalProgress] = []
    with Searcher(corpus["index"], runner=corpus["runner"]) as searcher:
        result = evaluate_index(searcher, corpus["captions"], rerank_ks=KS, progress=seen.append)
    assert [p.done for p in seen] == list(range(1, result.n_queries + 1))
    return result


def queries() -> list[tuple[str, int]]:
    return [(text, v) for v, texts in enumerate(CAPTIONS) for text in texts]


def test_report_counts(report: EvalReport) -> None:
    assert report.n_queries == len(queries()) == 9
    assert report.n_videos == 6 and report.n_segments == sum(int(s) for s in SECONDS) == 13
    assert report.n_split_videos == 7 and report.n_missing == 1
    assert report.chance_r1 == pytest.approx(100 / 6)
    labels = {(m.method, m.k) for m in report.methods}
    assert labels == {(MULTI, None), (EXHAUSTIVE, None)} | {(m, k) for m in (MIXED, SINGLE) for k in KS}
    for m in report.methods:
        assert len(m.ranks) == 9 and all(1 <= r <= 6 for r in m.ranks)
        assert 0 < m.latency_p50_ms <= m.latency_p95_ms
    # Subsets from meta["factors"]: "order" = odd videos (1, 3, 5: 4 captions), "heldout" = videos 0, 1.
    assert report.subset_key == "factors" and report.subset_sizes == {"heldout": 3, "order": 4}
    multi = report.method(MULTI)
    in_order = [r for r, (_, v) in zip(multi.ranks, queries()) if v % 2]
    assert multi.subsets["order"] == pytest.approx(100 * np.mean(np.array(in_order) == 1))


def direct_ranks(corpus: dict) -> dict[tuple[str, int | None], list[int]]:
    """The evaluation recomputed the plain way: per video, per segment, from the store."""
    runner: ModelRunner = corpus["runner"]
    out: dict[tuple[str, int | None], list[int]] = {}
    with IndexReader(corpus["index"]) as store:
        ids = store.segment_ids()
        info = store.segments(ids)
        video_of = {str(p): i for i, p in enumerate(corpus["paths"])}
        seg_video = np.array([video_of[info[i].path] for i in ids.tolist()])
        emb, states = store.embeddings(ids), store.rerank_states(ids)
        for text, target in queries():
            enc = runner.encode_queries([text])
            sims = emb @ enc.embeddings[0]
            per_video = np.array([sims[seg_video == v].max() for v in range(6)])
            out.setdefault((MULTI, None), []).append(int((per_video >= per_video[target]).sum()))
            order = sorted(range(len(ids)), key=lambda j: (-sims[j], ids[j]))
            for k in KS:
                top = order[:k]
                logits = runner.mixed_scores(enc.rerank_states[:1], states[top][None])[0]
                fused = {}
                for j, logit in zip(top, logits):
                    # the default fusion (calibrated): the similarity in logit units + the logit
                    score = runner.retrieval_scale * sims[j] + logit
                    fused[seg_video[j]] = max(fused.get(seg_video[j], -np.inf), score)
                if target in fused:
                    rank = sum(score >= fused[target] for score in fused.values())
                else:
                    rank = len(fused) + sum(per_video[v] >= per_video[target] for v in range(6) if v not in fused)
                out.setdefault((MIXED, k), []).append(int(rank))
    return out


def test_ranks_equal_a_direct_computation(corpus: dict, report: EvalReport) -> None:
    direct = direct_ranks(corpus)
    for key, ranks in direct.items():
        assert report.method(*key).ranks == ranks, key
    # Reranking everything: the single-stream rerank at K >= all segments is the exhaustive one.
    assert report.method(SINGLE, 64).ranks == report.method(EXHAUSTIVE).ranks
    assert report.method(MIXED, 1).ranks == report.method(MULTI).ranks  # one candidate: order unchanged


def searcher_rank(searcher: Searcher, text: str, target: Path, **kwargs) -> int:
    hits = searcher.search(text, k=6, **kwargs).hits
    assert len(hits) == 6
    return next(h.rank for h in hits if h.path == str(target))


@pytest.mark.parametrize("faiss_file", ["kept", "deleted"])
def test_ranks_equal_what_the_searcher_returns(corpus: dict, report: EvalReport, faiss_file: str,
                                               tmp_path: Path) -> None:
    index = corpus["index"]
    if faiss_file == "deleted":
        # "kept": FAISS holds the float32 embeddings the indexer computed, the evaluation reads
    # the float16 store (differences ~3e-5 here, far below the gaps between these videos).
    # "deleted": the reader builds FAISS from the float16 store, like the evaluation.
        index = tmp_path / "index"
        index.mkdir()
        for f in corpus["index"].iterdir():
            if f.name != FAISS_FILE and f.is_file():
                (index / f.name).write_bytes(f.read_bytes())
    paths = corpus["paths"]
    with Searcher(index, runner=corpus["runner"]) as searcher:
        for q, (text, v) in enumerate(queries()):
            assert searcher_rank(searcher, text, paths[v], rerank="none") == report.method(MULTI).ranks[q]
            for k in KS:
                assert searcher_rank(searcher, text, paths[v], rerank_k=k) == report.method(MIXED, k).ranks[q]
                if faiss_file == "deleted":
                    continue  # the single-stream checks (slow: they decode) once are enough
                assert searcher_rank(searcher, text, paths[v], rerank_k=k, rerank="single") == \
                    report.method(SINGLE, k).ranks[q]


def test_json_round_trip_rows_and_plot(report: EvalReport, tmp_path: Path) -> None:
    text = json.dumps(report.to_dict())
    again = EvalReport.from_dict(json.loads(text))
    assert again == report and again.to_dict() == report.to_dict()
    rows = report.rows()
    assert len(rows) == len(report.methods) and all(len(r) == len(ROW_HEADER) for r in rows)
    assert rows[0][:2] == (MULTI, None)
    assert {r[2] for r in report.subset_rows()} == {"heldout", "order"}
    versus = report.versus_retrieval()
    assert set(versus) == {m.label for m in report.methods if m.method != MULTI}
    for m in report.methods:
        if m.method != MULTI:  # gains minus losses of first places is the R@1 difference
            change = versus[m.label]
            net = (change.gained - change.lost) * 100 / report.n_queries
            assert m.metrics.r1 - report.method(MULTI).metrics.r1 == pytest.approx(net)
    out = plot_report(report, tmp_path / "eval.png")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_options_and_errors(corpus: dict, tmp_path: Path) -> None:
    with Searcher(corpus["index"], runner=corpus["runner"]) as searcher:
        small = evaluate_index(searcher, corpus["captions"], rerank_ks=[2], single=False, exhaustive_limit=5,
                               subset_key=None)
        assert {(m.method, m.k) for m in small.methods} == {(MULTI, None), (MIXED, 2)}
        assert small.subset_key is None and small.subset_sizes == {}
        with pytest.raises(EvalError, match="positive"):
            evaluate_index(searcher, corpus["captions"], rerank_ks=[0, 4])
        with pytest.raises(EvalError, match="split must be one of"):
            evaluate_index(searcher, corpus["captions"], split="dev")
        with pytest.raises(EvalError, match="no val caption"):
            evaluate_index(searcher, corpus["captions"], split="val")
        with pytest.raises(ValueError, match="no such caption file"):
            evaluate_index(searcher, tmp_path / "missing.json")
