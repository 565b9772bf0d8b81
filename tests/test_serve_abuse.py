"""The service under abuse, on loopback: a memory budget in decoded pixels, a bound on concurrent decodes, clients that
hang up while queued, and slow clients (headers or body sent a byte at a time, or not at all).

Every wait is bounded and generous; nothing depends on how fast this machine is.
"""
from __future__ import annotations

import asyncio
import json
import os
import select
import subprocess
import sys
import threading
import time

import httpx
import pytest

import butd.serve.app as serve_app
from butd.captioner import Captioner
from butd.serve import MicroBatcher, create_app
from butd.serve.admission import PixelBudget
from butd.serve.connections import ConnectionLimits
from butd.models import load_model
from captioner_fixtures import ROOT, fast_detector, synthetic_image, write_tiny_checkpoint
from serve_fixtures import (
    GatedCaptioner,
    connect,
    loopback_server,
    multipart_request,
    png_bytes,
    read_until_closed,
    wait_until,
)

TIMEOUT_S = 0.5  # the deadlines of the slow-client tests; each test allows 20 times as much before failing
CLOSE_BOUND_S = 10.0


@pytest.fixture(scope="module")
def captioner(tmp_path_factory):
    checkpoint = write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt")
    return Captioner(detector=fast_detector(), loaded=load_model(checkpoint), detector_name="random")


@pytest.fixture
def decodes(monkeypatch):
    """Records the size of every image the service decodes (the app's ``load_image``, wrapped)."""
    real = serve_app.load_image
    decoded: list[tuple[int, int]] = []

    def counting_load_image(data, **kwargs):
        array = real(data, **kwargs)
        decoded.append((array.shape[1], array.shape[0]))
        return array

    monkeypatch.setattr(serve_app, "load_image", counting_load_image)
    return decoded


def files(*sizes: tuple[int, int], prefix: str = "img") -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("images", (f"{prefix}{i}.png", png_bytes(synthetic_image(w, h, i)), "image/png"))
            for i, (w, h) in enumerate(sizes)]


def in_thread(function, *args, **kwargs) -> tuple[threading.Thread, dict]:
    """Run ``function`` in a thread; its return value or exception lands in the dict."""
    outcome: dict = {}

    def run():
        try:
            outcome["value"] = function(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - reported by the test that reads the outcome
            outcome["error"] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def test_pixel_budget_grants_and_gives_back_once():
    budget = PixelBudget(max_pixels=100, max_decodes=1)
    first = budget.try_admit(60)
    assert first is not None and budget.stats.pending_pixels == 60
    assert budget.try_admit(41) is None and budget.stats.refused == 1
    with budget.try_admit(40) as second:
        assert budget.stats.pending_pixels == 100
    first.release()
    first.release()  # a second release gives nothing back twice
    assert budget.stats.pending_pixels == 0 and budget.stats.peak_pixels == 100
    assert second.pixels == 40
    with pytest.raises(ValueError):
        PixelBudget(max_pixels=0, max_decodes=1)


def test_work_is_admitted_by_decoded_pixels_and_refused_with_retry_after_when_full(captioner, decodes):
    gated = GatedCaptioner(captioner)
    app = create_app(gated, max_pixels=60_000, max_pending_pixels=100_000, max_batch=2, max_wait_ms=0)
    with loopback_server(app) as url:
        first, outcome = in_thread(httpx.post, f"{url}/v1/captions", files=files((200, 150), (150, 200)), timeout=60)
        try:
            assert gated.entered.wait(timeout=30), "the first request never reached the model"
            health = httpx.get(f"{url}/healthz", timeout=30).json()
            assert health["memory"]["pending_pixels"] == 60_000  # held while its images are in the model

            # 60,000 + 50,000 pixels do not fit in 100,000: refused at once, from the header, nothing decoded.
            busy = httpx.post(f"{url}/v1/captions", files=files((250, 200), prefix="late"), timeout=30)
            assert busy.status_code == 503, busy.text
            assert busy.json()["error"]["code"] == "busy"
            assert busy.headers["retry-after"] == str(serve_app.RETRY_AFTER_S)
            # More pixels than the whole budget could never fit: 413, not "retry".
            never = httpx.post(f"{url}/v1/captions", files=files((200, 200), (200, 200), (200, 200)), timeout=30)
            assert never.status_code == 413, never.text
            assert never.json()["error"]["code"] == "too_many_pixels" and "100000" in never.json()["error"]["message"]
            assert sorted(decodes) == [(150, 200), (200, 150)]  # only the admitted request was decoded
        finally:
            gated.gate.set()
            first.join(timeout=60)
        assert outcome["value"].status_code == 200, outcome
        wait_until(lambda: httpx.get(f"{url}/healthz", timeout=30).json()["memory"]["pending_pixels"] == 0,
                   "the first request's pixels are given back")
        again = httpx.post(f"{url}/v1/captions", files=files((250, 200), prefix="late"), timeout=60)
        assert again.status_code == 200, again.text
        memory = httpx.get(f"{url}/healthz", timeout=30).json()["memory"]
    assert memory["pending_pixels"] == 0 and memory["refused_requests"] == 1 and memory["peak_pending_pixels"] == 60_000
    assert len(decodes) == 3


@pytest.mark.parametrize("max_decodes", [1, 2])
def test_concurrent_decodes_are_bounded(captioner, monkeypatch, max_decodes):
    real = serve_app.load_image
    lock = threading.Lock()
    active, peak = [0], [0]
    two_at_once = threading.Event()
    # With one slot, the first decode waits a while to give a second one the chance to start (it must not);
    # with two, it waits until the second has started (it must).
    linger_s = 1.0 if max_decodes == 1 else 30.0

    def slow_load_image(data, **kwargs):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
            if active[0] >= 2:
                two_at_once.set()
        try:
            two_at_once.wait(timeout=linger_s)
            return real(data, **kwargs)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(serve_app, "load_image", slow_load_image)
    app = create_app(captioner, max_decodes=max_decodes)
    with loopback_server(app) as url:
        started = [in_thread(httpx.post, f"{url}/v1/captions", files=files((120, 90), prefix=f"r{i}_"), timeout=60)
                   for i in range(2)]
        for thread, _ in started:
            thread.join(timeout=90)
    assert [outcome["value"].status_code for _, outcome in started] == [200, 200]
    assert peak[0] == max_decodes


def test_a_request_abandoned_while_queued_never_reaches_the_model(captioner):
    gated = GatedCaptioner(captioner)
    app = create_app(gated, max_batch=1, max_wait_ms=0)
    batcher = app.state.batcher
    with loopback_server(app) as url:
        first, outcome = in_thread(httpx.post, f"{url}/v1/captions",
                                   files=[("images", ("first.png", png_bytes(synthetic_image(120, 90, 1)), "image/png"))],
                                   timeout=60)
        try:
            assert gated.entered.wait(timeout=30), "the first request never reached the model"
            head, body = multipart_request([("abandoned.png", png_bytes(synthetic_image(100, 80, 2)))])
            with connect(url) as sock:
                sock.sendall(head + body)
                wait_until(lambda: batcher.queued == 1, "the second request is queued behind the first")
            # The client has hung up while its request waits in the queue.
            wait_until(lambda: httpx.get(f"{url}/healthz", timeout=30).json()["batching"]["abandoned_requests"] == 1,
                       "the server notices that the client hung up", timeout=15)
        finally:
            gated.gate.set()
            first.join(timeout=60)
        assert outcome["value"].status_code == 200, outcome
        wait_until(lambda: batcher.stats.skipped == 1, "the worker drops the abandoned image")
        health = httpx.get(f"{url}/healthz", timeout=30).json()
    assert gated.calls == [["first.png"]]  # the abandoned image never reached the captioner
    assert health["batching"]["images"] == 1 and health["memory"]["pending_pixels"] == 0


def test_a_request_abandoned_while_decoding_is_never_queued(captioner, monkeypatch):
    real = serve_app.load_image
    decoding, finish = threading.Event(), threading.Event()

    def held_load_image(data, **kwargs):
        decoding.set()
        finish.wait(timeout=30)
        return real(data, **kwargs)

    monkeypatch.setattr(serve_app, "load_image", held_load_image)
    gated = GatedCaptioner(captioner)
    gated.gate.set()  # nothing is held in the model: only the decode is
    app = create_app(gated)
    with loopback_server(app) as url:
        head, body = multipart_request([("gone.png", png_bytes(synthetic_image(100, 80, 4)))])
        with connect(url) as sock:
            sock.sendall(head + body)
            assert decoding.wait(timeout=30), "the upload was never decoded"
        finish.set()  # the client has hung up while its image was being decoded
        wait_until(lambda: httpx.get(f"{url}/healthz", timeout=30).json()["batching"]["abandoned_requests"] == 1,
                   "the server notices that the client hung up", timeout=15)
        health = httpx.get(f"{url}/healthz", timeout=30).json()
    assert gated.calls == []
    assert health["batching"]["skipped"] == 0  # it was never queued, so there was nothing to skip
    assert health["memory"]["pending_pixels"] == 0


def test_batcher_skips_a_group_cancelled_while_an_earlier_group_runs():
    gate = threading.Event()
    calls: list[list[int]] = []

    def run_batch(images, names, beam_size):
        calls.append(list(images))
        if images == [1]:
            gate.wait(timeout=30)
        return [x * 10 for x in images]

    async def scenario():
        batcher = MicroBatcher(run_batch, max_batch=2, max_wait_ms=5000)
        await batcher.start()
        try:
            first = asyncio.ensure_future(batcher.submit([1], ["a"], 3))
            second = asyncio.ensure_future(batcher.submit([2], ["b"], 2))  # same batch, its own group (beam 2)
            for _ in range(3000):
                if calls:
                    break
                await asyncio.sleep(0.01)
            second.cancel()  # its caller leaves while the first group is in the model
            gate.set()
            assert await first == [10]
            with pytest.raises(asyncio.CancelledError):
                await second
        finally:
            await batcher.stop()  # waits for anything the worker handed to the model
        return batcher.stats

    stats = asyncio.run(scenario())
    assert calls == [[1]]
    assert stats.skipped == 1 and stats.images == 1


@pytest.fixture(scope="module")
def strict_server(captioner):
    """A server whose clients get 0.5 s to send headers and 0.5 s to send a body."""
    app = create_app(captioner, max_upload_bytes=1_000_000, body_timeout_s=TIMEOUT_S)
    with loopback_server(app, ConnectionLimits(header_timeout_s=TIMEOUT_S)) as url:
        yield url


def drip(sock, data: bytes, every_s: float = 0.05) -> tuple[bytes, float]:
    """Send ``data`` one byte at a time until the server answers or closes; what it sent and how long it took."""
    start = time.monotonic()
    for byte in data:
        if time.monotonic() - start > CLOSE_BOUND_S:
            raise AssertionError(f"the server kept a dripping connection open for more than {CLOSE_BOUND_S:.0f} s")
        readable, _, _ = select.select([sock], [], [], every_s)
        if readable:
            break
        try:
            sock.sendall(bytes([byte]))
        except (BrokenPipeError, ConnectionResetError):
            break
    else:
        raise AssertionError("the server let the whole request drip in")
    received, _ = read_until_closed(sock, CLOSE_BOUND_S)
    return received, time.monotonic() - start


def error_code(response: bytes) -> str:
    return json.loads(response.split(b"\r\n\r\n", 1)[1])["error"]["code"]


def test_an_idle_connection_is_closed(strict_server):
    with connect(strict_server) as sock:
        received, _ = read_until_closed(sock, CLOSE_BOUND_S)
    assert received == b""  # nothing was asked, nothing is answered


def test_headers_that_stop_halfway_get_408_and_are_closed(strict_server):
    with connect(strict_server) as sock:
        sock.sendall(b"POST /v1/captions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        received, _ = read_until_closed(sock, CLOSE_BOUND_S)
    assert received.startswith(b"HTTP/1.1 408 ") and error_code(received) == "request_timeout"


def test_headers_sent_a_byte_at_a_time_are_cut_off(strict_server):
    endless = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: " + b"a" * 100_000
    with connect(strict_server) as sock:
        received, _ = drip(sock, endless)
    assert received.startswith(b"HTTP/1.1 408 ")


def test_a_body_that_stops_halfway_gets_408_and_is_closed(strict_server):
    head, body = multipart_request([("slow.png", png_bytes(synthetic_image(200, 150, 3)))])
    with connect(strict_server) as sock:
        sock.sendall(head + body[:200])
        received, _ = read_until_closed(sock, CLOSE_BOUND_S)
    assert received.startswith(b"HTTP/1.1 408 ") and error_code(received) == "request_timeout"
    assert b"connection: close" in received.lower()


def test_a_body_sent_a_byte_at_a_time_is_cut_off(strict_server):
    head, body = multipart_request([("slow.png", png_bytes(synthetic_image(200, 150, 3)))])
    with connect(strict_server) as sock:
        sock.sendall(head)
        received, _ = drip(sock, body)
    assert received.startswith(b"HTTP/1.1 408 ") and error_code(received) == "request_timeout"


@pytest.mark.parametrize("path, length, status", [("/nowhere", 50_000, 404), ("/v1/captions", 5_000_000, 413)])
def test_an_early_refusal_closes_the_connection_instead_of_waiting_for_the_body(strict_server, path, length, status):
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=x\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()
    with connect(strict_server) as sock:
        sock.sendall(head)  # and never the body
        received, _ = read_until_closed(sock, CLOSE_BOUND_S)
    assert received.startswith(f"HTTP/1.1 {status} ".encode())
    assert b"connection: close" in received.lower()


def read_response(sock) -> bytes:
    """One HTTP response with a Content-Length, read from a raw socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the server closed the connection mid-response: {data!r}"
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def test_keep_alive_still_serves_several_requests_on_one_connection(captioner):
    with loopback_server(create_app(captioner)) as url, connect(url) as sock:
        for _ in range(3):
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert read_response(sock).startswith(b"HTTP/1.1 200 ")


def test_abuse_benchmark_runs_against_tools_serve(tmp_path):
    """benchmarks/serve_abuse.py, scaled down: tools/serve.py with every limit option set, all kinds of clients."""
    checkpoint = write_tiny_checkpoint(tmp_path / "tiny.pt")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, str(ROOT / "benchmarks" / "serve_abuse.py"), "--detector", "random",
               "--small-detector", "--checkpoint", str(checkpoint), "--requests", "4", "--full-requests", "1",
               "--slow", "2", "--abandoned", "1", "--drip-s", "0.2", "--max-megapixels", "1",
               "--max-pending-megapixels", "2", "--max-decodes", "1", "--header-timeout", "1", "--body-timeout", "1",
               "--max-connections", "50", "--max-rss-mb", "100000"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["uploads"]["status"].get("413") == 1  # 16 images of 1 megapixel never fit a 2-megapixel budget
    assert set(report["uploads"]["status"]) <= {"200", "413", "503"}
    assert report["slow_headers"]["status"] == {"408": 1} and report["slow_bodies"]["status"] == {"408": 1}
    assert report["slow_headers"]["max_open_s"] < 30 and report["slow_bodies"]["max_open_s"] < 30
    assert report["healthz_ms"]["errors"] == 0 and report["healthz_ms"]["polls"] >= 1
    assert report["server_memory_budget"]["max_pending_pixels"] == 2_000_000
    assert report["server_memory_budget"]["pending_pixels"] == 0
    assert report["peak_rss_mb"] >= report["baseline_rss_mb"] > 0 and report["within_bound"] is True
