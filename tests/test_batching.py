"""Fast on one machine: batched searches answer exactly as searches alone, and indexes built
in bfloat16 and float32 search each other.

A tiny real model, real video files, real indexes; the batching test drives two real HTTP
servers (uvicorn, in threads of this process so the test can read the batcher's counts): one
that batches, one that answers every request alone without a query cache.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import uvicorn
from fastapi import FastAPI
from typer.testing import CliRunner

from cli import app as cli_app
from indexer.encoding import ModelRunner
from indexer.ingest.pipeline import IndexOptions, build_index
from indexer.search.searcher import Searcher
from indexer.store.index_reader import IndexReader
from indexer.store.index_store import IndexStore
from pvl_search.media.sample_files import write_video
from pvl_search.model.checkpoint import save_model
from pvl_search.model.config import preset
from pvl_search.model.perceiver import PerceiverVL
from server import create_app

OPTIONS = IndexOptions(window_s=2.0, stride_s=1.0, workers=1, thumbnails=False)
VIDEOS = [("red.mp4", (220, 30, 30), 1.5), ("green.mp4", (30, 200, 40), 2.0), ("blue.mp4", (20, 40, 230), 3.0),
          ("yellow.mp4", (230, 220, 20), 2.5), ("grey.mp4", (128, 128, 128), 4.0)]
# Requests sent together: other k, filters, rerank modes and fusions, a text twice with
# other settings (encoded once), the same request twice, and a single-stream rerank.
REQUESTS = [
    {"q": "a red square", "k": 3},
    {"q": "a red square", "k": 1, "glob": "*/red.mp4"},
    {"q": "a red square", "k": 3},
    {"q": "blue", "rerank": "none"},
    {"q": "green", "fusion": "rerank"},
    {"q": "grey and long", "k": 5, "rerank_k": 4},
    {"q": "yellow things", "min_duration": 2.1},
    {"q": "nothing is this short", "max_duration": 0.1},
    {"q": "red again", "rerank": "single", "rerank_k": 4},
]


@dataclass
class Corpus:
    media: Path
    model_dir: Path
    f32: ModelRunner
    bf16: ModelRunner
    index_f32: Path
    index_bf16: Path


def flat(rgb: tuple[int, int, int]):  # noqa: ANN201 - a media.FrameFn
    return lambda i, w, h: np.broadcast_to(np.array(rgb, np.uint8), (h, w, 3)).copy()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    root = tmp_path_factory.mktemp("batching")
    torch.manual_seed(0)
    # 16 latents: on this project's CPUs a batched text-encoder call is exact at this size (at 8
    # it is not, and the runner encodes such batches a query at a time): both paths are exact.
    config = preset("tiny").replace(hidden=64, heads=4, latents=16, frame_size=32, patch=8, frames=4, token_dim=16)
    model_dir = save_model(PerceiverVL(config), root / "model")
    media = root / "media"
    media.mkdir()
    for name, rgb, seconds in VIDEOS:
        write_video(media / name, frame_fn=flat(rgb), seconds=seconds)
    f32 = ModelRunner.from_folder(model_dir, device="cpu", dtype="float32")
    bf16 = ModelRunner.from_folder(model_dir, device="cpu", dtype="bfloat16")
    corpus = Corpus(media, model_dir, f32, bf16, root / "index-f32", root / "index-bf16")
    for folder, runner in ((corpus.index_f32, f32), (corpus.index_bf16, bf16)):
        with IndexStore(folder) as store:
            summary = build_index([media], store, runner, OPTIONS)
        assert summary.indexed == len(VIDEOS) and summary.dtype == runner.dtype_name
    return corpus


class ServerThread:
    """A real uvicorn server for `app` on a free loopback port, in a thread of this process."""

    def __init__(self, app: FastAPI) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("server thread ended before it started")
            time.sleep(0.02)
        return self

    def __exit__(self, *_exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()


def answer(body: dict) -> dict:
    """A /search body without its timings (the one thing batching may change)."""
    return {key: value for key, value in body.items() if key != "timings_ms"}


@pytest.fixture
def servers(corpus: Corpus) -> Iterator[tuple[ServerThread, ServerThread]]:
    """(batching server, server answering each request alone). The batching one waits up to
    a minute for all of REQUESTS, even the first (it found the server idle), so they are
    certain to arrive as one batch."""
    with Searcher(corpus.index_f32, runner=corpus.f32) as batched, \
            Searcher(corpus.index_f32, runner=corpus.f32, query_cache=0) as alone:
        with ServerThread(create_app(batched, batch_window_s=60.0, max_batch=len(REQUESTS),
                                     wait_when_idle=True)) as a, \
                ServerThread(create_app(alone, batch_window_s=0.0, max_batch=1)) as b:
            yield a, b


def test_a_batched_answer_is_exactly_the_answer_alone(servers: tuple[ServerThread, ServerThread]) -> None:
    batching, single = servers

    def get(url: str, params: dict) -> dict:
        with httpx.Client(base_url=url, timeout=120) as client:
            response = client.get("/search", params=params)
        assert response.status_code == 200, response.text
        return response.json()

    with ThreadPoolExecutor(len(REQUESTS)) as pool:
        together = list(pool.map(lambda params: get(batching.url, params), REQUESTS))
    stats = batching.server.config.app.state.batcher.stats
    fast = sum(1 for r in REQUESTS if r.get("rerank") != "single")
    assert stats.largest == fast  # the plain searches went through as one batch
    for params, body in zip(REQUESTS, together):
        alone = get(single.url, params)
        assert answer(body) == answer(alone), params
        assert body["query"] == params["q"] and body["dtype"] == "float32"
    assert together[7]["hits"] == [] and len(together[1]["hits"]) == 1
    assert any(body["hits"][0]["best"]["rerank_score"] is not None for body in together if body["rerank"] == "single")


def test_a_batch_encodes_bit_for_bit_as_single_queries(corpus: Corpus) -> None:
    runner = corpus.f32
    texts = ["a red square", "blue", "a much longer query about a grey thing that moves", "x"]
    for forced in (None, False):  # whatever the check finds here, then the one-at-a-time path
        runner.batch_exact.clear()
        if forced is not None:
            runner.batch_exact[(len(texts), torch.get_num_threads())] = forced
        batch = runner.encode_queries(texts)
        for i, text in enumerate(texts):
            alone = runner.encode_queries([text])
            np.testing.assert_array_equal(batch.embeddings[i], alone.embeddings[0])
            np.testing.assert_array_equal(batch.rerank_states[i], alone.rerank_states[0])


def test_the_query_cache_answers_the_same(corpus: Corpus) -> None:
    with Searcher(corpus.index_f32, runner=corpus.f32) as searcher:
        first = searcher.search("a red square", k=3)
        assert len(searcher.query_cache) == 1
        again = searcher.search("a red square", k=3)
        other = searcher.search("a red square", k=2)  # other settings, the same encoding
        assert len(searcher.query_cache) == 1 and again.timings_ms["encode"] == 0.0
    assert first.hits == again.hits and other.hits == first.hits[:2]


def test_a_bfloat16_index_searched_in_float32_refuses_nothing_and_loses_nothing(
    corpus: Corpus, tmp_path: Path
) -> None:
    with IndexReader(corpus.index_bf16) as a, IndexReader(corpus.index_f32) as b:
        assert a.encode_dtype() == "bfloat16" and b.encode_dtype() == "float32"
        assert a.stats().segments == b.stats().segments
        ids = a.segment_ids()
        np.testing.assert_array_equal(ids, b.segment_ids())
        xa, xb = a.embeddings(ids), b.embeddings(ids)
        cosine = (xa * xb).sum(1) / np.linalg.norm(xa, axis=1) / np.linalg.norm(xb, axis=1)
        assert cosine.min() > 0.999
    # Each index searched in the other dtype, against the float32 index searched in float32.
    with Searcher(corpus.index_f32, runner=corpus.f32) as same:
        for index, runner in ((corpus.index_bf16, corpus.f32), (corpus.index_f32, corpus.bf16)):
            with Searcher(index, runner=runner) as crossed:
                for query in ("a red square", "something blue", "long and grey"):
                    for rerank in ("none", "mixed"):
                        got = crossed.search(query, k=100, rerank=rerank)
                        want = same.search(query, k=100, rerank=rerank)
                        assert (got.dtype, got.index_dtype) == (runner.dtype_name, crossed.store.encode_dtype())
                        assert len(got.hits) == len(VIDEOS)  # every video is still found
                        assert {h.path for h in got.hits} == {h.path for h in want.hits}
                        scores = {h.path: h.score for h in want.hits}
                        assert [h.score for h in got.hits] == pytest.approx([scores[h.path] for h in got.hits],
                                                                            abs=0.05)
    # Extending it in float32 is accepted too, and the index says it holds both.
    extra = tmp_path / "extra"
    extra.mkdir()
    write_video(extra / "cyan.mp4", frame_fn=flat((20, 220, 220)), seconds=1.0)
    with IndexStore(corpus.index_bf16) as store:
        assert build_index([extra], store, corpus.f32, OPTIONS).indexed == 1
    cli = CliRunner()
    status = json.loads(cli.invoke(cli_app, ["status", "--index", str(corpus.index_bf16), "--json"]).stdout)
    assert status["model"]["dtype"] == "bfloat16,float32"
    found = cli.invoke(cli_app, ["search", "cyan", "--index", str(corpus.index_bf16), "--model", str(corpus.model_dir),
                                 "--device", "cpu", "--dtype", "float32", "--json", "-k", "100"])
    assert found.exit_code == 0, found.output
    hits = [json.loads(line) for line in found.stdout.splitlines()]
    assert len(hits) == len(VIDEOS) + 1 and {h["path"] for h in hits} >= {str(extra / "cyan.mp4")}
    assert all(h["dtype"] == "float32" and h["index_dtype"] == "bfloat16,float32" for h in hits)


def test_an_idle_batcher_answers_at_once_and_a_busy_one_batches() -> None:
    """The batcher itself (its `answer` a plain function that records its batches): a request
    finding it idle skips the window (a minute here, so waiting for it would fail the 30 s
    timeout); requests arriving soon after a batch still wait for each other (up to
    `max_batch`) and go together."""
    from indexer.search.batching import QueryBatcher
    from indexer.search.request import SearchRequest
    from indexer.search.results import SearchResult

    sizes: list[int] = []

    def answer(requests):  # noqa: ANN001, ANN202
        sizes.append(len(requests))
        return [SearchResult(r.query, [], "none", False) for r in requests]

    with QueryBatcher(answer, window_s=60.0, max_batch=3) as batcher, ThreadPoolExecutor(3) as pool:
        assert pool.submit(batcher.submit, SearchRequest("alone")).result(timeout=30).query == "alone"
        together = [pool.submit(batcher.submit, SearchRequest(f"q{i}")) for i in range(3)]
        assert [f.result(timeout=30).query for f in together] == ["q0", "q1", "q2"]
    assert sizes == [1, 3]


def test_one_client_searching_back_to_back_never_waits_for_company() -> None:
    """A client whose next request comes just after its last answer (so within the window of
    the batch that ended) gets no company by waiting: requests that arrive more than a window
    apart are answered at once (`BatchStats.waited` counts the batches that waited)."""
    from indexer.search.batching import QueryBatcher
    from indexer.search.request import SearchRequest
    from indexer.search.results import SearchResult

    def slow_answer(requests):  # noqa: ANN001, ANN202 - each answer takes longer than the window
        time.sleep(0.3)
        return [SearchResult(r.query, [], "none", False) for r in requests]

    with QueryBatcher(slow_answer, window_s=0.2, max_batch=4) as batcher:
        for i in range(3):
            assert batcher.submit(SearchRequest(f"q{i}")).query == f"q{i}"
        assert (batcher.stats.batches, batcher.stats.waited) == (3, 0)
    with QueryBatcher(slow_answer, window_s=0.2, max_batch=4, idle_at_once=False) as batcher:
        batcher.submit(SearchRequest("waits"))  # without the rule every lone request waits the window
        assert batcher.stats.waited == 1
