"""Serve the captioner over HTTP: the JSON API (``POST /v1/captions``), ``GET /healthz`` and a page at ``/``.

    python tools/serve.py --detector WEIGHTS --checkpoint CKPT [--host 127.0.0.1] [--port 8000]
                          [--max-batch 8] [--max-wait-ms 10] [--max-pending-megapixels 100] [--max-decodes 2]
                          [--header-timeout 10] [--body-timeout 60] [--max-connections 100]

The model is loaded once; images of concurrent requests are micro-batched onto the device. The server listens on
127.0.0.1 unless ``--host`` says otherwise (it has no authentication: put a proxy in front before exposing it).
Its memory is bounded by a budget of decoded pixels and its connections by time limits: see docs/service.md.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import uvicorn

from butd.captioner import Captioner
from butd.errors import ButdError
from butd.serve import create_app
from butd.serve.admission import return_large_frees_to_the_os
from butd.serve.connections import ConnectionLimits, server_config


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--detector", required=True, help="bottom-up detector weights, or 'random' (meaningless captions)")
    parser.add_argument("--checkpoint", required=True, type=Path, help="captioner checkpoint (best.pt of a run)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--boxes", default="10-100", help="regions per image: 'N' fixed or 'MIN-MAX' adaptive")
    parser.add_argument("--max-batch", type=int, default=8, help="most images per batch on the device")
    parser.add_argument("--max-wait-ms", type=float, default=10.0, help="longest wait for a batch to fill")
    parser.add_argument("--max-upload-mb", type=float, default=20.0, help="largest request body, in MB")
    parser.add_argument("--max-megapixels", type=float, default=40.0, help="largest image, in millions of pixels")
    parser.add_argument("--max-images", type=int, default=16, help="most images in one request")
    parser.add_argument("--max-pending-megapixels", type=float, default=100.0,
                        help="memory budget: decoded megapixels of all requests being decoded, queued or captioned "
                             "(3 bytes each); requests beyond it get 503 with Retry-After")
    parser.add_argument("--max-decodes", type=int, default=2, help="images decoded at once at most")
    parser.add_argument("--header-timeout", type=float, default=10.0,
                        help="seconds a client has to send a request's headers before the connection is closed")
    parser.add_argument("--body-timeout", type=float, default=60.0,
                        help="seconds a client has to send a request's body before it gets 408")
    parser.add_argument("--keep-alive", type=int, default=5, help="seconds an idle connection stays open")
    parser.add_argument("--max-connections", type=int, default=100,
                        help="open connections at most; beyond, requests get 503")
    parser.add_argument("--small-detector", action="store_true",
                        help="the reduced random detector (tests and smoke runs only)")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    args = parser.parse_args(argv)
    positive = {"--max-batch": args.max_batch, "--max-upload-mb": args.max_upload_mb,
                "--max-megapixels": args.max_megapixels, "--max-images": args.max_images,
                "--max-pending-megapixels": args.max_pending_megapixels, "--max-decodes": args.max_decodes,
                "--header-timeout": args.header_timeout, "--body-timeout": args.body_timeout,
                "--keep-alive": args.keep_alive, "--max-connections": args.max_connections}
    for option, value in positive.items():
        if not value > 0:
            parser.error(f"{option} must be > 0, got {value}")
    if args.max_pending_megapixels < args.max_megapixels:
        parser.error(f"--max-pending-megapixels ({args.max_pending_megapixels:g}) must be at least --max-megapixels "
                     f"({args.max_megapixels:g}), or the largest accepted image could never be admitted")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.detector == "random":
        print("warning: --detector random: the regions come from an untrained detector, so the captions are "
              "meaningless (the page says so too)", file=sys.stderr)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: binding to {args.host}: the service has no authentication", file=sys.stderr)
    return_large_frees_to_the_os()  # decoded images are large: their memory must go back once they are captioned
    try:
        captioner = Captioner.from_files(
            args.detector, args.checkpoint, device=args.device, boxes=args.boxes,
            small_detector=args.small_detector, batch_size=args.max_batch,
        )
    except ButdError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    app = create_app(
        captioner,
        max_upload_bytes=int(args.max_upload_mb * 1_000_000),
        max_pixels=int(args.max_megapixels * 1_000_000),
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        max_images=args.max_images,
        max_pending_pixels=int(args.max_pending_megapixels * 1_000_000),
        max_decodes=args.max_decodes,
        body_timeout_s=args.body_timeout,
    )
    limits = ConnectionLimits(header_timeout_s=args.header_timeout, keep_alive_s=args.keep_alive,
                              max_connections=args.max_connections)
    uvicorn.Server(server_config(app, host=args.host, port=args.port, limits=limits, log_level=args.log_level)).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
