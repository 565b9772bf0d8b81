#!/usr/bin/env python
"""Train a captioner: cross-entropy (XE) or self-critical (SCST) stage.

  tools/train.py --config configs/butd_xe.yaml --stage xe --data DATA_DIR --features FEATS.lmdb --output runs/xe
  tools/train.py --config configs/butd_scst.yaml --stage scst --init runs/xe/best.pt \
      --data DATA_DIR --features FEATS.lmdb --output runs/scst
  tools/train.py --resume runs/xe --stage xe --data DATA_DIR --features FEATS.lmdb [train.max_epochs=40]

Trailing ``section.key=value`` arguments override the config (``train.lr=1e-4``). ``--resume RUN_DIR`` continues
from RUN_DIR/last.pt with RUN_DIR/config.yaml (plus any overrides); an --output that already holds a run is refused
(nothing there is overwritten). A run whose loss stays non-finite or explodes stops with one line and exit code 1,
its checkpoints holding the last good model. With ``--init`` the model section comes from the
checkpoint. Several GPUs: ``torchrun --nproc_per_node=N tools/train.py ...`` (``train.batch_size`` is per process).
"""
from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

from butd.config import load_config
from butd.core.files import write_atomic
from butd.core.threads import configure_threads
from butd.errors import ButdError, ConfigError
from butd.train.distributed import teardown_distributed
from butd.train.loop import TrainOptions, train


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, help="YAML config (configs/butd_xe.yaml, configs/butd_scst.yaml, ...)")
    p.add_argument("--stage", required=True, choices=("xe", "scst"), help="training objective")
    p.add_argument("--data", type=Path, required=True, help="DATA_DIR written by tools/prepro_captions.py")
    p.add_argument("--features", type=Path, required=True, help="LMDB feature store")
    p.add_argument("--output", type=Path, help="RUN_DIR for config.yaml, checkpoints and logs")
    p.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue the run in RUN_DIR from its last.pt")
    p.add_argument("--init", type=Path, metavar="CHECKPOINT", help="start from these weights (SCST: XE best.pt)")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: $BUTD_THREADS, else the physical "
                                               "cores less one per data.num_workers process)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    args = p.parse_args(argv)
    if args.resume:
        if args.config:
            p.error("--resume uses RUN_DIR/config.yaml; pass changes as section.key=value overrides, not --config")
        if args.output and args.output.resolve() != args.resume.resolve():
            p.error("--output must be the resumed RUN_DIR (or left out)")
        args.output = args.resume
    elif not args.config or not args.output:
        p.error("--config and --output are required (unless --resume RUN_DIR)")
    if args.stage == "scst" and not (args.init or args.resume):
        p.error("--stage scst starts from a trained XE model: pass --init RUN_DIR/best.pt")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.resume:
            config_path = args.resume / "config.yaml"
            if not (args.resume / "last.pt").is_file():
                raise ConfigError(f"--resume {args.resume}: no last.pt there to resume from")
        else:
            config_path = args.config
        cfg = load_config(config_path, args.overrides)
        configure_threads(args.threads, workers=cfg.data.num_workers)
        result = train(cfg, TrainOptions(stage=args.stage, data_dir=args.data, features=args.features,
                                         output=args.output, resume=bool(args.resume), init=args.init))
    except ButdError as error:
        print(f"error: {error}", file=sys.stderr)
        if error.__cause__ is not None and args.output is not None and args.output.is_dir():
            # An unexpected failure inside a step: keep the details for a bug report, off the terminal.
            details = "".join(traceback.format_exception(error.__cause__))
            write_atomic(args.output / "train_error.log", details)
        return 1
    finally:
        teardown_distributed()
    state = result.state
    if state.val_metrics:
        print(f"done: {state.epoch} epochs, {state.iteration} iterations, best val CIDEr-D {state.best_score:.4f}; "
              f"checkpoints in {result.run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
