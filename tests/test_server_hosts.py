"""Issue 27, items 2, 3, 10 and 13, on a real `pvl-search serve` process over a real index:
the Host check (DNS rebinding), a download of a file whose name is not UTF-8, a token no
client could send, and an invalid Range. Every server log is checked for tracebacks."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from index_helpers import assert_one_error_line, cli_env, index, pvl_search, stop_process, video

from indexer.encoding import ModelRunner
from pvl_web.files import content_disposition
from pvl_web.hosts import AllowedHosts

TOKEN = "hosts-test-token-0123456789"
EXTRA = "search.example"  # given with --allowed-host
HOSTILE = b"clip\xff.mp4"  # not valid UTF-8
WAIT_S = 120


@dataclass
class Server:
    proc: subprocess.Popen
    log: Path
    port: int
    client: httpx.Client  # to 127.0.0.1:port

    def assert_no_traceback(self) -> None:
        assert "Traceback" not in self.log.read_text(errors="replace"), self.log.read_text(errors="replace")


def start(tmp: Path, index_dir: Path, model_dir: Path, *options: str, token: str | None = None) -> Server:
    """`pvl-search serve` on a free port, as a user starts it."""
    env = {k: v for k, v in cli_env().items() if k != "PVL_SEARCH_TOKEN"}
    if token is not None:
        env["PVL_SEARCH_TOKEN"] = token
    log = tmp / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([pvl_search(), "serve", "--index", str(index_dir), "--model", str(model_dir),
                                 "--device", "cpu", "--port", "0", *options], env=env, stdout=out, stderr=out)
    deadline = time.monotonic() + WAIT_S
    while not (found := re.search(r"serving on http://\S+:(\d+)", log.read_text(errors="replace"))):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_process(proc)
            pytest.fail(f"pvl-search serve did not start:\n{log.read_text(errors='replace')}", pytrace=False)
        time.sleep(0.1)
    port = int(found.group(1))
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return Server(proc, log, port, httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60, headers=headers))


def stop(server: Server) -> None:
    server.client.close()
    stop_process(server.proc, timeout=20)
    server.assert_no_traceback()


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory: pytest.TempPathFactory, runner: ModelRunner) -> Path:
    """An index of two real videos, one of them named with a byte that is not UTF-8."""
    root = tmp_path_factory.mktemp("hosts")
    media = root / "media"
    video(media / "clip.mp4", seed=1)
    made = video(media / "made.mp4", seed=2)
    os.rename(os.fsencode(made), os.fsencode(media) + b"/" + HOSTILE)  # the encoder cannot write this name
    index(root / "idx", [media], runner)
    return root / "idx"


@pytest.fixture(scope="module")
def loopback(tmp_path_factory: pytest.TempPathFactory, index_dir: Path, model_dir: Path) -> Iterator[Server]:
    server = start(tmp_path_factory.mktemp("loopback"), index_dir, model_dir, "--allowed-host", EXTRA)
    try:
        yield server
    finally:
        stop(server)


def file_urls(server: Server) -> dict[str, str]:
    """File name as shown (\\xNN for a byte that is not UTF-8) -> the video's file URL."""
    hits = server.client.get("/search", params={"q": "anything", "k": 10}).json()["hits"]
    return {Path(hit["path"]).name: hit["video_url"] for hit in hits}


def refused(response: httpx.Response) -> bool:
    """A 403 with a one-line reason that names the way out."""
    if response.status_code != 403:
        return False
    detail = json.loads(response.content)["detail"] if response.content else ""
    return (not response.content or ("--allowed-host" in detail and "\n" not in detail))


# -- item 2: the Host check ---------------------------------------------------------------


def test_loopback_answers_its_own_names_and_refuses_any_other_host(loopback: Server) -> None:
    port, client = loopback.port, loopback.client
    clip = file_urls(loopback)["clip.mp4"]
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost", f"LocalHost.:{port}", f"[::1]:{port}",
                 "[::1]", "::1", f"127.0.0.2:{port}", EXTRA, f"{EXTRA}:8080", EXTRA.upper()):
        for url in ("/health", "/search?q=a", clip, "/"):
            response = client.get(url, headers={"Host": host})
            assert response.status_code == 200, (host, url, response.text)
    # A rebound name (DNS pointing it at 127.0.0.1) and look-alikes of the allowed names.
    for host in (f"evil.example:{port}", "evil.example", f"localhost.evil.example:{port}", "127.0.0.1.evil.example",
                 f"sub.{EXTRA}", f"{EXTRA}.evil.example", f"10.1.2.3:{port}", "[fd00::1]:80", ""):
        for url in ("/health", "/search?q=a", clip, clip + "?download=1", "/", "/static/app.js", "/docs"):
            response = client.get(url, headers={"Host": host})
            assert refused(response), (host, url, response.status_code, response.text)
            assert b"ftyp" not in response.content  # none of the video
        assert refused(client.head(clip, headers={"Host": host}))
    loopback.assert_no_traceback()


def test_beyond_loopback_the_token_and_the_host_check_both_apply(
        tmp_path: Path, index_dir: Path, model_dir: Path) -> None:
    server = start(tmp_path, index_dir, model_dir, "--host", "0.0.0.0", "--allowed-host", EXTRA, token=TOKEN)
    try:
        client, port = server.client, server.port
        # Reached by any of the machine's addresses, or by the name given: answered with the token.
        for host in (f"127.0.0.1:{port}", f"0.0.0.0:{port}", f"192.0.2.7:{port}", f"[2001:db8::7]:{port}", EXTRA):
            assert client.get("/health", headers={"Host": host}).status_code == 200, host
            assert client.get("/health", headers={"Host": host, "Authorization": "Bearer wrong"}).status_code == 401
        # A name nobody allowed: refused even with the right token.
        for host in (f"evil.example:{port}", f"other.{EXTRA}"):
            assert refused(client.get("/health", headers={"Host": host})), host
            assert refused(client.get("/search", params={"q": "a"}, headers={"Host": host}))
    finally:
        stop(server)


def test_the_host_rule() -> None:
    default = AllowedHosts.for_bind("127.0.0.1")
    assert all(default.allows(h) for h in ("localhost", "127.0.0.1:1", "[::1]:8000", "::1", "localhost."))
    assert not any(default.allows(h) for h in (None, "", "evil.example", "10.0.0.1", "[::1", "localhost:80:90"))
    bound = AllowedHosts.for_bind("192.168.1.5", ["Search.Example:8080", "[fd00::5]"])
    assert all(bound.allows(h) for h in ("192.168.1.5:8000", "search.example", "[FD00::5]:80", "localhost"))
    assert not bound.allows("192.168.1.6") and not bound.allows("evil.example")
    everywhere = AllowedHosts.for_bind("::")
    assert everywhere.allows("10.0.0.1:8000") and everywhere.allows("[fd00::9]") and not everywhere.allows("x.example")
    assert AllowedHosts.for_bind("127.0.0.1", ["*"]).allows("evil.example")
    for bad in ("", "a b", "http://x/", "*.example"):
        with pytest.raises(ValueError, match="--allowed-host"):
            AllowedHosts.for_bind("127.0.0.1", [bad])


def test_a_bad_allowed_host_is_one_error_line(tmp_path: Path) -> None:
    proc = subprocess.run([pvl_search(), "serve", "--index", str(tmp_path), "--port", "0", "--allowed-host",
                           "http://x/"], capture_output=True, text=True, timeout=WAIT_S, env=cli_env())
    assert_one_error_line(proc, "--allowed-host")


# -- item 3: a download of a file whose name is not UTF-8 ---------------------------------


def test_download_of_a_file_whose_name_is_not_utf8(loopback: Server, index_dir: Path) -> None:
    url = file_urls(loopback)["clip\\xff.mp4"]
    data = (index_dir.parent / "media" / os.fsdecode(HOSTILE)).read_bytes()
    for method in ("GET", "HEAD"):
        response = loopback.client.request(method, url, params={"download": 1})
        assert response.status_code == 200, response.text
        assert response.headers["content-disposition"] == (
            "attachment; filename=\"clip_.mp4\"; filename*=UTF-8''clip%EF%BF%BD.mp4")
        assert response.content == (data if method == "GET" else b"")
    part = loopback.client.get(url, params={"download": 1}, headers={"Range": "bytes=0-9"})
    assert part.status_code == 206 and part.content == data[:10]
    plain = loopback.client.get(file_urls(loopback)["clip.mp4"], params={"download": 1})
    assert plain.headers["content-disposition"] == 'attachment; filename="clip.mp4"'
    loopback.assert_no_traceback()


def test_content_disposition_fits_any_name() -> None:
    assert content_disposition("old.avi") == 'attachment; filename="old.avi"'
    assert content_disposition("a b.mp4") == 'attachment; filename="a b.mp4"'
    assert content_disposition("naïve ✓.mp4") == (
        "attachment; filename=\"na_ve _.mp4\"; filename*=UTF-8''na%C3%AFve%20%E2%9C%93.mp4")
    assert content_disposition('say "hi"\\\n100%.mp4') == (
        "attachment; filename=\"say _hi___100_.mp4\"; filename*=UTF-8''say%20%22hi%22%5C%0A100%25.mp4")
    header = content_disposition(os.fsdecode(b"\xff\xfe\r\n.mp4"))
    assert header.isascii() and header.isprintable()


# -- item 10: a token no client could send ------------------------------------------------


@pytest.mark.parametrize(("how", "token"), [
    ("option", "tökén-with-accents-0123456789"),
    ("option", "a token with spaces 0123456789"),
    ("environment", os.fsdecode(b"raw-\xff-byte-token-0123456789")),  # as the shell hands it over
])
def test_a_token_no_client_could_send_is_refused_at_start(tmp_path: Path, how: str, token: str) -> None:
    env = {k: v for k, v in cli_env().items() if k != "PVL_SEARCH_TOKEN"}
    args = [pvl_search(), "serve", "--index", str(tmp_path), "--port", "0"]  # refused before it looks
    if how == "option":
        args += ["--token", token]
    else:
        env["PVL_SEARCH_TOKEN"] = token
    proc = subprocess.run(args, capture_output=True, timeout=WAIT_S, env=env)
    text = subprocess.CompletedProcess(proc.args, proc.returncode, "", proc.stderr.decode("utf-8", "replace"))
    line = assert_one_error_line(text, "token", "ASCII")
    assert "0123456789" not in line  # the secret is not echoed


# -- item 13: an invalid Range is ignored ---------------------------------------------------


def test_an_invalid_range_gets_the_whole_file(loopback: Server, index_dir: Path) -> None:
    url = file_urls(loopback)["clip.mp4"]
    data = (index_dir.parent / "media" / "clip.mp4").read_bytes()
    size = len(data)
    # Last byte before the first (also when both lie past the end), an unknown unit, no range.
    for header in ("bytes=100-50", "bytes=9-0", f"bytes={size + 100}-{size + 50}", "bytes=0-9,100-50",
                   "items=0-9", "bytes=abc", "bytes="):
        response = loopback.client.get(url, headers={"Range": header})
        assert response.status_code == 200, (header, response.status_code, response.text[:80])
        assert response.content == data and "content-range" not in response.headers, header
    assert loopback.client.get(url, headers={"Range": "bytes=0-9"}).content == data[:10]  # a valid one: 206
    beyond = loopback.client.get(url, headers={"Range": f"bytes={size}-"})
    assert beyond.status_code == 416 and beyond.headers["content-range"] == f"bytes */{size}"
    loopback.assert_no_traceback()
