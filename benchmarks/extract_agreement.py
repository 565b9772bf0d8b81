"""How far the fast extraction mode (bf16 autocast) is from the reference mode (strict fp32) on the same network.

    python benchmarks/extract_agreement.py                       # small random network, CPU: 9 COCO + 256 generated
    python benchmarks/extract_agreement.py --network resnet101 --generated 0 --device cuda
    python benchmarks/extract_agreement.py --weights bua-caffe-frcn-r101_with_attributes.pth --device cuda

Both modes run the same weights (by default seeded random ones: the published files are not available here) on
the 9 real COCO images of ../shared/data/coco_images (skipped if absent) and on ``--generated`` photo-like images.
A random network is almost never confident, which would make every image take the 10-box floor; ``--class-scale``
(default 30, random weights only) multiplies the class-score weights so that confidences spread around the 0.2
threshold and the adaptive 10-100 rule is exercised as with trained weights. On CPU the fast mode is CPU bf16
autocast (the same bf16 rounding of convolution and linear inputs as CUDA autocast; the kernels differ).

With ``--floor`` (default) the reference mode is also compared with itself run channels_last, i.e. with other
float32 convolution kernels: the disagreement float32 rounding alone causes, the floor for any fast mode.

Prints one JSON line with, per image set and over all images: the fraction of images with the same number of
regions and with identical region sets, the IoU of each reference region with its matched fast region (greedy by IoU; an
unmatched region counts 0), and the cosine similarity of the matched regions' features.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

from feature_extraction.detector import BottomUpDetector, BoxPolicy, Detections
from feature_extraction.images import load_image

COCO_IMAGES = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco_images"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default="random", help="'random' (seeded) or a published weights file")
    p.add_argument("--network", choices=["small", "resnet101"], default="small", help="with random weights")
    p.add_argument("--generated", type=int, default=256, help="generated images (640x480)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--fast", choices=["bf16", "fp16"], default="bf16", help="the fast mode's compute precision")
    p.add_argument("--boxes", default="10-100")
    p.add_argument("--seed", type=int, default=0, help="weights seed (images use fixed seeds)")
    p.add_argument("--class-scale", type=float, default=30.0, help="multiplies the random class-score weights")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--floor", action=argparse.BooleanOptionalAction, default=True,
                   help="also compare the reference mode with itself run channels_last (other float32 kernels): "
                        "how much float32 rounding alone moves the selection")
    return p.parse_args(argv)


def generated_images(count: int, width: int = 640, height: int = 480) -> list[np.ndarray]:
    """Photo-like pictures: smooth colour fields, discs and noise (seeded)."""
    rng = np.random.default_rng(12345)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    images = []
    for _ in range(count):
        img = rng.uniform(0, 255, size=3) + xx[..., None] * rng.uniform(-0.2, 0.2, 3) \
            + yy[..., None] * rng.uniform(-0.2, 0.2, 3)
        for _ in range(8):
            cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(20, 150)
            img[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = rng.uniform(0, 255, size=3)
        img += rng.normal(0, 8, size=img.shape)
        images.append(np.clip(img, 0, 255).astype(np.uint8))
    return images


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU with inclusive pixel corners (the network's convention), [len(a), len(b)]."""
    area = lambda x: (x[:, 2] - x[:, 0] + 1) * (x[:, 3] - x[:, 1] + 1)  # noqa: E731
    w = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]) + 1, 0, None)
    h = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]) + 1, 0, None)
    inter = w * h
    return inter / (area(a)[:, None] + area(b)[None, :] - inter)


def compare(ref: Detections, fast: Detections) -> tuple[list[float], list[float]]:
    """Greedy IoU matching of the reference regions to the fast ones: IoU per reference region (0 if unmatched)
    and the features' cosine similarity per matched pair."""
    iou = iou_matrix(ref.boxes.astype(np.float64), fast.boxes.astype(np.float64))
    ious, cosines = [0.0] * len(ref.boxes), []
    while iou.size and iou.max() > 0:
        i, j = np.unravel_index(np.argmax(iou), iou.shape)
        ious[i] = float(iou[i, j])
        a, b = ref.features[i].astype(np.float64), fast.features[j].astype(np.float64)
        cosines.append(float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12)))
        iou[i, :], iou[:, j] = -1, -1
    return ious, cosines


def run(detector: BottomUpDetector, images: list[np.ndarray], precision: str, policy: BoxPolicy,
        batch_size: int, *, channels_last: bool = False) -> tuple[list[Detections], float]:
    detector.set_precision(precision)
    detector.set_channels_last(channels_last)
    start, out = time.perf_counter(), []
    for i in range(0, len(images), batch_size):
        out.extend(detector.detect(images[i: i + batch_size], boxes=policy))
    return out, time.perf_counter() - start


def summary(ref: list[Detections], fast: list[Detections], seconds: dict[str, float]) -> dict:
    ious, cosines, same_count, identical = [], [], 0, 0
    for r, f in zip(ref, fast):
        image_ious, image_cos = compare(r, f)
        ious += image_ious
        cosines += image_cos
        same_count += r.num_boxes == f.num_boxes
        identical += r.num_boxes == f.num_boxes and bool(np.all(np.asarray(image_ious) > 0.999))
    ious_a, cos_a = np.asarray(ious), np.asarray(cosines)
    return {"images": len(ref), "regions_reference": int(sum(r.num_boxes for r in ref)),
            "mean_regions_reference": round(float(np.mean([r.num_boxes for r in ref])), 2),
            "same_count_fraction": round(same_count / len(ref), 4),
            "identical_regions_fraction": round(identical / len(ref), 4),
            "matched_iou_mean": round(float(ious_a.mean()), 4),
            "matched_iou_p05": round(float(np.quantile(ious_a, 0.05)), 4),
            "regions_iou_ge_0.9": round(float((ious_a >= 0.9).mean()), 4),
            "feature_cosine_mean": round(float(cos_a.mean()), 5),
            "feature_cosine_p05": round(float(np.quantile(cos_a, 0.05)), 5),
            "seconds": {k: round(v, 2) for k, v in seconds.items()}}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    torch.manual_seed(args.seed)
    small = args.weights == "random" and args.network == "small"
    detector = BottomUpDetector.from_weights(args.weights, device=args.device, small=small, seed=args.seed)
    class_scale = args.class_scale if args.weights == "random" else 1.0
    with torch.no_grad():
        detector.roi_heads.box_predictor.cls_score.weight.mul_(class_scale)
    policy = BoxPolicy.parse(args.boxes)
    sets = {}
    real = sorted(COCO_IMAGES.glob("*.jpg"))
    if real:
        sets["coco9"] = [load_image(p) for p in real]
    if args.generated:
        sets[f"generated{args.generated}"] = generated_images(args.generated)
    results, floor, every = {}, {}, {"reference": [], "fast": [], "floor": []}
    total = {"reference": 0.0, "fast": 0.0, "floor": 0.0}
    for name, images in sets.items():
        ref, t_ref = run(detector, images, "fp32", policy, args.batch_size)
        fast, t_fast = run(detector, images, args.fast, policy, args.batch_size)
        results[name] = summary(ref, fast, {"reference": t_ref, "fast": t_fast})
        seconds = {"reference": t_ref, "fast": t_fast}
        if args.floor:
            other, seconds["floor"] = run(detector, images, "fp32", policy, args.batch_size, channels_last=True)
            floor[name] = summary(ref, other, {"floor": seconds["floor"]})
            every["floor"] += other
        every["reference"] += ref
        every["fast"] += fast
        total = {k: total[k] + seconds.get(k, 0.0) for k in total}
    results["all"] = summary(every["reference"], every["fast"], {k: total[k] for k in ("reference", "fast")})
    if args.floor:
        floor["all"] = summary(every["reference"], every["floor"], {"floor": total["floor"]})
    print(json.dumps({"benchmark": "extract_agreement", "network": args.network, "device": args.device,
                      "fast": args.fast, "boxes": args.boxes, "weights": Path(args.weights).name,
                      "class_scale": class_scale, "seed": args.seed,
                      "sets": results, **({"fp32_floor": floor} if args.floor else {})}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
