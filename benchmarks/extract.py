"""End-to-end extraction throughput of each mode: JPEG decoding + the full detector + LMDB writes.

    python benchmarks/extract.py [--num-images 256] [--batch-size 8] [--device cuda] [--modes reference,fast]
        [--decode workers|device] [--channels-last|--no-channels-last]
    python benchmarks/extract.py --num-images 4 --small --device cpu      # a quick CPU smoke run

Images are COCO-like 640x480 JPEGs generated on the fly; the detector has random weights (speed does not depend on
them). Each mode first extracts a warm-up set (not timed), then the timed set. Prints one JSON line: device, batch
size, and images/s per mode. Goal on one H100/H200: >= 100 images/s with the full network in the fast mode.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from butd.data.store import FeatureWriter
from feature_extraction.detector import BottomUpDetector, BoxPolicy
from feature_extraction.extract import DEFAULT_COMMIT_EVERY, extract_images
from feature_extraction.loading import DECODERS
from feature_extraction.precision import resolve_mode
from feature_extraction.sources import FailureLog, ImageItem


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-images", type=int, default=256, help="timed images")
    p.add_argument("--warmup-images", type=int, default=None, help="untimed images first (default 2 batches)")
    p.add_argument("--batch-size", type=int, default=None, help="default 8 on GPU, 1 on CPU")
    p.add_argument("--device", default=None, help="default cuda if available, else cpu")
    p.add_argument("--modes", default="reference,fast", help="comma-separated extraction modes (precision.py)")
    p.add_argument("--decode", choices=list(DECODERS), default="workers")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="default: on for CUDA, off for CPU")
    p.add_argument("--commit-every", type=int, default=DEFAULT_COMMIT_EVERY)
    p.add_argument("--num-workers", type=int, default=8)
    p.add_argument("--boxes", default="10-100")
    p.add_argument("--small", action="store_true", help="the reduced test network instead of ResNet-101")
    p.add_argument("--size", default="640x480", help="generated image size WxH")
    return p.parse_args(argv)


def make_jpegs(folder: Path, count: int, width: int, height: int, *, first_id: int, seed: int) -> list[ImageItem]:
    """Photo-like JPEGs (smooth colour fields, shapes and noise, so they compress like real pictures)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    items = []
    for i in range(count):
        base = rng.uniform(0, 255, size=3)
        slope = rng.uniform(-0.2, 0.2, size=(2, 3))
        img = base + xx[..., None] * slope[0] + yy[..., None] * slope[1]
        for _ in range(8):
            cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(20, 150)
            img[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = rng.uniform(0, 255, size=3)
        img += rng.normal(0, 8, size=img.shape)
        path = folder / f"COCO_bench2014_{first_id + i:012d}.jpg"
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=90)
        items.append(ImageItem(path, first_id + i))
    return items


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    batch_size = args.batch_size or (8 if device.type == "cuda" else 1)
    warmup = args.warmup_images if args.warmup_images is not None else 2 * batch_size
    width, height = (int(v) for v in args.size.lower().split("x"))
    modes = [resolve_mode(name.strip()) for name in args.modes.split(",")]
    detector = BottomUpDetector.from_weights("random", device=device, small=args.small,
                                             channels_last=args.channels_last)
    policy = BoxPolicy.parse(args.boxes)
    results, failed = {}, 0
    with tempfile.TemporaryDirectory(prefix="butd-bench-") as tmp:
        root = Path(tmp)
        (root / "images").mkdir()
        warm_items = make_jpegs(root / "images", warmup, width, height, first_id=1, seed=1)
        items = make_jpegs(root / "images", args.num_images, width, height, first_id=warmup + 1, seed=2)
        for mode in modes:
            detector.set_precision(mode.precision)
            for name, run_items in (("warmup", warm_items), ("timed", items)):
                out = root / f"{mode.name}.{name}.lmdb"
                with FeatureWriter(out, dtype=mode.dtype, commit_every=args.commit_every) as writer:
                    stats = extract_images(run_items, detector, writer, policy=policy,
                                           failures=FailureLog(root / f"{mode.name}.{name}.failures.jsonl"),
                                           batch_size=batch_size, num_workers=args.num_workers, progress=False,
                                           commit_every=args.commit_every, decode=args.decode)
            results[mode.name] = {"precision": mode.precision, "dtype": mode.dtype, "num_images": stats.extracted,
                                  "seconds": round(stats.seconds, 3),
                                  "images_per_s": round(stats.images_per_second, 3)}
            failed += stats.failed
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(json.dumps({"benchmark": "extract", "device": name, "network": "small" if args.small else "resnet101",
                      "batch_size": batch_size, "num_workers": args.num_workers, "decode": args.decode,
                      "channels_last": detector.channels_last, "image_size": f"{width}x{height}",
                      "failed": failed, "modes": results}))
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
