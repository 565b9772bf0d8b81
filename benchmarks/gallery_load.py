"""Loopback load test of the gallery: N users register, then all at once upload images and list their galleries.

    # start tools/gallery.py (SQLite in a temporary folder, or --database URL) on a free loopback port:
    python benchmarks/gallery_load.py --detector WEIGHTS|random --checkpoint CKPT [--small-detector] [--device cpu] \
        [--users 8] [--uploads 3] [--lists 2] [--database postgresql+psycopg://...]
    # or load a gallery that is already running:
    python benchmarks/gallery_load.py --url http://127.0.0.1:8080 [--users 8] [--uploads 3] [--lists 2]

Every user uploads ``--uploads`` images one request at a time, each followed by ``--lists`` listings of the whole
gallery (all pages of 10). Afterwards each gallery is listed once more and compared with what was uploaded: an image
missing is *lost*, one listed twice is *duplicated*, one nobody uploaded is *unexpected* (all must be 0). Prints
one JSON line: requests/s, p50/p99 latency per kind, and those counts. Bounded: ``--max-seconds`` for the run.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import subprocess
import sys
import tempfile
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from serve_load import DEFAULT_IMAGES, free_port, stop_server, wait_ready  # noqa: E402 - the same start-up helpers

PASSWORD = "load test password"
PAGE = 10


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="load this running gallery instead of starting one")
    parser.add_argument("--detector", help="detector weights or 'random' (to start a gallery)")
    parser.add_argument("--checkpoint", type=Path, help="captioner checkpoint (to start a gallery)")
    parser.add_argument("--small-detector", action="store_true", help="start the gallery with the reduced detector")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--database", help="database URL for the started gallery (default: SQLite in a temp folder)")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--max-wait-ms", type=float, default=10.0)
    parser.add_argument("--users", type=int, default=8, help="users working at once")
    parser.add_argument("--uploads", type=int, default=3, help="uploads per user (one image each)")
    parser.add_argument("--lists", type=int, default=2, help="full listings after each upload")
    parser.add_argument("--image", type=Path, action="append", help=f"image to upload (repeatable); default: the "
                        f"COCO images in {DEFAULT_IMAGES}")
    parser.add_argument("--startup-timeout", type=float, default=180.0)
    parser.add_argument("--max-seconds", type=float, default=900.0, help="give up after this long")
    args = parser.parse_args(argv)
    if args.url is None and (args.detector is None or args.checkpoint is None):
        parser.error("give --url, or --detector and --checkpoint to start a gallery")
    if min(args.users, args.uploads) < 1 or args.lists < 0 or args.users > 200 or args.uploads > 100:
        parser.error("need 1 <= --users <= 200, 1 <= --uploads <= 100, --lists >= 0")
    return args


@dataclass
class Tally:
    latencies: dict[str, list[float]] = field(default_factory=lambda: {"upload": [], "list": []})
    errors: list[str] = field(default_factory=list)
    lost: int = 0
    duplicated: int = 0
    unexpected: int = 0


async def timed(tally: Tally, kind: str, call) -> httpx.Response | None:
    start = time.perf_counter()
    try:
        response = await call
    except httpx.HTTPError as err:
        tally.errors.append(f"{kind}: {type(err).__name__}: {err}")
        return None
    tally.latencies[kind].append(time.perf_counter() - start)
    if response.status_code >= 400:
        tally.errors.append(f"{kind}: HTTP {response.status_code}: {response.text[:200]}")
        return None
    return response


async def list_all(client: httpx.AsyncClient, tally: Tally | None) -> list[str] | None:
    """Every image id of the user's gallery, following the cursor (one timed request per page)."""
    ids, cursor = [], None
    while True:
        params = {"limit": PAGE, **({"cursor": cursor} if cursor else {})}
        call = client.get("/api/images", params=params)
        response = await (timed(tally, "list", call) if tally else call)
        if response is None or response.status_code != 200:
            return None
        page = response.json()
        ids += [image["id"] for image in page["images"]]
        cursor = page["next_cursor"]
        if cursor is None:
            return ids


async def register(client: httpx.AsyncClient, name: str) -> dict[str, str]:
    response = await client.post("/api/register", json={"username": name, "password": PASSWORD})
    if response.status_code != 201:
        raise SystemExit(f"cannot register {name}: HTTP {response.status_code}: {response.text[:200]}")
    return {"X-CSRF-Token": response.json()["csrf_token"]}


async def one_user(client: httpx.AsyncClient, headers: dict[str, str], index: int,
                   payloads: list[tuple[str, bytes]], args: argparse.Namespace, tally: Tally) -> None:
    uploaded: list[str] = []
    for k in range(args.uploads):
        name, data = payloads[(index + k) % len(payloads)]
        response = await timed(tally, "upload", client.post(
            "/api/images", files={"images": (name, data, "image/jpeg")}, headers=headers))
        if response is not None:
            uploaded += [image["id"] for image in response.json()["images"]]
        for _ in range(args.lists):
            await list_all(client, tally)
    listed = await list_all(client, None)
    if listed is None:
        tally.errors.append("final listing failed")
        return
    tally.lost += len(set(uploaded) - set(listed))
    tally.duplicated += len(listed) - len(set(listed))
    tally.unexpected += len(set(listed) - set(uploaded))


async def run_load(url: str, images: list[Path], args: argparse.Namespace) -> dict:
    payloads = [(path.name, path.read_bytes()) for path in images]
    tally, run = Tally(), secrets.token_hex(3)
    async with AsyncExitStack() as stack:
        # One client (cookie jar) per user; registration (argon2) is not part of the timed run.
        clients = [await stack.enter_async_context(httpx.AsyncClient(base_url=url, timeout=600.0))
                   for _ in range(args.users)]
        headers = await asyncio.gather(*(register(c, f"load{run}u{i}") for i, c in enumerate(clients)))
        began = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(one_user(c, h, i, payloads, args, tally)
                                                for i, (c, h) in enumerate(zip(clients, headers)))),
                               timeout=args.max_seconds)
        elapsed = time.perf_counter() - began
        health = (await clients[0].get("/healthz")).json()
    everything = tally.latencies["upload"] + tally.latencies["list"]
    report = {"users": args.users, "uploads": len(tally.latencies["upload"]), "lists": len(tally.latencies["list"]),
              "requests": len(everything), "seconds": round(elapsed, 3),
              "requests_per_s": round(len(everything) / elapsed, 2),
              "uploads_per_s": round(len(tally.latencies["upload"]) / elapsed, 2)}
    for kind, values in (("all", everything), *tally.latencies.items()):
        ms = np.array(values or [float("nan")]) * 1000.0
        report[f"{kind}_p50_ms"] = round(float(np.percentile(ms, 50)), 1)
        report[f"{kind}_p99_ms"] = round(float(np.percentile(ms, 99)), 1)
    report.update(lost_rows=tally.lost, duplicated_rows=tally.duplicated, unexpected_rows=tally.unexpected,
                  errors=len(tally.errors), first_errors=tally.errors[:3], model=health["model"],
                  database=health["database_backend"],
                  images=[path.name for path in images])
    return report


def start_gallery(args: argparse.Namespace, folder: Path, port: int, log) -> subprocess.Popen:
    command = [sys.executable, str(ROOT / "tools" / "gallery.py"), "--detector", args.detector, "--checkpoint",
               str(args.checkpoint), "--device", args.device, "--port", str(port), "--data-dir", str(folder / "data"),
               "--database", args.database or f"sqlite:///{folder / 'gallery.db'}", "--max-batch",
               str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms), "--log-level", "warning"]
    if args.small_detector:
        command.append("--small-detector")
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    images = args.image or sorted(DEFAULT_IMAGES.glob("*.jpg"))
    if not images:
        raise SystemExit(f"no images: pass --image, or provide {DEFAULT_IMAGES}")
    process, url = None, args.url
    with tempfile.TemporaryDirectory(prefix="butd-gallery-load-") as tmp, tempfile.TemporaryFile(mode="w+") as log:
        if url is None:
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            process = start_gallery(args, Path(tmp), port, log)
        try:
            wait_ready(url, process, log, args.startup_timeout)
            report = asyncio.run(run_load(url.rstrip("/"), images, args))
        finally:
            if process is not None:
                stop_server(process)
    print(json.dumps(report), flush=True)
    clean = not (report["lost_rows"] or report["duplicated_rows"] or report["unexpected_rows"] or report["errors"])
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
