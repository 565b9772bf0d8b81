"""Beam-search throughput of the full-size Up-Down captioner with random weights.

COCO-scale setting: 9,487-word vocabulary, 36 x 2048 region features, LSTM 1000, attention 512,
embedding 1000. Features are generated on the device beforehand (float16, as the feature store
holds them); the timed part is encode + beam search of every batch, after one untimed warm-up
batch. Random weights rarely emit <eos>, so every batch runs the full ``--max-length`` steps:
a worst case for a trained model.

    python benchmarks/beam_search.py --device cpu --num-images 50 --batch-size 25
    python benchmarks/beam_search.py --device cuda --num-images 5000 --batch-size 2500

Prints one JSON line.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import platform
import time

import torch

from butd.core.devices import resolve_device
from butd.decoding import beam_search
from butd.models import UpDownCaptioner


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--num-images", type=int, default=5000)
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--beam-size", type=int, default=3)
    parser.add_argument("--max-length", type=int, default=16)
    parser.add_argument(
        "--precision", choices=["fp32", "bf16"], default=None,
        help="bf16 autocast or fp32 (TF32 matmuls on CUDA); default bf16 on CUDA, fp32 on CPU",
    )
    parser.add_argument("--vocab-size", type=int, default=9487)
    parser.add_argument("--num-regions", type=int, default=36)
    parser.add_argument("--feature-dim", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.num_images < 1 or args.batch_size < 1 or args.beam_size < 1:
        parser.error("--num-images, --batch-size and --beam-size must be >= 1")
    return args


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = resolve_device(args.device)
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(args.seed)
    model = UpDownCaptioner(vocab_size=args.vocab_size, feature_dim=args.feature_dim).to(device).eval()

    generator = torch.Generator(device=device).manual_seed(args.seed)
    features = torch.randn(
        args.num_images, args.num_regions, args.feature_dim, device=device, generator=generator
    ).relu_().half()  # non-negative like pooled CNN features
    mask = torch.ones(args.num_images, args.num_regions, dtype=torch.bool, device=device)
    autocast = (
        torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        if precision == "bf16"
        else contextlib.nullcontext()
    )

    def decode(start: int, stop: int) -> torch.Tensor:
        regions = model.encode(features[start:stop], mask[start:stop])
        out = beam_search(model, regions, beam_size=args.beam_size, max_length=args.max_length)
        return out.tokens

    with torch.inference_mode(), autocast:
        decode(0, min(args.batch_size, args.num_images))  # warm-up: kernels, allocator, autocast weight cache
        synchronize(device)
        begin = time.perf_counter()
        ended = 0
        for start in range(0, args.num_images, args.batch_size):
            tokens = decode(start, min(start + args.batch_size, args.num_images))
            ended += int((tokens == 2).any(dim=1).sum())  # once per batch, after the batch's own sync
        synchronize(device)
        seconds = time.perf_counter() - begin

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(json.dumps({
        "benchmark": "beam_search",
        "device": f"{device.type}: {name}",
        "torch": torch.__version__,
        "num_images": args.num_images,
        "batch_size": args.batch_size,
        "beam_size": args.beam_size,
        "max_length": args.max_length,
        "precision": precision,
        "vocab_size": args.vocab_size,
        "num_regions": args.num_regions,
        "feature_dim": args.feature_dim,
        "captions_with_eos": ended,
        "seconds": round(seconds, 4),
        "images_per_s": round(args.num_images / seconds, 2),
    }))


if __name__ == "__main__":
    main()
