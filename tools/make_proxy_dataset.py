#!/usr/bin/env python
"""Make the COCO-proxy dataset: real COCO captions, synthetic region features ("real language, synthetic vision").

  tools/make_proxy_dataset.py --output data/proxy [--num-images 2000|all] [--seed 0] [--boxes 10-100|36]
      [--coco-captions captions_train2014.json.xz captions_val2014.json.xz] [--device auto]

Writes DIR/dataset_coco.json (Karpathy format), DIR/features.lmdb, DIR/info.json and DIR/README.txt. Without
--coco-captions the annotations bundled in the installed pycocoevalcap wheel are used. Rerunning with the same
parameters resumes (images already in features.lmdb are skipped). Then preprocess the captions with
  tools/prepro_captions.py --input DIR/dataset_coco.json --output DIR/data
"""
from __future__ import annotations

import argparse
import sys

import torch
from tqdm import tqdm

from butd.data.prep.coco_source import load_coco_captions, read_karpathy_split
from butd.data.proxy.generator import ProxyConfig, make_proxy_dataset, parse_boxes
from butd.errors import ButdError, ConfigError


def _num_images(text: str) -> int | None:
    if text == "all":
        return None
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a number of images or 'all', got {text!r}")
    return int(text)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True, help="output directory")
    p.add_argument("--num-images", type=_num_images, default=2000, help="images to use, or 'all' (123,287)")
    p.add_argument("--seed", type=int, default=0, help="selects the images and all per-image randomness")
    p.add_argument("--boxes", default="10-100", help="regions per image: MIN-MAX (random per image) or K")
    p.add_argument("--coco-captions", nargs="+", metavar="FILE",
                   help="COCO caption annotation files (.json or .json.xz); default: pycocoevalcap's bundled copy")
    p.add_argument("--karpathy-split", metavar="DIR",
                   help="folder with karpathy_{val,test}_images.txt; default: the lists shipped with butd")
    p.add_argument("--device", default="auto", help="torch device for rendering features: auto, cpu, cuda, ...")
    p.add_argument("--chunk-size", type=int, default=256, help="images rendered at once (bounds memory)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    try:
        if args.seed < 0:
            raise ConfigError(f"--seed must be >= 0, got {args.seed}")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"--device {device}: CUDA is not available here (use --device cpu)")
        config = ProxyConfig(num_images=args.num_images, seed=args.seed, boxes=parse_boxes(args.boxes),
                             device=device, chunk_size=args.chunk_size)
        coco = load_coco_captions(args.coco_captions)
        split = read_karpathy_split(args.karpathy_split)
        with tqdm(desc="proxy features", unit="img", total=args.num_images or len(coco.images),
                  disable=None) as bar:
            summary = make_proxy_dataset(coco, split, args.output, config, progress=bar.update)
    except ButdError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {args.output} in {summary.seconds:.1f}s on {device}: splits {summary.splits}, "
          f"{summary.written} images written, {summary.skipped} already present, "
          f"{summary.mean_boxes:.1f} boxes/image ({summary.mean_caption_regions:.1f} from captions)")
    print("COCO-proxy: real language, synthetic vision -- not comparable with real COCO results")
    return 0


if __name__ == "__main__":
    sys.exit(main())
