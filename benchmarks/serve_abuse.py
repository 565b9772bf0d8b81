"""Abuse test of the captioning service on loopback, with bounded counts: does its memory stay bounded and does it stay
responsive while clients send maximum-size images all at once, send slowly, or hang up?

    python benchmarks/serve_abuse.py --detector random --small-detector --checkpoint CKPT [--device cpu] \
        [--requests 50] [--full-requests 10] [--slow 10] [--abandoned 8] [--retries 0] [--max-rss-mb MB] \
        [server limits: --max-megapixels --max-pending-megapixels --max-decodes --header-timeout --body-timeout ...]

Starts ``tools/serve.py`` on a free loopback port, warms it up with one small image, then at once: ``--requests``
concurrent uploads of maximum-size PNGs (``--max-megapixels`` each; the first ``--full-requests`` of them carry
``--max-images`` such images, like the request of 16 36-megapixel PNGs that once took 2 GB), ``--slow`` clients that send their headers
(half of them) or their body (the other half) a byte at a time, and ``--abandoned`` clients that upload a 640 x 480
image (small enough to be admitted and queued) and hang up before the answer; meanwhile ``/healthz`` is polled.
Prints one JSON line: the server's peak resident memory (VmHWM) and its memory before the attack, the status codes of
every kind of client, how long the slow clients held their connections, how many images of abandoned requests still
reached the model, and /healthz latency. With ``--max-rss-mb`` (the bound stated in docs/service.md) it exits 1 when
the server's peak resident memory went over it.
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import math
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from serve_load import free_port, stop_server, wait_ready  # same folder: the server start-up and readiness poll

SERVER_LIMITS = ("max_megapixels", "max_pending_megapixels", "max_decodes", "max_images", "header_timeout",
                 "body_timeout", "max_connections", "max_upload_mb")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--detector", required=True, help="detector weights or 'random'")
    parser.add_argument("--checkpoint", required=True, type=Path, help="captioner checkpoint")
    parser.add_argument("--small-detector", action="store_true", help="start the server with the reduced detector")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--requests", type=int, default=50, help="concurrent uploads of maximum-size images")
    parser.add_argument("--full-requests", type=int, default=10,
                        help="how many of them carry --max-images images instead of one")
    parser.add_argument("--slow", type=int, default=10, help="slow clients (half slow headers, half slow body)")
    parser.add_argument("--drip-s", type=float, default=0.5, help="seconds between the slow clients' bytes")
    parser.add_argument("--abandoned", type=int, default=8, help="clients that upload, then hang up")
    parser.add_argument("--abandon-after-s", type=float, default=1.0, help="seconds before they hang up")
    parser.add_argument("--retries", type=int, default=0, help="times an upload answered 503 is retried after "
                        "its Retry-After")
    parser.add_argument("--health-every-s", type=float, default=0.25, help="interval of the /healthz poll")
    parser.add_argument("--startup-timeout", type=float, default=180.0)
    parser.add_argument("--max-rss-mb", type=float, help="fail (exit 1) if the server's peak memory exceeds this")
    # The server's limits (tools/serve.py's defaults when not given).
    for name, kind in [("max-megapixels", float), ("max-pending-megapixels", float), ("max-decodes", int),
                       ("max-images", int), ("header-timeout", float), ("body-timeout", float),
                       ("max-connections", int), ("max-upload-mb", float)]:
        parser.add_argument(f"--{name}", type=kind, help="passed to tools/serve.py")
    args = parser.parse_args(argv)
    if min(args.requests, args.slow, args.abandoned, args.retries, args.full_requests) < 0:
        parser.error("the counts must be >= 0")
    return args


def start_server(args: argparse.Namespace, port: int, log) -> subprocess.Popen:
    command = [sys.executable, str(ROOT / "tools" / "serve.py"), "--detector", args.detector, "--checkpoint",
               str(args.checkpoint), "--host", "127.0.0.1", "--port", str(port), "--device", args.device,
               "--log-level", "warning"]
    if args.small_detector:
        command.append("--small-detector")
    for name in SERVER_LIMITS:
        value = getattr(args, name)
        if value is not None:
            command += [f"--{name.replace('_', '-')}", str(value)]
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)


def memory_mb(pid: int) -> dict[str, float]:
    """VmRSS (now) and VmHWM (peak since start) of a process, in MB, from /proc (Linux)."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) / 1024.0
    return values


def largest_png(max_pixels: int) -> tuple[bytes, int, int]:
    """A 4:3 PNG with as many pixels as the server accepts: flat colours, so it is small on the wire (like the
    36-megapixel PNGs of 105 KB of the original report) but as large as any photo once decoded."""
    width = int(math.sqrt(max_pixels * 4 / 3))
    height = max_pixels // width
    image = Image.new("RGB", (width, height), (90, 140, 60))
    draw = ImageDraw.Draw(image)
    rng = np.random.default_rng(0)
    for _ in range(12):
        x, y = int(rng.integers(0, width // 2)), int(rng.integers(0, height // 2))
        draw.rectangle([x, y, x + width // 4, y + height // 4], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=9)
    return buffer.getvalue(), width, height


def multipart(files: list[tuple[str, bytes]]) -> tuple[bytes, bytes]:
    """Head and body of a raw POST /v1/captions uploading ``files`` in the field ``images``."""
    boundary = "butdabuse0123456789"
    body = b"".join(f"--{boundary}\r\nContent-Disposition: form-data; name=\"images\"; filename=\"{name}\"\r\n"
                    f"Content-Type: image/png\r\n\r\n".encode() + data + b"\r\n" for name, data in files)
    body += f"--{boundary}--\r\n".encode()
    head = (f"POST /v1/captions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; "
            f"boundary={boundary}\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    return head, body


async def upload(client: httpx.AsyncClient, files: list[tuple[str, bytes]], retries: int) -> str:
    """POST the files; retry after Retry-After on 503 up to ``retries`` times; the final status (or the error)."""
    for attempt in range(retries + 1):
        try:
            response = await client.post("/v1/captions", files=[("images", (n, d, "image/png")) for n, d in files])
        except httpx.HTTPError as err:
            return type(err).__name__
        if response.status_code != 503 or attempt == retries:
            return str(response.status_code)
        await asyncio.sleep(float(response.headers.get("retry-after", "1")))
    return "unreachable"


async def slow_client(port: int, head: bytes, body: bytes, drip_s: float, cap_s: float) -> tuple[str, float]:
    """Send ``head`` then ``body``, dripping the part given as ``body`` (all of it when ``head`` is empty) a byte every
    ``drip_s``; return the status the server answered ("closed" if none) and how long the connection stayed open."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    answer = asyncio.ensure_future(reader.read())  # everything until the server closes
    try:
        writer.write(head)
        for byte in body:
            if answer.done() or loop.time() - start > cap_s:
                break
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.wait({answer}, timeout=drip_s)
        data = await asyncio.wait_for(answer, max(0.1, cap_s - (loop.time() - start)))
    except (ConnectionError, TimeoutError):
        data = answer.result() if answer.done() and not answer.exception() else b""
    finally:
        answer.cancel()
        writer.close()
    status = data.split(b" ", 2)[1].decode() if data.startswith(b"HTTP/1.1 ") else "closed"
    return status, loop.time() - start


async def abandoning_client(port: int, request: bytes, after_s: float) -> str:
    """Upload a whole request, wait ``after_s``, hang up; "hung up" unless the server answered first."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    try:
        data = await asyncio.wait_for(reader.read(12), after_s)
    except TimeoutError:
        data = b""
    writer.close()
    return data.split(b" ", 2)[1].decode() if data.startswith(b"HTTP/1.1 ") else "hung up"


async def attack(url: str, port: int, pid: int, args: argparse.Namespace, health: dict) -> dict:
    png, width, height = largest_png(health["max_pixels"])
    small = largest_png(640 * 480)[0]
    max_images = health["max_images"]
    timeouts = {"header": args.header_timeout or 10.0, "body": args.body_timeout or 60.0}
    cap_s = 3 * max(timeouts.values()) + 30  # a slow client gives up after this (a server without deadlines)
    limits = httpx.Limits(max_connections=args.requests + 1, max_keepalive_connections=args.requests + 1)
    peak_seen = [0.0]
    done = asyncio.Event()

    async def watch_memory() -> None:
        while not done.is_set():
            peak_seen[0] = max(peak_seen[0], memory_mb(pid)["VmRSS"])
            await asyncio.sleep(0.05)

    health_ms: list[float] = []
    health_errors: list[str] = []

    async def poll_health(client: httpx.AsyncClient) -> None:
        while not done.is_set():
            start = time.perf_counter()
            try:
                (await client.get("/healthz")).raise_for_status()
                health_ms.append((time.perf_counter() - start) * 1000.0)
            except httpx.HTTPError as err:
                health_errors.append(type(err).__name__)
            await asyncio.sleep(args.health_every_s)

    single, full = [("max.png", png)], [(f"max{i}.png", png) for i in range(max_images)]
    header_drip = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: " + b"a" * 10_000
    slow_head, slow_body = multipart([("slow.png", small)])
    abandon_head, abandon_body = multipart([("gone.png", small)])
    async with httpx.AsyncClient(base_url=url, timeout=600.0, limits=limits) as client, \
            httpx.AsyncClient(base_url=url, timeout=60.0) as health_client:
        start = time.perf_counter()
        watchers = [asyncio.ensure_future(watch_memory()), asyncio.ensure_future(poll_health(health_client))]
        uploads = [upload(client, full if i < args.full_requests else single, args.retries)
                   for i in range(args.requests)]
        slow = [slow_client(port, b"", header_drip, args.drip_s, cap_s) if i % 2 == 0
                else slow_client(port, slow_head, slow_body, args.drip_s, cap_s) for i in range(args.slow)]
        gone = [abandoning_client(port, abandon_head + abandon_body, args.abandon_after_s)
                for _ in range(args.abandoned)]
        results = await asyncio.gather(asyncio.gather(*uploads), asyncio.gather(*slow), asyncio.gather(*gone))
        elapsed = time.perf_counter() - start
        # Let the server finish what it admitted (abandoned work included) before the final reading.
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            after = (await health_client.get("/healthz")).json()
            if after["memory"]["pending_pixels"] == 0 and after["batching"]["queued"] == 0:
                break
            await asyncio.sleep(0.25)
        done.set()
        await asyncio.gather(*watchers)
    upload_codes, slow_results, gone_codes = results
    answered = sum(max_images if i < args.full_requests else 1 for i, code in enumerate(upload_codes) if code == "200")
    answered += sum(code == "200" for code in gone_codes)  # abandoned too late: answered before they hung up
    memory = memory_mb(pid)
    ms = np.array(health_ms or [float("nan")])
    return {
        "image": f"{width}x{height} PNG, {len(png)} bytes",
        "uploads": {"requests": args.requests, "full_requests": args.full_requests, "images_each_full": max_images,
                    "retries": args.retries, "status": dict(Counter(upload_codes))},
        "slow_headers": slow_summary(slow_results[0::2]),  # even clients drip headers, odd ones a body
        "slow_bodies": slow_summary(slow_results[1::2]),
        "abandoned_clients": {"count": args.abandoned, "status": dict(Counter(gone_codes)),
                              "dropped_requests": after["batching"]["abandoned_requests"],
                              "skipped_images": after["batching"]["skipped"],
                              # images captioned for nobody: all captioned, less the warm-up and those answered
                              "images_captioned_anyway": after["batching"]["images"] - 1 - answered},
        "healthz_ms": {"polls": len(health_ms), "errors": len(health_errors),
                       "p50": round(float(np.percentile(ms, 50)), 1), "max": round(float(ms.max()), 1)},
        "peak_rss_mb": round(max(memory["VmHWM"], peak_seen[0]), 1),
        "rss_after_mb": round(memory["VmRSS"], 1),
        "seconds": round(elapsed, 1),
        "server_memory_budget": after["memory"],
    }


def slow_summary(results: list[tuple[str, float]]) -> dict:
    """How many slow clients, what the server answered them, and the longest time one kept its connection."""
    return {"count": len(results), "status": dict(Counter(status for status, _ in results)),
            "max_open_s": round(max((seconds for _, seconds in results), default=0.0), 1)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile(mode="w+") as log:
        return run(args, port, url, log)


def run(args: argparse.Namespace, port: int, url: str, log) -> int:
    """Start the server (its output to ``log``), attack it, stop it, print the report."""
    process = start_server(args, port, log)
    try:
        health = wait_ready(url, process, log, args.startup_timeout)
        warm = httpx.post(f"{url}/v1/captions", timeout=600,
                          files={"images": ("warm.png", largest_png(640 * 480)[0], "image/png")})
        if warm.status_code != 200:
            raise SystemExit(f"the warm-up request failed: HTTP {warm.status_code}: {warm.text[:300]}")
        before = memory_mb(process.pid)
        report = asyncio.run(attack(url, port, process.pid, args, health))
        report = {"baseline_rss_mb": round(before["VmRSS"], 1), **report,
                  "server": {"device": health["device"], "detector": health["detector"],
                             "max_pixels": health["max_pixels"], "max_images": health["max_images"],
                             "max_upload_bytes": health["max_upload_bytes"],
                             **{name: getattr(args, name) for name in SERVER_LIMITS if getattr(args, name) is not None}}}
        if process.poll() is not None:
            log.seek(0)
            raise SystemExit(f"the server died during the attack (exit code {process.returncode}):\n{log.read()}")
    finally:
        stop_server(process)
    if args.max_rss_mb is not None:
        report["max_rss_mb"] = args.max_rss_mb
        report["within_bound"] = report["peak_rss_mb"] <= args.max_rss_mb
    print(json.dumps(report), flush=True)
    return 0 if report.get("within_bound", True) else 1


if __name__ == "__main__":
    sys.exit(main())
