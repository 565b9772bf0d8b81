"""Caption image files with a bottom-up detector and a trained checkpoint; optionally draw per-word attention.

    python tools/caption.py IMAGE... --detector WEIGHTS --checkpoint CKPT [--beam-size 3] [--visualize OUT_DIR]

Prints ``IMAGE<TAB>caption`` per image (``--json``: one JSON object per line, as the web service returns it).
``--visualize OUT_DIR`` writes ``OUT_DIR/<image name>.png``: the image, then one panel per word with the regions it
attended to most. ``--detector random`` runs an untrained detector: the pipeline works, the captions mean nothing.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from butd.captioner import Captioner
from butd.errors import ButdError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="+", type=Path, help="image files (JPEG, PNG, ...)")
    parser.add_argument("--detector", required=True, help="bottom-up detector weights, or 'random' (meaningless captions)")
    parser.add_argument("--checkpoint", required=True, type=Path, help="captioner checkpoint (best.pt of a run)")
    parser.add_argument("--beam-size", type=int, default=3, help="beam width (1: greedy), default 3")
    parser.add_argument("--boxes", default="10-100", help="regions per image: 'N' fixed or 'MIN-MAX' adaptive")
    parser.add_argument("--batch-size", type=int, default=8, help="images per pass through the networks")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--visualize", type=Path, metavar="OUT_DIR", help="write an attention figure per image here")
    parser.add_argument("--top-k", type=int, default=3, help="regions drawn per word in the figures")
    parser.add_argument("--json", action="store_true", help="print one JSON object per image instead of text")
    parser.add_argument("--small-detector", action="store_true",
                        help="the reduced random detector (tests and smoke runs only)")
    return parser.parse_args(argv)


def _unique(stem: str, used: set[str]) -> str:
    """``stem``, or ``stem-2``, ``stem-3``... so that images with the same name in different folders keep both figures."""
    name, n = stem, 1
    while name in used:
        n += 1
        name = f"{stem}-{n}"
    used.add(name)
    return name


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from feature_extraction.images import ImageError, load_image

    if args.detector == "random":
        print("warning: --detector random: the regions come from an untrained detector, so the captions are "
              "meaningless (use real bottom-up weights for real captions)", file=sys.stderr)
    try:
        captioner = Captioner.from_files(
            args.detector, args.checkpoint, device=args.device, boxes=args.boxes,
            small_detector=args.small_detector, batch_size=args.batch_size,
        )
    except ButdError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.visualize is not None:
        from butd.visualize import save_attention_figure
    failures = 0
    figure_names: set[str] = set()
    for start in range(0, len(args.images), args.batch_size):
        paths = args.images[start : start + args.batch_size]
        arrays, names = [], []
        for path in paths:
            try:
                arrays.append(load_image(path))
                names.append(str(path))
            except ImageError as err:
                print(f"error: {path}: cannot read the image: {err}", file=sys.stderr)
                failures += 1
        if not arrays:
            continue
        results = captioner.caption(arrays, beam_size=args.beam_size, names=names)
        for array, result in zip(arrays, results):
            if args.json:
                print(json.dumps(result.to_json()), flush=True)
            else:
                print(f"{result.name}\t{result.caption}", flush=True)
            if args.visualize is not None:
                out = args.visualize / f"{_unique(Path(result.name).stem, figure_names)}.png"
                save_attention_figure(array, result, out, top_k=args.top_k)
                print(f"wrote {out}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
