"""Benchmark: SCST reward scoring with TensorCiderD against pycocoevalcap's Cider.

Real captions: the official COCO fakecap results (candidates) and their COCO references (first 5
per image), from ``../shared/data/coco_caption_demo``, lowercased with punctuation removed. Both
scorers take document frequencies from the same references, so their scores must agree to 1e-6
(asserted). Prints one JSON line; times are medians over ``--repeat`` calls, and the tensor scorer's
one-off reference precomputation is reported separately as ``setup_ms``.

    python benchmarks/cider_reward.py --device cuda --candidates 250 --repeat 50
    python benchmarks/cider_reward.py --device cpu --threads 1
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import time
from pathlib import Path

import torch
from pycocoevalcap.cider.cider import Cider

from butd.core.tokens import EOS
from butd.metrics import TensorCiderD, load_coco_references, load_results

DEMO = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "coco_caption_demo"
REFS_PER_IMAGE = 5


def tokenize(caption: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9 ]", " ", caption.lower()).split())


def median_ms(fn, repeat: int, sync) -> float:
    times = []
    for _ in range(repeat):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--candidates", type=int, default=250)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (0: torch's default); on a busy machine 1 is fastest")
    parser.add_argument("--demo-dir", type=Path, default=DEMO)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    references = load_coco_references(args.demo_dir / "captions_val2014_fakecap_refs.json")
    results = load_results(args.demo_dir / "captions_val2014_fakecap_results.json", references)
    image_ids = sorted(results)[: args.candidates]
    if len(image_ids) < args.candidates:
        parser.error(f"only {len(image_ids)} candidates available")
    gts = {i: [tokenize(c) for c in references[i][:REFS_PER_IMAGE]] for i in image_ids}
    res = {i: [tokenize(results[i])] for i in image_ids}

    vocab: dict[str, int] = {}

    def encode(caption: str) -> list[int]:
        return [vocab.setdefault(w, len(vocab) + 4) for w in caption.split()]

    ref_ids = {i: [encode(c) for c in gts[i]] for i in image_ids}
    cand_ids = [encode(res[i][0]) for i in image_ids]
    tokens = torch.zeros(len(image_ids), max(map(len, cand_ids)) + 1, dtype=torch.int64)
    for b, ids in enumerate(cand_ids):
        tokens[b, : len(ids)] = torch.tensor(ids, dtype=torch.int64)
        tokens[b, len(ids)] = EOS

    device = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    start = time.perf_counter()
    scorer = TensorCiderD(references=ref_ids, count_eos=False, device=device, dtype=torch.float64)
    sync()
    setup_ms = (time.perf_counter() - start) * 1000.0
    ids_t, tokens_t = torch.tensor(image_ids, device=device), tokens.to(device)
    scores = scorer(ids_t, tokens_t)  # warm-up (CUDA context, kernels)
    _, reference = Cider().compute_score(gts, res)
    max_abs_diff = float((scores.cpu() - torch.from_numpy(reference)).abs().max())
    assert max_abs_diff <= 1e-6, f"tensor CIDEr-D differs from pycocoevalcap by {max_abs_diff}"

    pycoco_ms = median_ms(lambda: Cider().compute_score(gts, res), args.repeat, lambda: None)
    tensor_ms = median_ms(lambda: scorer(ids_t, tokens_t), args.repeat, sync)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(json.dumps({
        "benchmark": "cider_reward", "device": name, "candidates": len(image_ids),
        "refs_per_image": REFS_PER_IMAGE, "pycocoevalcap_ms": round(pycoco_ms, 3),
        "tensor_ms": round(tensor_ms, 3), "speedup": round(pycoco_ms / tensor_ms, 1),
        "max_abs_diff": max_abs_diff, "setup_ms": round(setup_ms, 3), "repeat": args.repeat,
        "cpu_threads": torch.get_num_threads(),
    }))


if __name__ == "__main__":
    main()
