"""The HTTP API end to end: a tiny real model, real video files, a real index, a real
server process on a free port, queried with a real HTTP client."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from index_helpers import stop_process

from indexer.encoding import ModelRunner
from indexer.errors import IndexStoreError
from indexer.ingest.pipeline import IndexOptions, build_index
from indexer.search.searcher import Searcher
from indexer.store.index_reader import IndexReader
from indexer.store.index_store import IndexStore
from pvl_search.media.sample_files import write_video
from pvl_search.model.checkpoint import save_model
from pvl_search.model.config import preset
from pvl_search.model.perceiver import PerceiverVL
from server import MAX_K, MAX_QUERY_CHARS, MAX_SINGLE_RERANK_K, create_app, serve

REPO = Path(__file__).resolve().parent.parent
OPTIONS = IndexOptions(window_s=2.0, stride_s=1.0, workers=1)
# (name, RGB, seconds): different colours, and lengths that give 1 to 3 segments.
VIDEOS = [
    ("red.mp4", (220, 30, 30), 1.5),
    ("green.mp4", (30, 200, 40), 2.0),
    ("blue.mp4", (20, 40, 230), 3.0),
    ("yellow.mp4", (230, 220, 20), 2.5),
    ("stripes.mp4", None, 4.0),
]
SEARCH_KEYS = {"query", "rerank", "truncated", "timings_ms", "hits", "dtype", "index_dtype", "windows"}
HIT_KEYS = {"rank", "video_id", "path", "duration", "score", "best", "thumbnail_url", "video_url", "media_type",
            "moments", "timeline"}
SEGMENT_KEYS = {"segment_id", "start_s", "end_s", "retrieval_score", "rerank_score", "score"}


def flat(rgb: tuple[int, int, int]):  # noqa: ANN201
    return lambda i, w, h: np.broadcast_to(np.array(rgb, np.uint8), (h, w, 3)).copy()


def stripes(i: int, w: int, h: int) -> np.ndarray:
    """Moving black-and-white vertical stripes."""
    x = (np.arange(w) + 3 * i) // 6 % 2 * 255
    return np.broadcast_to(x.astype(np.uint8)[None, :, None], (h, w, 3)).copy()


def add_videos(folder: Path, videos: list[tuple[str, tuple[int, int, int] | None, float]]) -> list[Path]:
    return [write_video(folder / name, frame_fn=flat(rgb) if rgb else stripes, seconds=seconds)
            for name, rgb, seconds in videos]


@dataclass
class Served:
    url: str
    client: httpx.Client
    index_dir: Path
    media_dir: Path
    model_dir: Path
    runner: ModelRunner
    fingerprint: str

    def index(self) -> None:
        """Bring the index up to date with the media folder (as `pvl-search index` would)."""
        with IndexStore(self.index_dir) as store:
            build_index([self.media_dir], store, self.runner, OPTIONS)

    def counts(self) -> tuple[int, int]:
        with IndexReader(self.index_dir) as store:
            stats = store.stats()
        return stats.videos["indexed"], stats.segments

    def search(self, q: str, **params: object) -> httpx.Response:
        return self.client.get("/search", params={"q": q, **params})


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    config = preset("tiny").replace(hidden=64, heads=4, latents=8, frame_size=32, patch=8, frames=4, token_dim=16)
    return save_model(PerceiverVL(config), tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[Served]:
    """An index of five small videos and a server process over it (killed at the end)."""
    root = tmp_path_factory.mktemp("served")
    media_dir, index_dir = root / "media", root / "index"
    media_dir.mkdir()
    add_videos(media_dir, VIDEOS)
    runner = ModelRunner.from_folder(model_dir, device="cpu")
    log_path = root / "server.log"
    code = (  # port 0: the server binds a free port and says which
        f"import server; server.serve({str(index_dir)!r}, port=0, model_dir={str(model_dir)!r}, device='cpu', "
        "log_level='warning', on_ready=lambda url: print('READY', url, flush=True))"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    proc = None
    with open(log_path, "wb") as log, httpx.Client(timeout=30) as client:
        try:
            served = Served("", client, index_dir, media_dir, model_dir, runner, runner.fingerprint)
            served.index()
            proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env, stdout=log, stderr=log)
            deadline = time.monotonic() + 60
            while not served.url:
                if proc.poll() is not None:
                    pytest.fail(f"server exited with {proc.returncode}:\n{log_path.read_text()}", pytrace=False)
                if time.monotonic() > deadline:
                    pytest.fail(f"server did not start in 60 s:\n{log_path.read_text()}", pytrace=False)
                ready = [line for line in log_path.read_text().splitlines() if line.startswith("READY ")]
                served.url = ready[0].split()[1] if ready else ""
                time.sleep(0.1)
            client.base_url = served.url
            assert client.get("/health").status_code == 200
            yield served
        finally:
            if proc is not None:
                stop_process(proc)
    # No traceback ever reached the log in a passing run (errors under test are handled).
    assert "Traceback" not in log_path.read_text()


def check_result(body: dict, query: str, indexed: set[str]) -> None:
    assert set(body) == SEARCH_KEYS
    assert body["query"] == query and isinstance(body["truncated"], bool)
    assert body["timings_ms"]["total"] >= 0
    hits = body["hits"]
    assert [h["rank"] for h in hits] == list(range(1, len(hits) + 1))
    for hit in hits:
        assert set(hit) == HIT_KEYS and set(hit["best"]) == SEGMENT_KEYS
        assert hit["path"] in indexed
        assert hit["best"]["start_s"] <= hit["best"]["end_s"]
    assert len({h["video_id"] for h in hits}) == len(hits)  # one hit per video


def indexed_paths(served: Served) -> set[str]:
    return {str(p) for p in served.media_dir.iterdir()}


def test_health_counts_match_the_index(served: Served) -> None:
    body = served.client.get("/health").json()
    videos, segments = served.counts()
    assert isinstance(body.pop("worker"), int)  # the server process's id (serve --workers: which one)
    assert body == {"status": "ok", "videos": videos, "segments": segments, "model": served.fingerprint[:12]}
    assert videos >= len(VIDEOS) and segments > videos  # the longer videos have several segments


@pytest.mark.parametrize("rerank", ["mixed", "none", "single"])
def test_search_returns_the_indexed_files_best_first(served: Served, rerank: str) -> None:
    response = served.search("a red square", k=MAX_K, rerank=rerank)
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    body = response.json()
    check_result(body, "a red square", indexed_paths(served))
    assert body["rerank"] == rerank
    assert {h["path"] for h in body["hits"]} >= {str(served.media_dir / name) for name, _, _ in VIDEOS}
    scores = [h["score"] for h in body["hits"]]
    assert scores == sorted(scores, reverse=True)
    for hit in body["hits"]:
        assert hit["score"] == hit["best"]["score"]
        if rerank == "none":
            assert hit["best"]["rerank_score"] is None and hit["score"] == hit["best"]["retrieval_score"]
        else:  # the default fusion (calibrated) over a fully reranked list
            scale = served.runner.retrieval_scale
            assert scale > 1  # the model's contrastive temperature, not a unit weight
            assert hit["score"] == pytest.approx(scale * hit["best"]["retrieval_score"] + hit["best"]["rerank_score"])


def test_k_and_fusion(served: Served) -> None:
    body = served.search("blue", k=2, fusion="rerank").json()
    assert len(body["hits"]) == 2
    assert all(h["score"] == h["best"]["rerank_score"] for h in body["hits"])
    body = served.search("blue", k=2, fusion="sum", rerank="mixed").json()
    assert all(h["score"] == pytest.approx(h["best"]["retrieval_score"] + h["best"]["rerank_score"])
               for h in body["hits"])


def test_filters(served: Served) -> None:
    body = served.search("anything", glob="*/gre?n.mp4").json()
    assert [h["path"] for h in body["hits"]] == [str(served.media_dir / "green.mp4")]
    body = served.search("anything", min_duration=3.5).json()
    assert [h["path"] for h in body["hits"]] == [str(served.media_dir / "stripes.mp4")]
    assert served.search("anything", max_duration=0.5).json()["hits"] == []
    assert served.search("anything", since="2000-01-01T00:00:00").json()["hits"]
    assert served.search("anything", since="2999-01-01").json()["hits"] == []


@pytest.mark.parametrize("params", [{"k": "ten"}, {"min_duration": "long"}, {"q": None}])
def test_parameters_of_the_wrong_type_are_422(served: Served, params: dict) -> None:
    params = {"q": "a red square", **params}
    response = served.client.get("/search", params={k: v for k, v in params.items() if v is not None})
    assert response.status_code == 422
    name = next(iter(set(params) - {"q"}), "q")
    assert any(err["loc"] == ["query", name] for err in response.json()["detail"])


def test_a_422_does_not_echo_a_long_input_whole(served: Served) -> None:
    response = served.client.get("/search", params={"q": "red", "k": "9" * 5000 + "x"})
    assert response.status_code == 422
    echoed = response.json()["detail"][0]["input"]
    assert echoed.startswith("9999") and len(echoed) < 100


@pytest.mark.parametrize(
    ("params", "words"),
    [
        ({"q": ""}, "empty"),
        ({"q": "  \t "}, "empty"),
        ({"q": "x" * (MAX_QUERY_CHARS + 1)}, "at most 1000"),
        ({"q": "red", "k": 0}, "k must be between 1 and 100"),
        ({"q": "red", "k": MAX_K + 1}, "k must be between 1 and 100"),
        ({"q": "red", "rerank_k": 0}, "rerank_k must be"),
        ({"q": "red", "rerank_k": 1001}, "rerank_k must be"),
        ({"q": "red", "rerank": "both"}, "rerank must be one of"),
        ({"q": "red", "fusion": "max"}, "fusion must be one of"),
        ({"q": "red", "min_duration": -1}, "min_duration must be"),
        ({"q": "red", "max_duration": "nan"}, "max_duration must be"),
        ({"q": "red", "since": "yesterday"}, "since must be an ISO 8601"),
        ({"q": "red", "rerank": "single", "rerank_k": MAX_SINGLE_RERANK_K + 1}, "rerank_k"),
        ({"q": "red", "min_duration": 3, "max_duration": 2}, "min_duration"),
    ],
)
def test_refused_queries_are_400_with_a_clear_detail(served: Served, params: dict, words: str) -> None:
    response = served.client.get("/search", params=params)
    assert response.status_code == 400
    detail = response.json()["detail"]
    assert set(response.json()) == {"detail"} and words in detail
    assert len(detail) < 200  # names what is wrong without echoing a long input back


# (CLI options, the same as HTTP parameters) -> None: both accept it, else words both give.
SAME_RULES = [
    ({"min-duration": "nan"}, "min_duration must be"),
    ({"min-duration": "-1"}, "min_duration must be"),
    ({"min-duration": "3", "max-duration": "2"}, "greater than max_duration"),
    ({"rerank": "single", "rerank-k": "100"}, f"at most {MAX_SINGLE_RERANK_K} with rerank=single"),
    ({"since": "yesterday"}, "since must be"),
    ({"since": "1700000000"}, None),  # seconds since 1970
    ({"since": "2026-12-02T12:00:00+14:00", "k": "3"}, None),
]


def test_the_cli_and_http_refuse_and_accept_the_same_requests(served: Served) -> None:
    from index_helpers import pvl_search

    def cli(options: dict) -> subprocess.CompletedProcess:
        args = [f"-{k}" if len(k) == 1 else f"--{k}" for k in options]
        flat = [item for pair in zip(args, options.values()) for item in pair]
        return subprocess.run([pvl_search(), "search", "red", "--index", str(served.index_dir), "--model",
                               str(served.model_dir), "--device", "cpu", "--json", *flat],
                              capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})

    with ThreadPoolExecutor(len(SAME_RULES)) as pool:
        commands = list(pool.map(cli, [options for options, _ in SAME_RULES]))
    for (options, words), command in zip(SAME_RULES, commands):
        response = served.search("red", **{k.replace("-", "_"): v for k, v in options.items()})
        if words is None:
            assert response.status_code == 200 and command.returncode == 0, (options, command.stderr)
            assert len(command.stdout.splitlines()) == len(response.json()["hits"])
            continue
        assert response.status_code == 400 and words in response.json()["detail"], (options, response.text)
        assert command.returncode == 1 and "Traceback" not in command.stderr, (options, command.stderr)
        assert command.stderr.strip() == f"error: {response.json()['detail']}"  # the very same line


def test_video_by_id(served: Served) -> None:
    hit = served.search("stripes", k=MAX_K).json()["hits"]
    hit = next(h for h in hit if h["path"].endswith("stripes.mp4"))
    response = served.client.get(f"/videos/{hit['video_id']}")
    assert response.status_code == 200
    video = response.json()
    assert video["id"] == hit["video_id"] and video["path"] == hit["path"] and video["status"] == "indexed"
    assert video["duration"] == pytest.approx(4.0, abs=0.5)
    segments = video["segments"]
    assert len(segments) > 1 and hit["best"]["segment_id"] in {s["id"] for s in segments}
    assert [s["start_s"] for s in segments] == sorted(s["start_s"] for s in segments)


def test_unknown_video_is_404_and_a_bad_id_422(served: Served) -> None:
    response = served.client.get("/videos/999999")
    assert response.status_code == 404 and response.json() == {"detail": "no video with id 999999"}
    assert served.client.get("/videos/abc").status_code == 422
    assert served.client.get("/videos/-1").status_code == 422
    assert served.client.get(f"/videos/{2**64}").status_code == 422
    assert served.client.get("/nowhere").status_code == 404


def test_concurrent_searches_agree(served: Served) -> None:
    queries = ["red", "green", "blue", "stripes"] * 3
    with ThreadPoolExecutor(6) as pool:
        bodies = list(pool.map(lambda q: served.search(q, k=3).json(), queries))
    for q, body in zip(queries, bodies):
        alone = served.search(q, k=3).json()
        assert [(h["path"], h["score"]) for h in body["hits"]] == [(h["path"], h["score"]) for h in alone["hits"]]
        assert body["query"] == q


def test_a_video_indexed_while_serving_is_found(served: Served) -> None:
    before = served.client.get("/health").json()
    new = add_videos(served.media_dir, [("late-cyan.mp4", (20, 220, 220), 1.0)])[0]
    assert str(new) not in {h["path"] for h in served.search("cyan", k=MAX_K).json()["hits"]}
    served.index()
    body = served.search("cyan", k=MAX_K).json()
    check_result(body, "cyan", indexed_paths(served))
    assert str(new) in {h["path"] for h in body["hits"]}
    after = served.client.get("/health").json()
    assert after["videos"] == before["videos"] + 1 and after["segments"] == before["segments"] + 1
    assert (after["videos"], after["segments"]) == served.counts()


def test_single_rerank_of_a_file_gone_bad_is_valid_json(served: Served) -> None:
    bad = add_videos(served.media_dir, [("gone-bad.mp4", (120, 60, 200), 1.0)])[0]
    served.index()
    bad.write_bytes(b"not a video any more")  # after indexing: the rerank cannot decode it
    response = served.search("purple", k=MAX_K, rerank="single", rerank_k=MAX_SINGLE_RERANK_K)
    assert response.status_code == 200
    hits = response.json()["hits"]
    last = hits[-1]  # undecodable: scored -inf, ranked last, sent as null
    assert last["path"] == str(bad) and last["score"] is None and last["best"]["rerank_score"] is None
    assert all(h["score"] is not None for h in hits[:-1])


def test_unexpected_errors_are_500_without_details(
    model_dir: Path, served: Served, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Searcher(served.index_dir, model_dir=model_dir, device="cpu") as searcher:
        def broken(*_args: object, **_kwargs: object) -> None:
            raise RuntimeError("secret internals at /some/path")

        monkeypatch.setattr(searcher, "run_many", broken)  # what the server's batcher calls
        client = TestClient(create_app(searcher), raise_server_exceptions=False)
        with caplog.at_level(logging.ERROR, logger="pvl_search.server"):
            response = client.get("/search", params={"q": "red"})
        assert response.status_code == 500 and response.json() == {"detail": "internal error"}
        assert "secret internals" in caplog.text  # logged server-side, not sent
        assert client.get("/health").status_code == 200  # still serving


def test_start_up_errors_are_raised_before_serving(model_dir: Path, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port}"):
            serve(tmp_path, port=port, model_dir=model_dir, device="cpu")
    with pytest.raises(IndexStoreError, match="no index at"):
        serve(tmp_path / "missing", port=0, model_dir=model_dir, device="cpu")


def test_connections_to_the_listening_socket_get_tcp_nodelay() -> None:
    """`serve` binds its socket itself (server._listen) and hands it to uvicorn, whose asyncio
    transports set TCP_NODELAY only on sockets that say they are TCP. Without it a kept-alive
    client waited 40 ms (Nagle against delayed ACK) for each answer's body after its headers.
    Checked through asyncio's own server on that socket, as uvicorn serves it."""
    import asyncio
    import socket

    from server import _listen

    async def main() -> int:
        seen: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        async def handle(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            sock = writer.get_extra_info("socket")
            seen.set_result(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(handle, sock=_listen("127.0.0.1", 0))
        port = server.sockets[0].getsockname()[1]
        _reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            return await asyncio.wait_for(seen, 10)
        finally:
            writer.close()
            server.close()

    assert asyncio.run(main()) != 0
