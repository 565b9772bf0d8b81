"""End to end in headless Chromium: tools/gallery.py (in-process model: the small random detector and a tiny
checkpoint) on a loopback port. Register, upload two COCO images, see both captioned in the grid, favourite one and
filter, open it and hover a word (boxes lit), delete the other, search, log out; a second user sees an empty
gallery and a hostile file name shown as text; then the same gallery on a phone-sized screen. Screenshots go to
tests_artifacts/gallery_*.png."""
from __future__ import annotations


import pytest

from captioner_fixtures import ROOT, coco_image_paths, write_tiny_checkpoint
from test_browser import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS, running_tool

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} is absent (apt-get install chromium)")
PASSWORD = "correct horse battery"


@pytest.fixture(scope="module")
def gallery_url(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gallery")
    checkpoint = write_tiny_checkpoint(folder / "tiny.pt")
    arguments = ["--detector", "random", "--small-detector", "--checkpoint", str(checkpoint), "--device", "cpu",
                 "--database", f"sqlite:///{folder / 'g.db'}", "--data-dir", str(folder / "data")]
    with running_tool("gallery.py", arguments, folder / "server.log") as url:
        yield url


def authenticate(page, expect, username: str, button: str) -> None:
    expect(page.locator("#auth-view")).to_be_visible()
    page.fill("#username", username)
    page.fill("#password", PASSWORD)
    page.click(button)
    expect(page.locator("#gallery-view")).to_be_visible()
    expect(page.locator("#whoami")).to_have_text(username)


def test_gallery_in_the_browser(gallery_url):
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (Python package)")
    expect = sync_api.expect
    images = coco_image_paths()
    if len(images) < 2:
        pytest.skip(f"fewer than 2 COCO images under {ROOT.parent / 'shared' / 'data' / 'coco_images'}")
    first, second = images[:2]
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(gallery_url)
            expect(page.locator("#random-warning")).to_be_visible()
            authenticate(page, expect, "alice", "#register")
            expect(page.locator("#empty")).to_be_visible()

            page.set_input_files("#file", [str(first), str(second)])
            tiles = page.locator("#grid .tile")
            expect(tiles).to_have_count(2, timeout=180_000)
            expect(page.locator("#status")).to_contain_text("stored 2 image(s)")
            for i in range(2):
                assert tiles.nth(i).locator(".tile-caption").inner_text().strip()
                thumb = tiles.nth(i).locator("img")
                expect(thumb).to_have_js_property("complete", True)
                assert thumb.evaluate("img => img.naturalWidth") > 0
            # Newest first: the second file was stored last.
            expect(tiles.nth(0).locator(".tile-name")).to_have_text(second.name)
            page.screenshot(path=str(ARTIFACTS / "gallery_grid.png"), full_page=True)

            favourite = tiles.nth(0)
            favourite_id = favourite.get_attribute("data-id")
            favourite.locator(".star").click()
            expect(favourite.locator(".star")).to_have_attribute("aria-pressed", "true")
            page.click("#favourites-only")
            expect(tiles).to_have_count(1)
            expect(tiles.first).to_have_attribute("data-id", favourite_id)

            # Open it (keyboard: the thumbnail is a button) and hover a word: its attended boxes light up.
            tiles.first.locator(".open").focus()
            page.keyboard.press("Enter")
            expect(page.locator("#detail")).to_be_visible()
            expect(page.locator("#photo")).to_have_js_property("complete", True)
            words = page.locator("#caption .word")
            expect(words.first).to_be_visible()
            target = words.nth(min(1, words.count() - 1))
            word = target.inner_text()
            target.hover()
            boxes = page.locator("#boxes .box")
            expect(boxes.first).to_be_visible()
            assert 1 <= boxes.count() <= 5
            labels = boxes.locator(".box-label").all_inner_texts()
            assert labels and all(label.startswith(f"{word}: ") for label in labels)
            expect(page.locator("#attended li")).to_have_count(boxes.count())
            expect(page.locator("#detail-favourite")).to_have_attribute("aria-pressed", "true")
            page.screenshot(path=str(ARTIFACTS / "gallery_detail.png"))
            page.click("#detail-close")
            expect(page.locator("#detail")).to_be_hidden()

            # Delete the other one, after confirming.
            page.click("#favourites-only")
            expect(tiles).to_have_count(2)
            tiles.nth(1).locator(".open").click()
            expect(page.locator("#photo")).to_have_js_property("complete", True)
            page.click("#detail-delete")
            expect(page.locator("#confirm")).to_be_visible()
            expect(page.locator("#confirm-text")).to_contain_text(first.name)
            page.click("#confirm-yes")
            expect(tiles).to_have_count(1)
            expect(tiles.first).to_have_attribute("data-id", favourite_id)
            expect(page.locator("#status")).to_contain_text(f"Deleted {first.name}")

            caption = tiles.first.locator(".tile-caption").inner_text()
            page.fill("#search", caption.split()[0])
            expect(page.locator("#count")).to_have_text("1 image")
            page.fill("#search", "zzzz")
            expect(tiles).to_have_count(0)
            expect(page.locator("#empty")).to_have_text("No image matches.")
            page.fill("#search", "")
            expect(tiles).to_have_count(1)

            page.click("#logout")
            expect(page.locator("#auth-status")).to_have_text("You are logged out.")
            authenticate(page, expect, "bob", "#register")
            expect(page.locator("#empty")).to_be_visible()
            expect(tiles).to_have_count(0)
            expect(page.locator("#count")).to_have_text("0 images")
            page.screenshot(path=str(ARTIFACTS / "gallery_second_user.png"), full_page=True)
            # A file name that is markup stays text.
            hostile = "<img src=x onerror=document.title=1><b>bold</b>.jpg"  # no quotes: browsers encode them
            page.set_input_files("#file", {"name": hostile, "mimeType": "image/jpeg", "buffer": first.read_bytes()})
            expect(tiles).to_have_count(1, timeout=180_000)
            expect(tiles.first.locator(".tile-name")).to_have_text(hostile)
            assert page.locator("#grid b").count() == 0 and page.title() != "1"

            phone = browser.new_page(viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True,
                                     has_touch=True)
            phone.goto(gallery_url)
            authenticate(phone, expect, "alice", "#login")
            expect(phone.locator("#grid .tile")).to_have_count(1)
            assert phone.evaluate("document.documentElement.scrollWidth") <= 390  # nothing wider than the screen
            phone.screenshot(path=str(ARTIFACTS / "gallery_phone.png"), full_page=True)
            phone.locator("#grid .tile .open").first.click()
            expect(phone.locator("#caption .word").first).to_be_visible()
            phone.locator("#caption .word").first.click()
            expect(phone.locator("#boxes .box").first).to_be_visible()
            phone.screenshot(path=str(ARTIFACTS / "gallery_phone_detail.png"))
        finally:
            browser.close()
    for name in ("grid", "detail", "second_user", "phone", "phone_detail"):
        assert (ARTIFACTS / f"gallery_{name}.png").stat().st_size > 20_000
