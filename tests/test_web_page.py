"""The search page in a real browser: Debian's headless Chromium, driven through its
chromedriver by Selenium, against a real `pvl-search serve` process over an index that a real
`pvl-search index` process made of real videos (the synthetic generator's H.264 MP4s, plus an
MPEG-4 AVI that browsers cannot play), with the shipped model.

The browser types a query, sees cards whose thumbnails loaded, clicks one and watches the
<video> reach the moment's start and play, opens the AVI (thumbnail and download link, no
broken player), clicks a point on a card's relevance strip and watches the video play from
there, asks for "More like this" (the card's own video comes first) and goes back, and
applies a filter that changes the results.

With PVL_SCREENSHOT=PATH the page is also saved there as a PNG (the README's picture:
`PVL_SCREENSHOT=docs/screenshot.png python3 -m pytest tests/test_web_page.py`).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from index_helpers import pvl_search, stop_process

from pvl_search.data.long_synth import generate_long_corpus
from pvl_search.data.synth import generate_corpus
from pvl_search.media.sample_files import write_video

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--window-size=1280,1040", "--autoplay-policy=no-user-gesture-required", "--mute-audio",
)  # fmt: skip
QUERY = "a red circle moves left"
WAIT_S = 60  # a loaded 2-core machine: generous, the waits return as soon as things happen


def stripes(i: int, w: int, h: int) -> np.ndarray:
    """Moving black-and-white vertical stripes (a media.FrameFn)."""
    x = (np.arange(w) + 2 * i) // 8 % 2 * 255
    return np.broadcast_to(x.astype(np.uint8)[None, :, None], (h, w, 3)).copy()


@dataclass
class Served:
    url: str
    videos: Path


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """Eight synthetic 6 s videos, two long ones of four events and an AVI, indexed in 2 s
    windows by `pvl-search index` with the shipped model, served by `pvl-search serve`."""
    root = tmp_path_factory.mktemp("page")
    corpus = generate_corpus(root / "corpus", 8, seed=5, size=64, seconds=6.0, workers=1, splits=(0.0, 0.0, 1.0))
    videos = corpus.captions_path.parent / "videos"
    # Two long videos of four events each (13+ s): their best moments start well past 0 s.
    for path in (Path(generate_long_corpus(root / "long", 2, 4, seed=1).out_dir) / "videos").iterdir():
        path.rename(videos / path.name)
    write_video(videos / "zebra.avi", codec="mpeg4", frame_fn=stripes, seconds=4.0, width=64, height=64)
    env = {**{k: v for k, v in os.environ.items() if k != "PVL_SEARCH_TOKEN"}, "OMP_NUM_THREADS": "1"}
    index = subprocess.run(
        [pvl_search(), "index", str(videos), "--index", str(root / "idx"), "--window", "2", "--stride", "1",
         "--workers", "1", "--json"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert index.returncode == 0, index.stderr
    log_path = root / "serve.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([pvl_search(), "serve", "--index", str(root / "idx"), "--port", "0"],
                                env=env, stdout=log, stderr=log)
        try:
            deadline = time.monotonic() + WAIT_S
            url = ""
            while not url:
                if proc.poll() is not None:
                    pytest.fail(f"pvl-search serve exited with {proc.returncode}:\n{log_path.read_text()}",
                                pytrace=False)
                if time.monotonic() > deadline:
                    pytest.fail(f"pvl-search serve did not start:\n{log_path.read_text()}", pytrace=False)
                found = re.search(r"serving on (http://\S+)", log_path.read_text())
                url = found.group(1) if found else ""
                time.sleep(0.2)
            yield Served(url, videos)
        finally:
            stop_process(proc)
    assert "Traceback" not in log_path.read_text()


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    """Headless Chromium with a fresh profile, through chromedriver (never a downloaded browser)."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).exists()]
    if missing:
        pytest.fail(f"{', '.join(missing)} missing: run the tests with scripts/test.sh, which installs "
                    "Debian's chromium and chromium-driver", pytrace=False)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="pvl-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def wait_for(driver, script: str, *args: object, timeout: float = WAIT_S):  # noqa: ANN001, ANN201
    """Poll a JavaScript expression until it returns something truthy; return that."""
    deadline = time.monotonic() + timeout
    while True:
        value = driver.execute_script(script, *args)
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for: {script}", pytrace=False)
        time.sleep(0.1)


CARD_DATA = """return [...document.querySelectorAll('#results .card')].map(c => ({
  start: Number(c.dataset.start), end: Number(c.dataset.end), path: c.title}))"""
ONE_CARD = """const c = [...document.querySelectorAll('#results .card')];
return c.length === 1 && [{path: c[0].title}]"""
THUMBNAILS_LOADED = """const imgs = [...document.querySelectorAll('#results .card img.thumb')];
return imgs.length > 0 && imgs.every(i => i.complete) && imgs.map(i => i.naturalWidth)"""


def hundredths(seconds: float) -> str:
    """As the page writes a time into a media fragment (app.js `hundredths`): JavaScript's
    toFixed(2) rounds an exact tie such as 12.625 (a frame time at 8 fps) up, Python's round to even."""
    from decimal import ROUND_HALF_UP, Decimal

    return f"{float(Decimal(seconds).quantize(Decimal('0.01'), ROUND_HALF_UP)):g}"


def click_card(driver, index: int) -> None:  # noqa: ANN001
    """Click result card `index`, scrolled to the middle (clear of the sticky header)."""
    from selenium.webdriver.common.by import By

    card = driver.find_elements(By.CSS_SELECTOR, "#results .card")[index]
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", card)
    card.click()


def save_screenshot(driver, path: Path) -> Path:  # noqa: ANN001
    """The page from its top, as a PNG (also the README's picture, with PVL_SCREENSHOT)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    driver.execute_script("window.scrollTo(0, 0)")
    assert driver.save_screenshot(str(path)), path
    return path


def test_search_watch_the_moment_and_filter(served: Served, browser, tmp_path: Path) -> None:  # noqa: ANN001
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    driver = browser
    driver.get(served.url + "/")
    h264 = driver.execute_script(
        "return document.createElement('video').canPlayType('video/mp4; codecs=\"avc1.64000a\"')")
    if not h264:
        pytest.fail("this Chromium cannot play H.264 MP4 (built without proprietary codecs): the playback "
                    "check cannot run here; Debian's chromium package plays it", pytrace=False)

    # 1. type a query
    box = driver.find_element(By.ID, "q")
    box.send_keys(QUERY, Keys.ENTER)
    wait_for(driver, "return document.querySelectorAll('#results .card').length >= 2")
    # 2. result cards whose thumbnails loaded
    widths = wait_for(driver, THUMBNAILS_LOADED)
    assert all(w > 0 for w in widths), widths
    cards = driver.execute_script(CARD_DATA)
    assert len(cards) == 11  # every video (k = 12 > 11)
    assert driver.find_element(By.ID, "status").text.startswith("11 videos")

    # 3. click the card whose moment starts latest, an MP4 (the page seeks into the video)
    mp4 = [i for i, c in enumerate(cards) if c["path"].endswith(".mp4")]
    pick = max(mp4, key=lambda i: cards[i]["start"])
    start, end = cards[pick]["start"], cards[pick]["end"]
    assert start > 0, cards  # a long video's best moment starts later
    click_card(driver, pick)
    # 4. the <video> reaches the moment's start and plays (has data for the current position)
    state = wait_for(driver, """const v = document.querySelector('#stage video');
      return v && !v.error && v.readyState >= 2 && v.currentTime >= arguments[0] - 0.05
             && {t: v.currentTime, ready: v.readyState, src: v.currentSrc}""", start)
    assert start - 0.05 <= state["t"] <= end + 0.5, (state, start, end)
    assert state["ready"] >= 2
    assert re.search(rf"/videos/\d+/file#t={hundredths(start)},{hundredths(end)}$", state["src"]), state
    shot = save_screenshot(driver, tmp_path / "page.png")
    if os.environ.get("PVL_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["PVL_SCREENSHOT"])

    # An AVI: no player, its thumbnail and a download link instead.
    avi = next(i for i, c in enumerate(cards) if c["path"].endswith("zebra.avi"))
    click_card(driver, avi)
    still = wait_for(driver, """const i = document.querySelector('#stage img.still');
      return !document.querySelector('#stage video') && i && i.complete && i.naturalWidth""")
    assert still > 0
    link = driver.find_element(By.ID, "download")
    assert link.get_attribute("href").endswith("/file?download=1") and "zebra.avi" in link.text
    assert "cannot play" in driver.find_element(By.ID, "player-note").text

    # Keyboard: Escape closes the player, the arrows move between cards.
    driver.find_element(By.TAG_NAME, "body").send_keys(Keys.ESCAPE)
    wait_for(driver, "return document.getElementById('player').hidden")
    driver.switch_to.active_element.send_keys(Keys.ARROW_RIGHT)
    assert driver.execute_script("return Number(document.activeElement.dataset.index)") == min(avi + 1, len(cards) - 1)

    # 5. the relevance strip: drawn from the hit's timeline; a click plays from that point
    other = next(i for i in mp4 if i != pick and "long" in cards[i]["path"])
    check_the_strip(driver, served, cards[other]["path"], other)
    # 6. "More like this": the card's own video first, a note, and the way back
    check_more_like_this(driver, cards, max(mp4))

    # 7. a filter changes the results: only paths matching the glob
    name = Path(cards[0]["path"]).name
    glob = driver.find_element(By.ID, "glob")
    glob.send_keys(f"*/{name}", Keys.ENTER)
    filtered = wait_for(driver, ONE_CARD)
    assert Path(filtered[0]["path"]).name == name
    assert driver.execute_script("return new URLSearchParams(location.search).get('glob')") == f"*/{name}"


STRIP = """const strip = document.querySelectorAll('#results .result')[arguments[0]].querySelector('.timeline');
const canvas = strip.querySelector('canvas');
const pixels = canvas.getContext('2d').getImageData(0, 0, canvas.width, 1).data;
const box = strip.getBoundingClientRect();
return {length: Number(strip.dataset.length), width: canvas.width, left: box.left, boxWidth: box.width,
        alpha: [...pixels].filter((_, i) => i % 4 === 3),
        marks: strip.querySelectorAll('.mark').length, best: strip.querySelectorAll('.mark.best').length}"""
PLAYING = """const v = document.querySelector('#stage video');
return v && !v.error && !v.paused && v.readyState >= 2 && v.played.length > 0
       && v.currentTime > v.played.start(0) + 0.2
       && {start: v.played.start(0), t: v.currentTime, time: document.getElementById('player-time').textContent}"""


def check_the_strip(driver, served: Served, path: str, index: int) -> None:  # noqa: ANN001
    """The strip of result `index` has a step per timeline score, coloured by score, the
    moments marked; a click at 70 % of it plays the video from there (within one step)."""
    import json
    import urllib.parse
    import urllib.request

    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    with urllib.request.urlopen(f"{served.url}/search?{urllib.parse.urlencode({'q': QUERY, 'k': 12})}") as answer:
        hit = next(h for h in json.load(answer)["hits"] if h["path"] == path)
    scores, step = hit["timeline"]["scores"], hit["timeline"]["step_s"]
    strip = driver.execute_script(STRIP, index)
    assert strip["width"] == len(scores) > 1 and strip["length"] == pytest.approx(step * len(scores))
    assert strip["marks"] == len(hit["moments"]) >= 1 and strip["best"] == 1
    alpha = strip["alpha"]  # stronger where the score is higher
    assert alpha[int(np.argmax(scores))] == max(alpha) > alpha[int(np.argmin(scores))] == min(alpha)

    element = driver.find_elements(By.CSS_SELECTOR, "#results .result .timeline")[index]
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'});"
                          "document.addEventListener('click', e => { window.clickedAt = e.clientX }, true)", element)
    strip = driver.execute_script(STRIP, index)  # where it is now
    ActionChains(driver).move_to_element_with_offset(element, round(0.2 * strip["boxWidth"]), 0).click().perform()
    clicked = (driver.execute_script("return window.clickedAt") - strip["left"]) / strip["boxWidth"]
    expected = clicked * strip["length"]
    assert 0.6 < clicked < 0.8, clicked
    state = wait_for(driver, PLAYING)
    assert abs(state["start"] - expected) <= step + 0.01, (state, expected, step)
    assert state["time"].startswith("from ")
    # From the keyboard (no position): Enter on the strip plays from the best moment's start.
    best = hit["moments"][0]["start_s"]
    element.send_keys(Keys.ENTER)
    t = wait_for(driver, """const v = document.querySelector('#stage video');
      return document.getElementById('player-time').textContent === 'from ' + clock(arguments[0])
             && v.currentTime >= arguments[0] - 0.05 && v.currentTime""", best)
    assert t < best + 2, (t, best)


LIKE_SHOWN = """const bar = document.getElementById('like-bar');
const first = document.querySelector('#results .card');
return !bar.hidden && first && first.dataset.videoId === arguments[0]
       && document.getElementById('status').textContent.includes('video')
       && {note: document.getElementById('like-note').textContent,
           back: document.getElementById('like-back').textContent,
           like: new URLSearchParams(location.search).get('like'), rerank: document.getElementById('rerank').disabled,
           count: document.querySelectorAll('#results .card').length}"""


def check_more_like_this(driver, cards: list[dict], index: int) -> None:  # noqa: ANN001
    """"More like this" on result `index` shows results led by its own video, says so, and
    "Back" shows the text query's results again."""
    from selenium.webdriver.common.by import By

    result = driver.find_elements(By.CSS_SELECTOR, "#results .result")[index]
    video_id = result.find_element(By.CSS_SELECTOR, ".card").get_attribute("data-video-id")
    first_before = driver.execute_script("return document.querySelector('#results .card').dataset.videoId")
    assert video_id != first_before  # so that leading the results means something
    button = result.find_element(By.CSS_SELECTOR, "button.like")
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", button)
    button.click()
    shown = wait_for(driver, LIKE_SHOWN, video_id)
    assert Path(cards[index]["path"]).name in shown["note"] and shown["note"].startswith("Videos like ")
    assert shown["back"] == f"Back to “{QUERY}”" and shown["like"].isdigit() and shown["rerank"]
    driver.refresh()  # the address bar keeps it: the same results and note after a reload
    assert wait_for(driver, LIKE_SHOWN, video_id) == shown
    driver.find_element(By.ID, "like-back").click()
    back = wait_for(driver, """return document.getElementById('like-bar').hidden
      && document.querySelector('#results .card')?.dataset.videoId === arguments[0]
      && {count: document.querySelectorAll('#results .card').length, url: location.search}""", first_before)
    assert back["count"] == len(cards) and "like=" not in back["url"]
