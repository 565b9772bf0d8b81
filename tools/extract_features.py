"""Extract bottom-up region features (Visual Genome Faster R-CNN, ResNet-101) from images into an LMDB store.

    python tools/extract_features.py --images COCO/val2014 --weights faster_rcnn_from_caffe_attr.pkl \
        --output data/feats.lmdb [--boxes 10-100|36] [--batch-size 8] [--shard 0/4] [--device cuda]

--images is a folder (ids from COCO file names, e.g. COCO_val2014_000000391895.jpg -> 391895) or a list file of
'path<TAB>id' lines. Bad images are logged to OUTPUT.failures.jsonl and skipped. Rerunning the same command resumes:
stored images and earlier failures are skipped. See docs/extraction.md for the weights and the format.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from butd.errors import ButdError
from feature_extraction.extract import ExtractionConfig, run_extraction
from feature_extraction.images import DEFAULT_MAX_PIXELS
from feature_extraction.sources import parse_shard


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", required=True, type=Path, metavar="DIR_OR_LIST",
                   help="image folder (searched recursively) or a list file of 'path<TAB>id' lines")
    p.add_argument("--weights", required=True, metavar="FILE|random",
                   help="faster_rcnn_from_caffe_attr.pkl, bua-caffe-frcn-r101_with_attributes.pth, or 'random' "
                        "(meaningless features, for tests and benchmarks)")
    p.add_argument("--output", required=True, type=Path, metavar="FEATS.lmdb", help="feature store (created/resumed)")
    p.add_argument("--boxes", default="10-100", help="regions per image: MIN-MAX (default 10-100) or a count (36)")
    p.add_argument("--batch-size", type=int, default=None, help="images per forward pass (default 8 on GPU, 1 on CPU)")
    p.add_argument("--shard", default="0/1", metavar="I/N", help="process shard I of N (0-based; default 0/1)")
    p.add_argument("--device", default=None, help="torch device (default cuda if available, else cpu)")
    p.add_argument("--num-workers", type=int, default=4, help="image decoding worker processes (0: main process)")
    p.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default="bf16",
                   help="autocast precision on CUDA (default bf16; fp32 is closest to the Caffe original)")
    p.add_argument("--dtype", choices=["float16", "float32"], default="float16", help="stored feature dtype")
    p.add_argument("--failures", type=Path, default=None, help="failures file (default OUTPUT.failures.jsonl)")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="refuse images with more pixels")
    p.add_argument("--retry-failed", action="store_true", help="retry images listed in the failures file")
    p.add_argument("--strict", action="store_true", help="exit with status 1 if any image failed")
    p.add_argument("--small", action="store_true", help="the reduced test network (only with --weights random)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    batch_size = args.batch_size or (8 if device.startswith("cuda") else 1)
    if args.small and args.weights != "random":
        print("error: --small builds the reduced test network; it only makes sense with --weights random",
              file=sys.stderr)
        return 2
    try:
        config = ExtractionConfig(
            images=args.images, weights=args.weights, output=args.output, boxes=args.boxes, batch_size=batch_size,
            shard=parse_shard(args.shard), device=device, num_workers=args.num_workers, precision=args.precision,
            dtype=args.dtype, failures=args.failures, max_pixels=args.max_pixels, retry_failed=args.retry_failed,
            small=args.small, progress=not args.no_progress)
        stats = run_extraction(config)
    except ButdError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    failed = stats.failed + stats.previously_failed
    print(json.dumps({"output": str(args.output), "listed": stats.listed, "already_done": stats.already_done,
                      "extracted": stats.extracted, "failed": stats.failed,
                      "previously_failed": stats.previously_failed,
                      "images_per_second": round(stats.images_per_second, 3),
                      "failures_file": str(config.failures_path) if failed else None}))
    if failed and args.strict:
        print(f"error: {failed} image(s) failed, see {config.failures_path}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
