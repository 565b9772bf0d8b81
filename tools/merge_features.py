"""Merge feature stores (e.g. the shards of tools/extract_features.py --shard I/N) into a new store.

    python tools/merge_features.py --inputs feats.0.lmdb feats.1.lmdb --output feats.lmdb

An image stored in several inputs must be identical in all of them (then it is written once); conflicting records
are an error and nothing is left at OUTPUT.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from butd.errors import ButdError
from feature_extraction.merge import merge_stores


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--inputs", nargs="+", required=True, type=Path, metavar="FEATS.lmdb", help="stores to merge")
    p.add_argument("--output", required=True, type=Path, metavar="OUT.lmdb", help="new store (must not exist)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        report = merge_stores(args.inputs, args.output, progress=not args.no_progress)
    except ButdError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"output": str(args.output), "written": report.written,
                      "identical_duplicates": report.identical_duplicates}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
