"""End to end in headless Chromium: tools/serve.py on a loopback port, upload a COCO image on the page, wait for
the caption, hover and focus words, and check that their attended boxes are drawn. Saves a screenshot under
tests_artifacts/."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from captioner_fixtures import ROOT, coco_image_paths, write_tiny_checkpoint

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = ROOT / "tests_artifacts"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} is absent (apt-get install chromium)")


@contextmanager
def running_tool(tool: str, arguments: list[str], log_path: Path) -> Iterator[str]:
    """``tools/<tool>`` (serve.py, gallery.py) in a subprocess on a free 127.0.0.1 port; yields its URL once
    /healthz answers (fails the test with the tool's log if it exits or stays silent for 120 s)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, str(ROOT / "tools" / tool), *arguments, "--port", str(port),
                                    "--log-level", "warning"], stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                pytest.fail(f"tools/{tool} exited with {process.returncode}:\n{log_path.read_text()}")
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass  # not listening yet
            if time.monotonic() > deadline:
                pytest.fail(f"tools/{tool} did not answer within 120 s:\n{log_path.read_text()}")
            time.sleep(0.25)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def server_url(tmp_path_factory):
    """tools/serve.py with the small random detector and a tiny checkpoint on a free 127.0.0.1 port."""
    checkpoint = write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt")
    arguments = ["--detector", "random", "--small-detector", "--checkpoint", str(checkpoint), "--device", "cpu"]
    with running_tool("serve.py", arguments, tmp_path_factory.mktemp("log") / "server.log") as url:
        yield url


def test_upload_caption_and_highlight_attended_boxes(server_url):
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (Python package)")
    images = coco_image_paths()
    if not images:
        pytest.skip(f"no COCO images under {ROOT.parent / 'shared' / 'data' / 'coco_images'}")
    image = next((p for p in images if "273052" in p.name), images[0])
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(server_url)
            # /healthz says the detector is random, and the page says the captions are meaningless.
            sync_api.expect(page.locator("#random-warning")).to_be_visible()
            sync_api.expect(page.locator("#random-warning")).to_contain_text("meaningless")

            page.set_input_files("#file", str(image))
            page.wait_for_selector("#caption .word", timeout=180_000)
            words = page.locator("#caption .word")
            assert words.count() >= 1
            sync_api.expect(page.locator("#alternatives li")).to_have_count(3)
            sync_api.expect(page.locator("#photo")).to_be_visible()

            # Hovering a word draws its most attended regions, labelled "word: object (weight)".
            target = words.nth(min(1, words.count() - 1))
            word = target.inner_text()
            target.hover()
            boxes = page.locator("#boxes .box")
            sync_api.expect(boxes.first).to_be_visible()
            assert 1 <= boxes.count() <= 5
            labels = boxes.locator(".box-label").all_inner_texts()
            assert 1 <= len(labels) <= 3
            assert all(label.startswith(f"{word}: ") and label.endswith(")") for label in labels)
            # Outline and fill fade with the weight: the strongest box is fully opaque.
            strengths = [float(b.evaluate("e => getComputedStyle(e).getPropertyValue('--strength')"))
                         for b in boxes.all()]
            assert max(strengths) == pytest.approx(1.0, abs=0.01) and min(strengths) > 0.3
            assert boxes.last.evaluate("e => getComputedStyle(e).borderTopColor") != "rgba(0, 0, 0, 0)"
            sync_api.expect(page.locator("#attended li")).to_have_count(boxes.count())
            page.screenshot(path=str(ARTIFACTS / "browser_caption.png"), full_page=True)

            # Keyboard: the words are focusable buttons; focusing one highlights its boxes too.
            page.mouse.move(5, 5)
            sync_api.expect(boxes).to_have_count(0)
            words.first.focus()
            sync_api.expect(boxes.first).to_be_visible()
            assert page.evaluate("document.activeElement.classList.contains('word')")

            # A file that is not an image: the page shows the server's message naming it.
            page.set_input_files("#file", {"name": "notes.png", "mimeType": "image/png", "buffer": b"not a png"})
            sync_api.expect(page.locator("#status")).to_contain_text("notes.png", timeout=30_000)
            sync_api.expect(page.locator("#status")).to_have_class("status error")
        finally:
            browser.close()
    assert (ARTIFACTS / "browser_caption.png").stat().st_size > 50_000

