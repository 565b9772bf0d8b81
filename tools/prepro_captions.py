#!/usr/bin/env python
"""Preprocess captions into a DATA_DIR (vocab.json, captions.h5, splits.json, references.json, info.json).

Two input kinds:
  tools/prepro_captions.py --input dataset_coco.json --output data/coco [--min-count 5] [--max-length 16]
  tools/prepro_captions.py --coco-captions captions_train2014.json.xz captions_val2014.json.xz \
      [--karpathy-split DIR] --output data/coco
``--coco-captions`` with no files reads the annotations bundled in the installed pycocoevalcap wheel; without
``--karpathy-split`` the Karpathy val/test id lists shipped with butd are used.
"""
from __future__ import annotations

import argparse
import sys
import time

from butd.data.prep.coco_source import load_coco_captions, read_karpathy_split
from butd.data.prep.prepro import prepro_coco, prepro_karpathy
from butd.errors import ButdError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", help="Karpathy split JSON (dataset_coco.json, dataset_flickr30k.json, ...)")
    src.add_argument("--coco-captions", nargs="*", metavar="FILE",
                     help="COCO caption annotation files (.json or .json.xz); none: pycocoevalcap's bundled copy")
    p.add_argument("--karpathy-split", metavar="DIR",
                   help="folder with karpathy_val_images.txt and karpathy_test_images.txt (COCO input only)")
    p.add_argument("--output", required=True, help="DATA_DIR to write")
    p.add_argument("--min-count", type=int, default=5, help="keep words seen MORE than this many times (train)")
    p.add_argument("--max-length", type=int, default=16, help="truncate captions to this many words")
    args = p.parse_args(argv)
    if args.karpathy_split and args.input:
        p.error("--karpathy-split only applies to --coco-captions input")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.time()
    try:
        if args.input:
            summary = prepro_karpathy(args.input, args.output, min_count=args.min_count,
                                      max_length=args.max_length)
        else:
            coco = load_coco_captions(args.coco_captions or None)
            split = read_karpathy_split(args.karpathy_split)
            summary = prepro_coco(coco, split, args.output, min_count=args.min_count, max_length=args.max_length)
    except ButdError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    info = summary.info
    print(f"wrote {args.output} in {time.time() - start:.1f}s: vocab {info['vocab_size']} words, "
          f"images {info['images']}, {info['num_captions']} captions, "
          f"{100 * info['fraction_truncated']:.2f}% truncated to {info['max_length']} words")
    return 0


if __name__ == "__main__":
    sys.exit(main())
