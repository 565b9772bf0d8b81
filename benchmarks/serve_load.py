"""Loopback load test of the captioning service: a bounded number of requests at a fixed concurrency.

    # start tools/serve.py on a free loopback port, load it, stop it:
    python benchmarks/serve_load.py --detector WEIGHTS|random --checkpoint CKPT [--device cpu] \
        [--requests 200] [--concurrency 8] [--max-batch 8] [--max-wait-ms 10] [--image IMG ...]
    # or load a server that is already running:
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 [--requests 200] [--concurrency 8]

Each image is captioned once first (not timed) to learn its expected answer; a timed response is correct when it is
HTTP 200 with the same caption and one attention value per region for every word. Prints one JSON line: requests/s,
p50/p90/p99 latency in ms, whether every response was correct, and how well the server batched.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_IMAGES = ROOT.parent / "shared" / "data" / "coco_images"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="load this running server instead of starting one")
    parser.add_argument("--detector", help="detector weights or 'random' (to start a server)")
    parser.add_argument("--checkpoint", type=Path, help="captioner checkpoint (to start a server)")
    parser.add_argument("--small-detector", action="store_true", help="start the server with the reduced detector")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--max-wait-ms", type=float, default=10.0)
    parser.add_argument("--requests", type=int, default=200, help="timed requests (one image each)")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight at once")
    parser.add_argument("--beam-size", type=int, default=3)
    parser.add_argument("--image", type=Path, action="append", help="image to send (repeatable); default: the COCO "
                        f"images in {DEFAULT_IMAGES}")
    parser.add_argument("--startup-timeout", type=float, default=180.0, help="seconds to wait for the server")
    args = parser.parse_args(argv)
    if args.url is None and (args.detector is None or args.checkpoint is None):
        parser.error("give --url, or --detector and --checkpoint to start a server")
    if args.requests < 1 or args.concurrency < 1:
        parser.error("--requests and --concurrency must be >= 1")
    return args


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(args: argparse.Namespace, port: int, log: IO[str]) -> subprocess.Popen:
    command = [
        sys.executable, str(ROOT / "tools" / "serve.py"), "--detector", args.detector,
        "--checkpoint", str(args.checkpoint), "--host", "127.0.0.1", "--port", str(port), "--device", args.device,
        "--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms), "--log-level", "warning",
    ]
    if args.small_detector:
        command.append("--small-detector")
    # The server's messages go to a file, not a pipe nobody reads (a full pipe would block the server).
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)


def wait_ready(url: str, process: subprocess.Popen | None, log: IO[str], timeout: float) -> dict:
    """Poll /healthz until the server answers; fail with the server's own error output if it exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            log.seek(0)
            raise SystemExit(f"the server exited with code {process.returncode}:\n{log.read()}")
        try:
            response = httpx.get(f"{url}/healthz", timeout=2.0)
            if response.status_code == 200:
                return response.json()
        except httpx.TransportError:
            pass  # not listening yet
        time.sleep(0.25)
    raise SystemExit(f"the server at {url} did not answer /healthz within {timeout:.0f} s")


def stop_server(process: subprocess.Popen) -> None:
    """Terminate the server started for the run; kill it if it has not stopped within 30 s."""
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def check(response: httpx.Response, expected: str | None) -> str | None:
    """None when the response is a correct caption (equal to ``expected`` if given), else what is wrong."""
    if response.status_code != 200:
        return f"HTTP {response.status_code}: {response.text[:200]}"
    (result,) = response.json()["captions"]
    if not result["caption"] or (expected is not None and result["caption"] != expected):
        return f"caption {result['caption']!r} differs from {expected!r}"
    if any(len(word["attention"]) != len(result["regions"]) for word in result["words"]):
        return "an attention row does not have one weight per region"
    return None


async def run_load(url: str, images: list[Path], args: argparse.Namespace) -> dict:
    payloads = [(path.name, path.read_bytes()) for path in images]
    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=300.0, limits=limits) as client:

        async def post(index: int) -> httpx.Response:
            name, data = payloads[index % len(payloads)]
            return await client.post("/v1/captions", files={"images": (name, data, "image/jpeg")},
                                     params={"beam_size": args.beam_size})

        expected = []
        for i in range(len(payloads)):  # warm-up, and the answer every later response must match
            response = await post(i)
            problem = check(response, None)
            if problem:
                raise SystemExit(f"{payloads[i][0]}: {problem}")
            expected.append(response.json()["captions"][0]["caption"])
        before = (await client.get("/healthz")).json()["batching"]
        semaphore = asyncio.Semaphore(args.concurrency)
        latencies: list[float] = []
        problems: list[str] = []

        async def one(index: int) -> None:
            async with semaphore:
                start = time.perf_counter()
                try:
                    response = await post(index)
                    problem = check(response, expected[index % len(payloads)])
                except httpx.HTTPError as err:
                    problem = f"{type(err).__name__}: {err}"
                latencies.append(time.perf_counter() - start)
                if problem:
                    problems.append(problem)

        start = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(args.requests)))
        elapsed = time.perf_counter() - start
        health = (await client.get("/healthz")).json()
    after = health["batching"]
    batches = after["batches"] - before["batches"]
    ms = np.array(latencies) * 1000.0
    return {
        "requests": args.requests,
        "concurrency": args.concurrency,
        "correct": args.requests - len(problems),
        "all_correct": not problems,
        "first_problems": problems[:3],
        "seconds": round(elapsed, 3),
        "requests_per_s": round(args.requests / elapsed, 2),
        "p50_ms": round(float(np.percentile(ms, 50)), 1),
        "p90_ms": round(float(np.percentile(ms, 90)), 1),
        "p99_ms": round(float(np.percentile(ms, 99)), 1),
        "mean_batch": round((after["images"] - before["images"]) / batches, 2) if batches else None,
        "largest_batch": after["largest_batch"],
        "max_batch": after["max_batch"],
        "max_wait_ms": after["max_wait_ms"],
        "beam_size": args.beam_size,
        "device": health["device"],
        "detector": health["detector"],
        "images": [path.name for path in images],
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    images = args.image or sorted(DEFAULT_IMAGES.glob("*.jpg"))
    if not images:
        raise SystemExit(f"no images: pass --image, or provide {DEFAULT_IMAGES}")
    process = None
    url = args.url
    log = tempfile.TemporaryFile(mode="w+")
    if url is None:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        process = start_server(args, port, log)
    try:
        wait_ready(url, process, log, args.startup_timeout)
        report = asyncio.run(run_load(url.rstrip("/"), images, args))
    finally:
        if process is not None:
            stop_server(process)
        log.close()
    print(json.dumps(report), flush=True)
    return 0 if report["all_correct"] else 1


if __name__ == "__main__":
    sys.exit(main())
