"""Serve the captioning gallery: accounts, each user's captioned images on a database, and its page at ``/``.

    # the model in this process (one command):
    python tools/gallery.py --detector WEIGHTS --checkpoint CKPT [--database sqlite:///gallery/gallery.db]
                            [--data-dir gallery/] [--host 127.0.0.1] [--port 8080]
    # or captioning through a model service started with tools/serve.py (e.g. on a GPU machine):
    python tools/gallery.py --model-url http://gpu-host:8000 --database postgresql+psycopg://user@db/gallery \
                            --data-dir /srv/gallery

The database is created (SQLite) or migrated to the newest schema at start-up, and the data folder is reconciled
with it. Several instances may share one PostgreSQL database and one data folder. Behind HTTPS, pass
``--secure-cookies``.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import uvicorn

from butd.errors import ButdError
from butd.gallery import GallerySettings, LocalModel, RemoteModel, create_gallery_app
from butd.gallery.app import prepare_storage


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    model = parser.add_argument_group("model (either --model-url, or --detector and --checkpoint)")
    model.add_argument("--model-url", help="caption through this model service (tools/serve.py) instead of in-process")
    model.add_argument("--detector", help="bottom-up detector weights, or 'random' (meaningless captions)")
    model.add_argument("--checkpoint", type=Path, help="captioner checkpoint (best.pt of a run)")
    model.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    model.add_argument("--boxes", default="10-100", help="regions per image: 'N' fixed or 'MIN-MAX' adaptive")
    model.add_argument("--max-batch", type=int, default=8, help="most images per batch on the device")
    model.add_argument("--max-wait-ms", type=float, default=10.0, help="longest wait for a batch to fill")
    model.add_argument("--small-detector", action="store_true", help="the reduced random detector (tests only)")
    store = parser.add_argument_group("storage")
    store.add_argument("--database", default="sqlite:///gallery/gallery.db",
                       help="SQLAlchemy URL: sqlite:///PATH (created on first start) or postgresql+psycopg://...")
    store.add_argument("--data-dir", type=Path, default=Path("gallery"), help="folder of the images and thumbnails")
    store.add_argument("--quota-mb", type=float, default=500.0, help="storage per user (images + thumbnails), MB")
    limits = parser.add_argument_group("limits (as tools/serve.py)")
    limits.add_argument("--max-upload-mb", type=float, default=20.0, help="largest request body, in MB")
    limits.add_argument("--max-megapixels", type=float, default=40.0, help="largest image, in millions of pixels")
    limits.add_argument("--max-images", type=int, default=16, help="most images in one upload")
    web = parser.add_argument_group("web")
    web.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    web.add_argument("--port", type=int, default=8080)
    web.add_argument("--secure-cookies", action="store_true", help="mark the session cookie Secure (behind HTTPS)")
    web.add_argument("--session-days", type=float, default=14.0, help="how long a log-in lasts")
    web.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    args = parser.parse_args(argv)
    if args.model_url is None and (args.detector is None or args.checkpoint is None):
        parser.error("give --model-url, or --detector and --checkpoint to caption in this process")
    if args.model_url is not None and (args.detector is not None or args.checkpoint is not None):
        parser.error("--model-url captions through a model service: drop --detector/--checkpoint, or drop --model-url")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.log_level != "debug":
        logging.getLogger("alembic").setLevel(logging.WARNING)  # one line per migration step is noise at start-up
    try:
        settings = GallerySettings(
            database_url=args.database, data_dir=args.data_dir, quota_bytes=int(args.quota_mb * 1_000_000),
            max_upload_bytes=int(args.max_upload_mb * 1_000_000), max_pixels=int(args.max_megapixels * 1_000_000),
            max_images=args.max_images, secure_cookies=args.secure_cookies, session_ttl_s=args.session_days * 86400,
        )
        prepare_storage(settings)  # a wrong --database fails here, before the model is loaded
        if args.model_url:
            model = RemoteModel(args.model_url)
        else:
            if args.detector == "random":
                print("warning: --detector random: the captions are meaningless (the page says so too)",
                      file=sys.stderr)
            from butd.captioner import Captioner

            captioner = Captioner.from_files(args.detector, args.checkpoint, device=args.device, boxes=args.boxes,
                                             small_detector=args.small_detector, batch_size=args.max_batch)
            model = LocalModel(captioner, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms)
        app = create_gallery_app(settings, model, prepared=True)
    except ButdError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.secure_cookies:
        print(f"warning: binding to {args.host} without --secure-cookies: serve it behind HTTPS and pass "
              "--secure-cookies so that session cookies never travel in clear", file=sys.stderr)
    # One process: an in-process model lives once in memory, owned by one inference thread.
    uvicorn.run(app, host=args.host, port=args.port, workers=1, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
