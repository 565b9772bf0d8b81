"""Import public bottom-up region features (TSV or per-image .npz) into a butd LMDB feature store.

    python tools/convert_features.py --input trainval_36/*.tsv --output data/feats36.lmdb [--dtype float16]

Inputs: bottom-up-attention TSV (6 fields, adaptive 10-100 or fixed 36 boxes), LXMERT / py-bottom-up-attention TSV
(10 fields, with object and attribute ids), directories of bottom-up-attention.pytorch or self-critical.pytorch
.npz files. Rerunning the same command resumes: images already in the store are skipped.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from butd.data.prep.convert import convert_features
from butd.data.store import read_metadata
from butd.errors import ButdError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, metavar="FILE_OR_DIR",
                   help="TSV files, .npz files, or directories of .npz files")
    p.add_argument("--output", required=True, metavar="FEATS.lmdb", help="feature store directory (created)")
    p.add_argument("--dtype", choices=["float16", "float32"], default=None,
                   help="feature dtype of a new store (default float16; an existing store keeps its own)")
    p.add_argument("--commit-every", type=int, default=256, help="records per LMDB transaction")
    p.add_argument("--allow-pickle", action="store_true",
                   help="read the pickled 'info' dict (object/attribute ids) of bottom-up-attention.pytorch "
                        ".npz files; only for files you trust")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p.parse_args(argv)


def _holds_records(output: str) -> bool:
    """Whether ``output`` is a butd store with records (worth resuming), not absent, empty or another program's."""
    try:
        return read_metadata(output) is not None
    except ButdError:
        return False


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        summary = convert_features(args.input, args.output, dtype=args.dtype, commit_every=args.commit_every,
                                   allow_pickle=args.allow_pickle, progress=not args.no_progress)
    except ButdError as exc:
        print(f"error: {exc}", file=sys.stderr)
        if _holds_records(args.output):
            print("records committed before the error are kept; fix the input and rerun to resume", file=sys.stderr)
        return 1
    print(json.dumps({"output": args.output, **asdict(summary)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
