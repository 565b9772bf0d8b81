"""Spread of the SCST learning test (tests/test_train_scst.py) across training seeds and torch thread counts.

Runs the test's scenario -- a 1,000-image COCO-proxy, XE, then SCST from XE's best checkpoint -- once per
(seed, threads) pair, one run at a time, and prints one JSON line per run: XE's and SCST's CIDEr-D (beam 1) on
the 100 test images and on the 800 training images, the gains, and SCST's mean training reward of each epoch.
The proxy data is built once; with ``--work``, a finished XE run of a (seed, threads) pair is reused. The test's
bound is set from these figures (docs/training.md, "SCST test: spread across seeds and threads").

    python benchmarks/scst_test_spread.py --seeds 0 1 2 3 4 --threads 1 2

A run takes about a minute on a free core (XE and SCST about 25 s each); two threads on a busy 2-core machine
are many times slower.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from test_train_scst import PROXY_IMAGES, SCST_OVERRIDES, XE_OVERRIDES, proxy_config, split_cider

from butd.train.loop import TrainOptions, train


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="train.seed of XE and SCST")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch.set_num_threads values")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--scst", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides for the SCST stage, after the test's own (to try other scenarios)")
    parser.add_argument("--break", dest="broken", choices=["none", *BREAKAGES], default="none",
                        help="run SCST deliberately broken, to check that the test's bound then fails")
    return parser.parse_args(argv)


def _negated(original):
    return lambda logprobs, mask, advantage: original(logprobs, mask, -advantage)


# Ways to break SCST: ascend instead of descend the reward; a baseline equal to the reward (no advantage at all).
BREAKAGES = {
    "negated-reward": ("policy_gradient_loss", _negated),
    "baseline-is-reward": ("mean_baseline", lambda original: lambda rewards: rewards),
}


def break_scst(name: str) -> None:
    import butd.train.scst as scst_module

    attribute, wrap = BREAKAGES[name]
    setattr(scst_module, attribute, wrap(getattr(scst_module, attribute)))


def build_proxy(root: Path) -> TrainOptions:
    from butd.data.prep.coco_source import load_coco_captions, read_karpathy_split
    from butd.data.prep.prepro import prepro_karpathy
    from butd.data.proxy.generator import ProxyConfig, make_proxy_dataset

    if not (root / "data").exists():
        make_proxy_dataset(load_coco_captions(None), read_karpathy_split(None), root / "proxy",
                           ProxyConfig(num_images=PROXY_IMAGES, seed=0, boxes=(10, 20)))
        prepro_karpathy(root / "proxy" / "dataset_coco.json", root / "data", min_count=3)
    return TrainOptions(stage="xe", data_dir=root / "data", features=root / "proxy" / "features.lmdb",
                        output=root / "unused")


def one_run(root: Path, proxy: TrainOptions, seed: int, threads: int, scst_overrides: list[str],
            broken: str = "none") -> dict:
    torch.set_num_threads(threads)
    run = root / f"seed{seed}_t{threads}"
    started = time.perf_counter()
    xe = TrainOptions(stage="xe", data_dir=proxy.data_dir, features=proxy.features, output=run / "xe")
    if not (run / "xe.done").exists():  # XE is deterministic for a seed and thread count: reuse a finished one
        shutil.rmtree(run, ignore_errors=True)
        train(proxy_config(*XE_OVERRIDES, f"train.seed={seed}"), xe)
        (run / "xe.done").touch()
    scst_dir = run / "-".join(["scst", *scst_overrides, *([broken] if broken != "none" else [])])
    shutil.rmtree(scst_dir, ignore_errors=True)  # a fresh SCST run every time
    scst = TrainOptions(stage="scst", data_dir=proxy.data_dir, features=proxy.features, output=scst_dir,
                        init=run / "xe" / "best.pt")
    train(proxy_config(*SCST_OVERRIDES, *scst_overrides, f"train.seed={seed}"), scst)
    metrics = [json.loads(line) for line in (scst_dir / "metrics.jsonl").read_text().splitlines()]
    xe_score, scst_score = split_cider(xe.output, xe), split_cider(scst.output, scst)
    xe_train, scst_train = split_cider(xe.output, xe, "train"), split_cider(scst.output, scst, "train")
    return {"seed": seed, "threads": threads, "scst_overrides": scst_overrides, "broken": broken, "xe_test_cider": round(xe_score, 4),
            "scst_test_cider": round(scst_score, 4), "gain": round(scst_score - xe_score, 4),
            "ratio": round(scst_score / xe_score, 3) if xe_score else None,
            "xe_train_cider": round(xe_train, 4), "scst_train_cider": round(scst_train, 4),
            "train_gain": round(scst_train - xe_train, 4),
            "train_reward": [round(m["train_reward"], 4) for m in metrics],
            "seconds": round(time.perf_counter() - started, 1)}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.broken != "none":
        break_scst(args.broken)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.work or Path(tmp)
        proxy = build_proxy(root)
        for seed in args.seeds:
            for threads in args.threads:
                print(json.dumps(one_run(root, proxy, seed, threads, args.scst, args.broken)), flush=True)


if __name__ == "__main__":
    main()
