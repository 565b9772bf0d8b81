#!/usr/bin/env python
"""The full-scale COCO-proxy run: every image, XE then SCST, then the Karpathy-test leaderboard of both stages.

  python benchmarks/full_scale.py --output runs/full_scale                      # one GPU: all 123,287 images
  python benchmarks/full_scale.py --output /tmp/fs --num-images 300 \\
      --config configs/demo.yaml --scst-config configs/demo_scst.yaml         # a CPU smoke run of the same steps

The steps are ``tools/demo.py``'s (proxy features, caption preprocessing, ``tools/train.py --stage xe``, ``--stage
scst --init`` the XE best, ``tools/eval.py`` with beam 3 on the test split), with the full-scale configs
``configs/proxy_full_{xe,scst}.yaml`` by default. A killed run resumes: finished steps are skipped. Prints the
leaderboard table, then one JSON line: the device, each step's wall-clock seconds, per stage the epochs, the mean
training seconds per epoch, the last and best validation CIDEr-D and the peak GPU memory, the test metrics, and
whether XE + SCST fit the issue's 25-minute window.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
WINDOW_SECONDS = 25 * 60  # the performance issue's goal 5: XE + SCST inside one 25-minute GPU window


def stage_summary(run_dir: Path) -> dict:
    """Epochs, training seconds per epoch, validation CIDEr-D and peak GPU memory from RUN_DIR/metrics.jsonl."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    if not records:
        raise SystemExit(f"{run_dir / 'metrics.jsonl'} has no validation record")
    seconds = [r["train_seconds"] for r in records if "train_seconds" in r]
    peaks = [r["peak_gpu_mem_gib"] for r in records if "peak_gpu_mem_gib" in r]
    return {
        "epochs": records[-1]["epoch"],
        "train_s_per_epoch": round(sum(seconds) / len(seconds), 1) if seconds else None,
        "val_cider_d_last": round(records[-1]["CIDEr-D"], 4),
        "val_cider_d_best": round(max(r["CIDEr-D"] for r in records), 4),
        "val_images": records[-1].get("val_images"),
        "peak_gpu_mem_gib": max(peaks) if peaks else None,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", type=Path, required=True, help="working directory (resumable)")
    p.add_argument("--num-images", default="all", help="COCO-proxy images, or 'all' (123,287)")
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "proxy_full_xe.yaml")
    p.add_argument("--scst-config", type=Path, default=ROOT / "configs" / "proxy_full_scst.yaml")
    p.add_argument("--beam-size", type=int, default=3)
    args = p.parse_args(argv)

    demo = [sys.executable, str(ROOT / "tools" / "demo.py"), "--output", str(args.output), "--num-images",
            args.num_images, "--config", str(args.config), "--scst-config", str(args.scst_config),
            "--beam-size", str(args.beam_size), "--examples", "0"]
    if subprocess.run(demo, cwd=ROOT).returncode != 0:
        raise SystemExit("benchmarks/full_scale.py: the run failed (see the messages above); rerun to resume")

    summary = json.loads((args.output / "summary.json").read_text())
    steps = summary["step_seconds"]
    train_seconds = [steps.get("XE training"), steps.get("SCST training")]
    stages = {name: stage_summary(args.output / "runs" / name) for name in ("xe", "scst")}
    test = {stage: {k: v for k, v in metrics.items() if k not in ("num_images",)}
            for stage, metrics in summary["test_metrics"].items()}
    print(json.dumps({
        "benchmark": "full_scale",
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "num_images": args.num_images, "beam_size": args.beam_size,
        "test_images": summary["test_metrics"]["XE"]["num_images"],
        "step_seconds": {k: None if v is None else round(v, 1) for k, v in steps.items()},
        "xe_plus_scst_s": None if None in train_seconds else round(sum(train_seconds), 1),
        "within_25_min_window": None if None in train_seconds else sum(train_seconds) <= WINDOW_SECONDS,
        "stages": stages, "test_metrics": test,
    }))


if __name__ == "__main__":
    main()
