"""The captioning service: the API through FastAPI's TestClient (every refusal), the micro-batcher, and a small
loopback load test against a real uvicorn server."""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from butd.captioner import Captioner
from butd.serve import MicroBatcher, create_app
from butd.models import load_model
from captioner_fixtures import ROOT, coco_image_paths, fast_detector, synthetic_image, write_tiny_checkpoint
from serve_fixtures import loopback_server, png_bytes


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt")


@pytest.fixture(scope="module")
def captioner(checkpoint):
    return Captioner(detector=fast_detector(), loaded=load_model(checkpoint), detector_name="random")


@pytest.fixture(scope="module")
def client(captioner):
    app = create_app(captioner, max_upload_bytes=2_000_000, max_pixels=4_000_000, max_batch=4, max_wait_ms=5,
                     max_images=3)
    with TestClient(app) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def image():
    return png_bytes(synthetic_image(160, 120, 1))


def assert_error(response, status: int, code: str, *mentions: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code
    for text in mentions:
        assert text in error["message"]


def test_health_reports_model_device_and_random_detector(client):
    health = client.get("/healthz").json()
    assert health["model_loaded"] is True
    assert health["device"] == "cpu"
    assert health["detector"] == "random" and health["random_detector"] is True
    assert health["batching"]["max_batch"] == 4
    assert health["memory"]["max_pending_pixels"] == 100_000_000 and health["memory"]["max_decodes"] == 2


def test_caption_one_image(client, image, captioner):
    response = client.post("/v1/captions", files={"images": ("pic.png", image, "image/png")})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["beam_size"] == 3
    (result,) = body["captions"]
    assert result["name"] == "pic.png"
    assert (result["width"], result["height"]) == (160, 120)
    assert len(result["alternatives"]) == 3
    assert all(len(w["attention"]) == len(result["regions"]) for w in result["words"])
    # The service answers what the library answers.
    (expected,) = captioner.caption([image], beam_size=3)
    assert result["caption"] == expected.caption


def test_several_images_keep_their_order_and_beam_size_form_field(client):
    images = [("a.png", png_bytes(synthetic_image(100, 80, 2))), ("b.png", png_bytes(synthetic_image(90, 120, 3)))]
    response = client.post("/v1/captions", files=[("images", (n, d, "image/png")) for n, d in images],
                           data={"beam_size": "2"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["beam_size"] == 2
    assert [c["name"] for c in body["captions"]] == ["a.png", "b.png"]
    assert all(len(c["alternatives"]) == 2 for c in body["captions"])


def test_beam_size_query_and_its_bounds(client, image):
    ok = client.post("/v1/captions?beam_size=1", files={"images": ("p.png", image, "image/png")})
    assert ok.status_code == 200 and len(ok.json()["captions"][0]["alternatives"]) == 1
    assert_error(client.post("/v1/captions?beam_size=11", files={"images": ("p.png", image, "image/png")}),
                 422, "invalid_request", "beam_size")
    assert_error(client.post("/v1/captions", files={"images": ("p.png", image, "image/png")}, data={"beam_size": "x"}),
                 422, "invalid_beam_size")
    assert_error(client.post("/v1/captions", files={"images": ("p.png", image, "image/png")}, data={"beam_size": "0"}),
                 422, "invalid_beam_size", "between 1 and 10")


def test_upload_too_large_declared_and_streamed(client):
    big = b"\xff\xd8" + os.urandom(2_100_000)
    assert_error(client.post("/v1/captions", files={"images": ("big.jpg", big, "image/jpeg")}),
                 413, "upload_too_large", "2000000")
    # Without a Content-Length the body is counted while it is read.
    boundary = "XbOuNdArY"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"images\"; filename=\"big.jpg\"\r\n"
            "Content-Type: image/jpeg\r\n\r\n").encode()

    def chunks():
        yield head
        for _ in range(30):
            yield os.urandom(100_000)
        yield f"\r\n--{boundary}--\r\n".encode()

    response = client.post("/v1/captions", content=chunks(),
                           headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    assert_error(response, 413, "upload_too_large")


def test_too_many_pixels_is_refused_before_decoding(client):
    # A decompression bomb in miniature: a few KB of PNG that would decode to 50 million pixels.
    bomb = png_bytes(Image.new("1", (10_000, 5_000)))
    assert len(bomb) < 200_000
    assert_error(client.post("/v1/captions", files={"images": ("bomb.png", bomb, "image/png")}),
                 413, "too_many_pixels", "bomb.png", "10000x5000")


def test_undecodable_images_name_the_file(client):
    assert_error(client.post("/v1/captions", files={"images": ("notes.jpg", b"hello, world", "image/jpeg")}),
                 422, "undecodable_image", "notes.jpg")
    truncated = png_bytes(synthetic_image(300, 200, 5))[:400]
    assert_error(client.post("/v1/captions", files={"images": ("cut.png", truncated, "image/png")}),
                 422, "undecodable_image", "cut.png")
    assert_error(client.post("/v1/captions", files={"images": ("empty.png", b"", "image/png")}),
                 422, "empty_file", "empty.png")
    # Decodable, but too thin for the detector's test-time resize.
    strip = png_bytes(synthetic_image(2000, 8, 6))
    assert_error(client.post("/v1/captions", files={"images": ("strip.png", strip, "image/png")}),
                 422, "unusable_image", "strip.png", "aspect ratio")


def test_wrong_content_types(client, image):
    assert_error(client.post("/v1/captions", files={"images": ("a.txt", b"text", "text/plain")}),
                 415, "unsupported_media_type", "a.txt", "text/plain")
    assert_error(client.post("/v1/captions", json={"images": ["x"]}), 415, "unsupported_media_type", "multipart")


def test_missing_or_misplaced_files_and_too_many(client, image):
    assert_error(client.post("/v1/captions", data={"beam_size": "2"}, files={"other": ("x.png", image, "image/png")}),
                 422, "no_file", "other")
    assert_error(client.post("/v1/captions", data={"images": "just text"}, files={"z": ("x.png", image, "image/png")}),
                 422, "not_a_file")
    four = [("images", (f"{i}.png", image, "image/png")) for i in range(4)]
    assert_error(client.post("/v1/captions", files=four), 422, "too_many_images", "limit is 3")


def test_unknown_paths_and_methods_answer_json(client):
    assert_error(client.get("/v2/nothing"), 404, "not_found")
    assert_error(client.get("/v1/captions"), 405, "method_not_allowed")


def test_page_static_files_and_openapi(client):
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "/static/app.js" in page.text
    assert client.get("/static/app.js").status_code == 200
    assert client.get("/static/style.css").status_code == 200
    schema = client.get("/openapi.json").json()
    post = schema["paths"]["/v1/captions"]["post"]
    assert "multipart/form-data" in post["requestBody"]["content"]
    assert post["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("CaptionsResponse")
    assert {"408", "413", "415", "422", "503"} <= set(post["responses"])
    assert "/healthz" in schema["paths"]


class FailingCaptioner:
    """Raises inside the inference thread, as a broken model would."""

    def info(self):
        return {"device": "cpu", "detector": "weights", "boxes": "36", "checkpoint": None, "model": "x",
                "vocab_size": 5}

    def check_image(self, width, height, name):
        pass

    def caption(self, images, *, beam_size, names):
        raise RuntimeError("out of memory (simulated)")


def test_inference_failure_is_a_json_500_and_the_worker_survives(image):
    with TestClient(create_app(FailingCaptioner()), raise_server_exceptions=False) as client:
        for _ in range(2):  # the worker is still there for the second request
            assert_error(client.post("/v1/captions", files={"images": ("p.png", image, "image/png")}),
                         500, "internal_error", "simulated")


def test_micro_batcher_groups_concurrent_requests():
    calls: list[tuple[list[int], int, str]] = []

    def run_batch(images, names, beam_size):
        time.sleep(0.05)  # a slow model: requests pile up meanwhile
        calls.append((list(images), beam_size, threading.current_thread().name))
        if -1 in images:
            raise ValueError("bad image -1")
        return [x * 10 for x in images]

    async def scenario():
        batcher = MicroBatcher(run_batch, max_batch=4, max_wait_ms=20)
        await batcher.start()
        try:
            results = await asyncio.gather(*(batcher.submit([i], [str(i)], 3) for i in range(9)),
                                           batcher.submit([100, 101], ["a", "b"], 5))
            with pytest.raises(ValueError, match="bad image -1"):
                await batcher.submit([-1], ["x"], 3)
            return results, batcher.stats
        finally:
            await batcher.stop()

    results, stats = asyncio.run(scenario())
    assert results[:9] == [[i * 10] for i in range(9)]
    assert results[9] == [1000, 1010]
    assert all(len(images) <= 4 for images, _, _ in calls)
    assert stats.largest_batch == 4  # concurrent requests were batched
    assert all(beam == 5 for images, beam, _ in calls if 100 in images)
    assert all(beam == 3 for images, beam, _ in calls if 0 in images)
    assert {thread for _, _, thread in calls} == {calls[0][2]}  # one inference thread
    assert calls[0][2].startswith("butd-inference")


def test_load_test_against_a_loopback_server(captioner):
    images = coco_image_paths()[:3]
    if not images:
        pytest.skip(f"no COCO images under {ROOT.parent / 'shared' / 'data' / 'coco_images'}")
    app = create_app(captioner, max_batch=8, max_wait_ms=10)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    with loopback_server(app) as url:
        command = [sys.executable, str(ROOT / "benchmarks" / "serve_load.py"), "--url", url, "--requests", "24",
                   "--concurrency", "8", "--beam-size", "2"]
        for path in images:
            command += ["--image", str(path)]
        proc = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["requests"] == 24 and report["correct"] == 24 and report["all_correct"] is True
    assert report["largest_batch"] > 1  # eight clients at once were batched
    assert report["requests_per_s"] > 0 and report["p99_ms"] >= report["p50_ms"]
