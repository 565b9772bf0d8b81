"""Extract bottom-up region features (Visual Genome Faster R-CNN, ResNet-101) from images into an LMDB store.

    python tools/extract_features.py --images COCO/val2014 --weights bua-caffe-frcn-r101_with_attributes.pth \
        --output data/feats.lmdb [--boxes 10-100|36] [--mode reference|fast] [--batch-size 8] [--shard 0/4]

--images is a folder (ids from COCO file names, e.g. COCO_val2014_000000391895.jpg -> 391895) or a list file of
'path<TAB>id' lines. Bad images are logged to OUTPUT.failures.jsonl and skipped. Rerunning the same command resumes:
stored images and earlier failures are skipped. See docs/extraction.md for which weights give which published
features (--boxes 10-100 or 36) and for the format.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from butd.errors import ButdError
from feature_extraction.extract import DEFAULT_COMMIT_EVERY, ExtractionConfig, run_extraction
from feature_extraction.images import DEFAULT_MAX_PIXELS
from feature_extraction.loading import DECODERS
from feature_extraction.precision import DEFAULT_MODE, MODES, PRECISIONS, STORAGE_DTYPES
from feature_extraction.sources import parse_shard


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", required=True, type=Path, metavar="DIR_OR_LIST",
                   help="image folder (searched recursively) or a list file of 'path<TAB>id' lines")
    p.add_argument("--weights", required=True, metavar="FILE|random",
                   help="10-100 boxes: bua-caffe-frcn-r101_with_attributes.pth or "
                        "faster_rcnn_from_caffe_attr_original.pkl; 36 boxes: ..._fix36.pth or "
                        "faster_rcnn_from_caffe_attr.pkl; or 'random' (meaningless features, for tests and benchmarks)")
    p.add_argument("--output", required=True, type=Path, metavar="FEATS.lmdb", help="feature store (created/resumed)")
    p.add_argument("--boxes", default="10-100", help="regions per image: MIN-MAX (default 10-100) or a count (36)")
    p.add_argument("--batch-size", type=int, default=None, help="images per forward pass (default 8 on GPU, 1 on CPU)")
    p.add_argument("--shard", default="0/1", metavar="I/N", help="process shard I of N (0-based; default 0/1)")
    p.add_argument("--device", default=None, help="torch device (default cuda if available, else cpu)")
    p.add_argument("--num-workers", type=int, default=4, help="image decoding worker processes (0: main process)")
    p.add_argument("--mode", choices=sorted(MODES), default=DEFAULT_MODE,
                   help="reference (default): fp32 with TF32 off, float32 features, the published features' "
                        "arithmetic; fast: bf16 autocast, float16 features (agreement in docs/extraction.md)")
    p.add_argument("--precision", choices=sorted(PRECISIONS), default=None,
                   help="override the mode's compute precision (fp32 always runs with TF32 off)")
    p.add_argument("--dtype", choices=list(STORAGE_DTYPES), default=None,
                   help="override the mode's stored feature dtype")
    p.add_argument("--commit-every", type=int, default=DEFAULT_COMMIT_EVERY, metavar="N",
                   help=f"at most N extracted images are ever uncommitted, i.e. lost by a kill (default "
                        f"{DEFAULT_COMMIT_EVERY}; commits run on a background thread)")
    p.add_argument("--decode", choices=list(DECODERS), default="workers",
                   help="workers (default): PIL in the worker processes; device: JPEGs decoded on the detector's "
                        "device (nvJPEG on CUDA), other files by the workers")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="NHWC convolutions (default: on for CUDA, off for CPU)")
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
            shard=parse_shard(args.shard), device=device, num_workers=args.num_workers, mode=args.mode,
            precision=args.precision, dtype=args.dtype, failures=args.failures, max_pixels=args.max_pixels,
            retry_failed=args.retry_failed, small=args.small, progress=not args.no_progress,
            commit_every=args.commit_every, decode=args.decode, channels_last=args.channels_last)
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
