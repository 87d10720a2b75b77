"""Moments over HTTP (issue #23): every /search hit carries its moments and a relevance
timeline, and `GET /search?like=SEGMENT_ID` searches "more like this moment".

A real index, made by the real pipeline with the shipped model and the model's own windows
(3 s every 2 s, and one per shot), of the moment benchmark's long videos (each 13+ s: many segments, several
events), behind the real app, driven in-process by Starlette's TestClient.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from index_helpers import ids_of, video
from PIL import Image

from indexer.encoding import ModelRunner
from indexer.ingest.pipeline import IndexOptions, build_index
from indexer.search.searcher import Searcher
from indexer.store.index_store import IndexStore
from pvl_search.data.long_synth import generate_long_corpus
from pvl_web.hosts import AllowedHosts
from server import create_app

TOKEN = "correct-horse-battery-staple"
QUERY = "a red circle moves left"


@dataclass
class Site:
    client: TestClient
    gated: TestClient  # the same index behind a token and the Host check
    videos: Path
    removed_segment: int  # a segment of a video deleted and re-indexed away


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    root = tmp_path_factory.mktemp("moments")
    corpus = generate_long_corpus(root / "corpus", 3, 4, seed=0)
    videos = Path(corpus.out_dir) / "videos"
    runner = ModelRunner.from_folder(None, device="cpu")  # the shipped model: its windows
    gone = video(videos / "gone.mp4", seed=3)
    with IndexStore(root / "idx") as store:
        build_index([videos], store, runner, IndexOptions(workers=1))
        removed_segment = ids_of(store, str(gone))[0]
    gone.unlink()
    with IndexStore(root / "idx") as store:
        assert build_index([videos], store, runner, IndexOptions(workers=1)).removed == 1
    hosts = AllowedHosts.for_bind("127.0.0.1")
    with Searcher(root / "idx", runner=runner) as searcher:
        with TestClient(create_app(searcher)) as client, \
                TestClient(create_app(searcher, token=TOKEN, allowed_hosts=hosts)) as gated:
            yield Site(client, gated, videos, removed_segment)


def search(site: Site, **params: object) -> dict:
    response = site.client.get("/search", params=params)
    assert response.status_code == 200, response.text
    return response.json()


def test_hits_carry_their_moments_and_a_timeline(site: Site) -> None:
    body = search(site, q=QUERY, k=10)
    assert body["windows"] == {"window_s": 3.0, "stride_s": 2.0, "shots": True}  # the model's own
    assert len(body["hits"]) == 3
    for hit in body["hits"]:
        segments = site.client.get(f"/videos/{hit['video_id']}").json()["segments"]
        assert len(segments) > 5  # a long video: many windows
        live = {s["id"] for s in segments}
        moments, best = hit["moments"], hit["best"]
        assert 1 <= len(moments) <= 5 and {m["segment_id"] for m in moments} <= live
        # The best moment grows from the segment that ranked the video, and scores as it does.
        first = moments[0]
        assert first["start_s"] <= best["start_s"] < best["end_s"] <= first["end_s"]
        assert first["score"] == pytest.approx(best["retrieval_score"], abs=1e-4)
        assert len({m["segment_id"] for m in moments}) == len(moments)
        for moment in moments:
            thumb = site.client.get(moment["thumbnail_url"])
            assert moment["thumbnail_url"] == f"/segments/{moment['segment_id']}/thumbnail"
            assert thumb.status_code == 200 and Image.open(io.BytesIO(thumb.content)).format == "JPEG"
        # The timeline spans the whole video in at most 120 equal steps, peaking at least as
        # high as the best moment.
        line = hit["timeline"]
        assert 60 <= len(line["scores"]) <= 120
        assert line["step_s"] * len(line["scores"]) == pytest.approx(hit["duration"], abs=0.01)
        assert all(-1.0 <= s <= 1.0 for s in line["scores"])
        assert max(line["scores"]) >= first["score"] - 1e-3


def test_more_like_a_moment_finds_its_own_video_first(site: Site) -> None:
    for hit in search(site, q=QUERY, k=10)["hits"]:
        moment = hit["moments"][-1]  # not necessarily the moment the text ranked best
        batches = site.client.app.state.batcher.stats.requests
        body = search(site, like=moment["segment_id"], k=10)
        assert site.client.app.state.batcher.stats.requests == batches  # no text: not batched
        assert body["query"] == f"like:{moment['segment_id']}" and body["rerank"] == "none"
        first = body["hits"][0]
        assert first["video_id"] == hit["video_id"] and first["best"]["segment_id"] == moment["segment_id"]
        assert first["best"]["retrieval_score"] == pytest.approx(1.0, abs=1e-3)  # its own embedding
        assert len(body["hits"]) == 3 and [h["rank"] for h in body["hits"]] == [1, 2, 3]
        for other in body["hits"]:  # presented as a text search is: moments, timeline, URLs
            assert other["moments"] and other["timeline"]["scores"]
            assert other["video_url"] == f"/videos/{other['video_id']}/file" and other["thumbnail_url"]


def test_more_like_keeps_the_filters_and_k(site: Site) -> None:
    hits = search(site, q=QUERY, k=10)["hits"]
    own = hits[0]
    segment = own["best"]["segment_id"]
    others = [Path(h["path"]).name for h in hits[1:]]
    # A glob that leaves the segment's own video out: it is absent, the rest match the glob.
    glob = f"*/{others[0]}"
    assert [h["path"] for h in search(site, like=segment, glob=glob)["hits"]] == [hits[1]["path"]]
    assert [h["video_id"] for h in search(site, like=segment, k=1)["hits"]] == [own["video_id"]]
    shorter = search(site, like=segment, max_duration=own["duration"] - 0.01)["hits"]
    assert own["video_id"] not in {h["video_id"] for h in shorter}
    assert shorter and all(h["duration"] < own["duration"] for h in shorter)
    assert search(site, like=segment, since="2999-01-01")["hits"] == []


@pytest.mark.parametrize(
    ("params", "status", "words"),
    [
        ({"q": QUERY, "like": 0}, 400, "not both"),
        ({"like": 0, "rerank": "mixed"}, 400, "rerank, rerank_k and fusion do not apply"),
        ({"like": 0, "fusion": "sum"}, 400, "do not apply"),
        ({"like": 0, "k": 0}, 400, "k must be between 1 and 100"),
        ({"like": 0, "min_duration": 3, "max_duration": 2}, 400, "min_duration"),
        ({"like": 0, "since": "yesterday"}, 400, "since must be"),
        ({"like": 999_999}, 404, "no segment with id 999999"),
    ],
)
def test_refused_likes_are_one_line(site: Site, params: dict, status: int, words: str) -> None:
    response = site.client.get("/search", params=params)
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert set(response.json()) == {"detail"} and words in detail and "\n" not in detail


def test_a_removed_segment_is_404_and_a_bad_like_422(site: Site) -> None:
    removed = site.client.get("/search", params={"like": site.removed_segment})
    assert removed.status_code == 404 and "no segment" in removed.json()["detail"]
    for bad in ("abc", "1.5", "-1", str(2**64), ""):
        response = site.client.get("/search", params={"like": bad})
        assert response.status_code == 422, bad
        assert any(err["loc"] == ["query", "like"] for err in response.json()["detail"]), bad
    missing = site.client.get("/search")  # neither q nor like: q is what is missing
    assert missing.status_code == 422 and missing.json()["detail"][0]["loc"] == ["query", "q"]


def test_like_passes_the_token_and_host_gates(site: Site) -> None:
    segment = search(site, q=QUERY)["hits"][0]["best"]["segment_id"]
    url = f"/search?like={segment}"
    here, bearer = {"Host": "127.0.0.1:8000"}, {"Authorization": f"Bearer {TOKEN}"}
    assert site.gated.get(url, headers=here).status_code == 401
    assert site.gated.get(url, headers={**bearer, "Host": "evil.example"}).status_code == 403
    answered = site.gated.get(url, headers={**here, **bearer})
    assert answered.status_code == 200 and answered.json()["hits"][0]["best"]["segment_id"] == segment
