"""The search page (GET /) in a real headless Chromium, against the FastAPI app in-process.

No Ray: the app runs on ``LocalBackend`` over a tiny gallery, under uvicorn in a thread on
127.0.0.1. Selenium drives Debian's ``/usr/bin/chromium`` through ``/usr/bin/chromedriver``
(given explicitly, so Selenium Manager never tries to download a driver). The page's ranked
results must be exactly the API's: same images in the same order, same scores and captions;
clicking a result must list that image's captions as ``POST /search/image`` ranks them.

CI installs the browser with ``apt-get install -y chromium chromium-driver``; without it this
module is skipped.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import threading
import time
import urllib.request
from collections.abc import Iterator

import pytest

from hrem_ray.testing import tiny_data_and_checkpoint
from tests.helpers import needs_chromium, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180), needs_chromium]

QUERY = "a dog runs on the grass"
K = 5
SHED_MESSAGE = "Request dropped due to backpressure (test)."


class SheddingProxy:
    """ASGI wrapper standing in for Serve's HTTP proxy: when told to, it answers the next
    search with the plain-text 503 that Serve sends when it sheds load, or holds it back
    for ``delay_next`` seconds (a slow replica)."""

    def __init__(self, app):
        self.app = app
        self.shed_next = False
        self.delay_next = 0.0

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and self.delay_next and scope["path"].startswith("/search"):
            delay, self.delay_next = self.delay_next, 0.0
            await asyncio.sleep(delay)
        if scope["type"] == "http" and self.shed_next and scope["path"].startswith("/search"):
            self.shed_next = False
            headers = [(b"content-type", b"text/plain; charset=utf-8")]
            await send({"type": "http.response.start", "status": 503, "headers": headers})
            await send({"type": "http.response.body", "body": SHED_MESSAGE.encode()})
            return
        await self.app(scope, receive, send)


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_bert) -> Iterator[tuple[str, SheddingProxy]]:
    """(base URL, proxy) of the app served by uvicorn on a free loopback port."""
    import uvicorn

    from hrem_ray.cli import main
    from hrem_ray.serving.api import LocalBackend, build_app
    from hrem_ray.serving.service import RetrievalService

    root = tmp_path_factory.mktemp("page")
    tiny_data_and_checkpoint(root, tiny_bert)
    main(["index", "--checkpoint", str(root / "ckpt"), "--data-path", str(root / "data"),
          "--dataset", "f30k", "--split", "test", "--out", str(root / "gallery")])  # fmt: skip
    backend = LocalBackend(RetrievalService(root / "ckpt", root / "gallery"))
    proxy = SheddingProxy(build_app(backend))

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))  # the port is ours from here on: no race with other tests
    port = sock.getsockname()[1]
    config = uvicorn.Config(proxy, log_level="warning", lifespan="off")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}", proxy
    finally:
        srv.should_exit = True
        thread.join(10)
        sock.close()


def api(base: str, path: str, body: dict) -> dict:
    req = urllib.request.Request(
        base + path, json.dumps(body).encode(), {"content-type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.load(r)


def status(driver) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, "status").text


def result_items(driver) -> list[dict]:
    """Each result <li>: its score text, the rest of its first line, and any caption lines."""
    return driver.execute_script(
        """return [...document.querySelectorAll('#results li')].map((li) => ({
             score: li.querySelector('.score').textContent,
             text: li.innerText,
             caps: li.querySelector('.caps') ? li.querySelector('.caps').innerText : null,
           }));"""
    )


def assert_score(shown: str, score: float) -> None:
    assert abs(float(shown) - score) <= 0.0005 + 1e-9, (shown, score)


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_search_page_end_to_end(server, browser, tmp_path):
    from selenium.webdriver.common.by import By

    base, _ = server
    expected = api(base, "/search/text", {"query": QUERY, "k": K})["results"]
    assert len(expected) == K

    browser.get(base + "/")
    assert browser.title == "HREM retrieval"
    box = browser.find_element(By.ID, "query")
    box.send_keys(QUERY)
    k_box = browser.find_element(By.ID, "k")
    k_box.clear()
    k_box.send_keys(str(K))
    browser.find_element(By.CSS_SELECTOR, "#search button[type=submit]").click()
    wait_for(browser, lambda d: "images for" in status(d), "text search results")

    assert status(browser).startswith(f"{K} images for “{QUERY}”"), status(browser)
    items = result_items(browser)
    assert len(items) == K
    shown_scores = [float(it["score"]) for it in items]
    assert shown_scores == sorted(shown_scores, reverse=True), "results not ranked"
    for rank, (item, hit) in enumerate(zip(items, expected, strict=True)):
        first_line = item["text"].splitlines()[0]
        assert first_line.endswith(f"image {hit['id']}"), (rank, first_line, hit["id"])
        assert_score(item["score"], hit["score"])
        assert hit["captions"], hit
        assert item["caps"].splitlines() == hit["captions"], rank

    first = expected[0]["id"]
    want = api(base, "/search/image", {"image_id": first, "k": K})["results"]
    browser.find_elements(By.CSS_SELECTOR, "#results li")[0].click()
    wait_for(browser, lambda d: "captions for image" in status(d) and "…" not in status(d),
             "caption results")  # fmt: skip
    assert status(browser) == f"{K} captions for image {first}"
    items = result_items(browser)
    assert len(items) == len(want) == K
    for item, hit in zip(items, want, strict=True):
        assert_score(item["score"], hit["score"])
        text = item["text"][len(item["score"]) :].strip()
        assert text == f"{hit['caption']} (image {hit['image_id']})"
        assert item["caps"] is None

    shot = tmp_path / "search_page.png"
    assert browser.save_screenshot(str(shot))
    data = shot.read_bytes()
    width, height = png_size(data)
    assert width >= 300 and height >= 300, (width, height)
    assert len(data) > 5_000, f"screenshot only {len(data)} bytes"
    from PIL import Image  # matplotlib's dependency

    with Image.open(shot) as im:
        colours = im.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is None or len(colours) > 20, "screenshot is (nearly) blank"


def test_search_page_shows_plain_text_errors(server, browser):
    """Serve's proxy answers a shed request with a plain-text 503, not the API's JSON error:
    the page must show that text, not a JSON parse error, and no stale results."""
    from selenium.webdriver.common.by import By

    base, proxy = server
    browser.get(base + "/")
    browser.find_element(By.ID, "query").send_keys(QUERY)
    proxy.shed_next = True
    browser.find_element(By.CSS_SELECTOR, "#search button[type=submit]").click()
    wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#status .error"), "error")
    message = browser.find_element(By.CSS_SELECTOR, "#status .error").text
    assert message == SHED_MESSAGE, message
    assert not browser.find_elements(By.CSS_SELECTOR, "#results li")

    # the next try goes through and shows results
    browser.find_element(By.CSS_SELECTOR, "#search button[type=submit]").click()
    wait_for(browser, lambda d: "images for" in status(d), "text search results")
    assert len(browser.find_elements(By.CSS_SELECTOR, "#results li")) == 10


def test_a_late_answer_does_not_overwrite_a_newer_search(server, browser):
    """Two searches in flight: the first one's answer arrives last and must be dropped."""
    from selenium.webdriver.common.by import By

    base, proxy = server
    browser.get(base + "/")
    box = browser.find_element(By.ID, "query")
    submit = browser.find_element(By.CSS_SELECTOR, "#search button[type=submit]")
    box.send_keys("a red car")
    proxy.delay_next = 3.0
    submit.click()
    time.sleep(0.5)  # the first search is now held back in the proxy
    box.clear()
    box.send_keys(QUERY)
    submit.click()
    wait_for(browser, lambda d: "images for" in status(d), "the second search's results")
    assert QUERY in status(browser)
    time.sleep(3.5)  # the first answer has arrived by now
    assert QUERY in status(browser) and "red car" not in status(browser), status(browser)
    want = [h["id"] for h in api(base, "/search/text", {"query": QUERY, "k": 10})["results"]]
    shown = [it["text"].splitlines()[0].rsplit(" ", 1)[-1] for it in result_items(browser)]
    assert [int(x) for x in shown] == want
