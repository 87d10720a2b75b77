"""The HTTP side of the web page: media by id (video files with HTTP Range, thumbnails), the
URLs /search gives for them, what is never served, the token gate and the bind rule.

A real index of real files (an H.264 MP4, an MPEG-4 AVI, a PNG, a file that fails, one that
is removed) and a real Searcher behind the real app, driven in-process by Starlette's
TestClient (the page test drives a real server process from a browser).
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from index_helpers import ids_of
from PIL import Image
from sqlalchemy import select
from typer.testing import CliRunner

from cli import app as cli_app
from indexer.encoding import ModelRunner
from indexer.ingest.pipeline import IndexOptions, build_index
from indexer.search.searcher import Searcher
from indexer.store.index_store import IndexStore
from indexer.store.schema import Video
from pvl_search.media.sample_files import write_image, write_video
from pvl_search.model.checkpoint import save_model
from pvl_search.model.config import preset
from pvl_search.model.perceiver import PerceiverVL
from pvl_web import STATIC_DIR
from pvl_web.auth import COOKIE, is_loopback
from server import create_app, serve

TOKEN = "correct-horse-battery-staple"
OPTIONS = IndexOptions(window_s=1.0, stride_s=0.5, workers=1)


def flat(rgb: tuple[int, int, int]):  # noqa: ANN201 - a media.FrameFn
    return lambda i, w, h: np.broadcast_to(np.array(rgb, np.uint8), (h, w, 3)).copy()


@dataclass
class Site:
    client: TestClient  # no token
    gated: TestClient  # the same index behind a token
    media: Path
    ids: dict[str, int]  # file name -> video id
    removed_segment: int  # a segment of the removed video (its thumbnail is gone)
    replaced_segments: list[int]  # the segments of a changed video before its re-index


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    root = tmp_path_factory.mktemp("web")
    torch.manual_seed(0)
    config = preset("tiny").replace(hidden=64, heads=4, latents=8, frame_size=32, patch=8, frames=4, token_dim=16)
    model_dir = save_model(PerceiverVL(config), root / "model")
    runner = ModelRunner.from_folder(model_dir, device="cpu")
    media, folder = root / "media", root / "idx"
    media.mkdir()
    write_video(media / "red.mp4", frame_fn=flat((220, 30, 30)), seconds=3.0)
    write_video(media / "old.avi", codec="mpeg4", frame_fn=flat((30, 30, 220)), seconds=1.0)
    write_image(media / "still.png", np.full((30, 40, 3), 90, np.uint8))
    gone = write_video(media / "gone.mp4", frame_fn=flat((30, 200, 30)), seconds=1.0)
    changed = write_video(media / "changed.mp4", frame_fn=flat((30, 200, 30)), seconds=1.0)
    with IndexStore(folder) as store:
        build_index([media], store, runner, OPTIONS)
        removed_segment = ids_of(store, str(gone))[0]
        replaced = ids_of(store, str(changed))
    gone.unlink()
    write_video(changed, frame_fn=flat((250, 250, 250)), seconds=2.0)  # other content: re-indexed
    (media / "broken.mp4").write_bytes(b"\x00not a video" * 50)
    with IndexStore(folder) as store:
        summary = build_index([media], store, runner, OPTIONS)
        assert summary.removed == 1 and list(summary.failed) == [str(media / "broken.mp4")]
        ids = {Path(p).name: store_id for p, store_id in _video_ids(store).items()}
    with Searcher(folder, runner=runner) as searcher:
        with TestClient(create_app(searcher)) as client, \
                TestClient(create_app(searcher, token=TOKEN)) as gated:
            yield Site(client, gated, media, ids, removed_segment, replaced)


def _video_ids(store: IndexStore) -> dict[str, int]:
    with store.db.sessions() as s:
        return {r.path: r.id for r in s.execute(select(Video.path, Video.id))}


def file_url(site: Site, name: str) -> str:
    return f"/videos/{site.ids[name]}/file"


# -- /search gives the media URLs -------------------------------------------------------


def test_search_hits_carry_thumbnail_and_video_urls(site: Site) -> None:
    hits = site.client.get("/search", params={"q": "a red square", "k": 10}).json()["hits"]
    by_name = {Path(h["path"]).name: h for h in hits}
    assert set(by_name) == {"red.mp4", "old.avi", "still.png", "changed.mp4"}  # indexed and present only
    types = {name: h["media_type"] for name, h in by_name.items()}
    assert types == {"red.mp4": "video/mp4", "old.avi": "video/x-msvideo", "still.png": "image/png",
                     "changed.mp4": "video/mp4"}
    for hit in hits:
        assert hit["video_url"] == f"/videos/{hit['video_id']}/file"
        assert hit["thumbnail_url"] == f"/segments/{hit['best']['segment_id']}/thumbnail"
        thumb = site.client.get(hit["thumbnail_url"])
        assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
        assert Image.open(io.BytesIO(thumb.content)).size == (32, 32)
        video = site.client.get(hit["video_url"])
        assert video.status_code == 200 and video.headers["content-type"] == hit["media_type"]
        assert video.content == Path(hit["path"]).read_bytes()


# -- HTTP Range ---------------------------------------------------------------------------


def test_range_requests_answer_206_with_the_right_bytes(site: Site) -> None:
    url, data = file_url(site, "red.mp4"), (site.media / "red.mp4").read_bytes()
    size = len(data)
    whole = site.client.get(url)
    assert whole.status_code == 200 and whole.headers["accept-ranges"] == "bytes"
    assert int(whole.headers["content-length"]) == size
    cases = {"bytes=100-199": (100, 200), "bytes=0-0": (0, 1), f"bytes={size - 50}-": (size - 50, size),
             "bytes=-64": (size - 64, size), f"bytes=10-{size + 1000}": (10, size)}
    for header, (lo, hi) in cases.items():
        part = site.client.get(url, headers={"Range": header})
        assert part.status_code == 206, header
        assert part.content == data[lo:hi], header
        assert part.headers["content-range"] == f"bytes {lo}-{hi - 1}/{size}", header
        assert part.headers["content-type"] == "video/mp4"
    two = site.client.get(url, headers={"Range": "bytes=0-9,20-29"})
    assert two.status_code == 206 and two.headers["content-type"].startswith("multipart/byteranges")
    assert data[0:10] in two.content and data[20:30] in two.content
    beyond = site.client.get(url, headers={"Range": f"bytes={size}-"})
    assert beyond.status_code == 416 and beyond.headers["content-range"] == f"bytes */{size}"
    head = site.client.head(url)
    assert head.status_code == 200 and int(head.headers["content-length"]) == size and not head.content


def test_download_is_an_attachment_named_after_the_file(site: Site) -> None:
    response = site.client.get(file_url(site, "old.avi"), params={"download": 1})
    assert response.status_code == 200 and response.headers["content-type"] == "video/x-msvideo"
    assert response.headers["content-disposition"] == 'attachment; filename="old.avi"'
    assert "content-disposition" not in site.client.get(file_url(site, "old.avi")).headers


# -- what is never served -----------------------------------------------------------------


@pytest.mark.parametrize("url", [
    "/static/..%2f..%2fserver.py",
    "/static/%2e%2e/%2e%2e/server.py",
    "/static/..%2F..%2Fpyproject.toml",
    "/videos/..%2F..%2Fetc%2Fpasswd/file",
    "/videos/%2Fetc%2Fpasswd/file",
    "/segments/..%2F..%2Findex.sqlite/thumbnail",
    "/videos/1/file/..%2F..%2F..%2Fetc%2Fpasswd",
    "/thumbnails/0/0.jpg",
    "/idx/index.sqlite",
])
def test_paths_reach_nothing(site: Site, url: str) -> None:
    response = site.client.get(url)
    assert response.status_code in (404, 422), (url, response.status_code)
    assert b"root:" not in response.content and b"import" not in response.content


def test_thumbnails_follow_a_re_index(site: Site) -> None:
    for segment_id in site.replaced_segments:  # the segments of the old content: gone
        assert site.client.get(f"/segments/{segment_id}/thumbnail").status_code == 404
    hit = next(h for h in site.client.get("/search", params={"q": "white", "k": 10}).json()["hits"]
               if h["path"].endswith("changed.mp4"))
    assert hit["best"]["segment_id"] not in site.replaced_segments
    image = Image.open(io.BytesIO(site.client.get(hit["thumbnail_url"]).content)).convert("RGB")
    assert np.asarray(image, np.float32).mean() > 230  # the new, white content


def test_unknown_removed_failed_and_vanished_are_404(site: Site, tmp_path: Path) -> None:
    for url in ("/videos/999999/file", "/segments/999999/thumbnail", file_url(site, "gone.mp4"),
                file_url(site, "broken.mp4"), f"/segments/{site.removed_segment}/thumbnail"):
        response = site.client.get(url)
        assert response.status_code == 404, url
        assert isinstance(response.json()["detail"], str)
    assert "removed" in site.client.get(file_url(site, "gone.mp4")).json()["detail"]
    assert "failed" in site.client.get(file_url(site, "broken.mp4")).json()["detail"]
    assert site.client.get("/videos/-1/file").status_code == 422
    # Indexed, then moved away without a re-index: nothing at that path to serve.
    still = site.media / "still.png"
    moved = tmp_path / "still.png"
    still.rename(moved)
    try:
        response = site.client.get(file_url(site, "still.png"))
        assert response.status_code == 404 and "gone" in response.json()["detail"]
    finally:
        moved.rename(still)
    assert site.client.get(file_url(site, "still.png")).status_code == 200


# -- the page -----------------------------------------------------------------------------


def test_the_page_and_its_files_come_from_this_server_only(site: Site) -> None:
    page = site.client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for name in ("app.js", "app.css"):
        asset = site.client.get(f"/static/{name}")
        assert asset.status_code == 200 and asset.text == (STATIC_DIR / name).read_text()
    for path in STATIC_DIR.iterdir():  # nothing the page loads names another host
        text = path.read_text()
        assert not re.search(r"https?:|(src|href)=[\"']//|url\(\s*[\"']?//|import\s", text), path.name


# -- the token ----------------------------------------------------------------------------


@pytest.mark.parametrize("url", ["/", "/search?q=red", "/health", "/videos/1", "/static/app.js",
                                 "/segments/0/thumbnail", "/videos/1/file", "/docs", "/openapi.json"])
def test_without_the_token_everything_is_401(site: Site, url: str) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong-token-wrong-token"}, {"Authorization": TOKEN},
                    {"Cookie": f"{COOKIE}=wrong"}):
        response = site.gated.get(url, headers=headers, follow_redirects=False)
        assert response.status_code == 401, (url, headers)
        assert "/static/" not in response.text  # the sign-in form needs nothing else
    site.gated.cookies.clear()


def test_the_token_as_a_header_or_as_the_cookie_the_page_sets(site: Site) -> None:
    gated = site.gated
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    assert gated.get("/health", headers=bearer).status_code == 200
    assert gated.get(file_url(site, "red.mp4"), headers={**bearer, "Range": "bytes=0-3"}).status_code == 206

    form = gated.get("/")
    assert form.status_code == 401 and 'action="/sign-in"' in form.text
    wrong = gated.post("/sign-in", data={"token": "not the token at all"}, follow_redirects=False)
    assert wrong.status_code == 401 and "wrong token" in wrong.text
    assert COOKIE not in wrong.headers.get("set-cookie", "")
    signed = gated.post("/sign-in", data={"token": TOKEN}, follow_redirects=False)
    assert signed.status_code == 303 and signed.headers["location"] == "/"
    cookie = signed.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie
    try:
        # The browser sends the cookie with the page, its files, fetch() and <video>/<img>.
        assert gated.get("/").status_code == 200
        assert gated.get("/static/app.js").status_code == 200
        assert gated.get("/search", params={"q": "red"}).status_code == 200
        assert gated.get(file_url(site, "red.mp4"), headers={"Range": "bytes=0-3"}).status_code == 206
    finally:
        gated.cookies.clear()


def test_listening_beyond_loopback_needs_a_token(tmp_path: Path) -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5") and not is_loopback("example.org")
    with pytest.raises(ValueError, match="--token"):
        serve(tmp_path, host="0.0.0.0", port=0)  # refused before binding or loading anything
    with pytest.raises(ValueError, match="at least 16 characters"):
        serve(tmp_path, host="0.0.0.0", port=0, token="short")
    cli = CliRunner()
    refused = cli.invoke(cli_app, ["serve", "--index", str(tmp_path), "--host", "0.0.0.0", "--port", "0"],
                         env={"PVL_SEARCH_TOKEN": None})
    assert refused.exit_code == 1 and "PVL_SEARCH_TOKEN" in refused.stderr
