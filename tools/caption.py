"""Caption image files with a bottom-up detector and a trained checkpoint; optionally draw per-word attention.

    python tools/caption.py IMAGE... --detector WEIGHTS --checkpoint CKPT [--beam-size 3] [--visualize OUT_DIR]

Prints ``IMAGE<TAB>caption`` per image (``--json``: one JSON object per line, as the web service returns it).
An image that cannot be used (unreadable, or a shape the detector cannot take) is reported on stderr, one line
naming it, and skipped; the others are still captioned, and the exit status is then 1.
``--visualize OUT_DIR`` writes ``OUT_DIR/<image name>.png``: the image, then one panel per word with the regions it
attended to most. ``--detector random`` runs an untrained detector: the pipeline works, the captions mean nothing.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from butd.captioner import Captioner, ImageCaption
from butd.errors import ButdError

if TYPE_CHECKING:
    import numpy as np

    from feature_extraction.images import ImageError


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


def _caption_batch(captioner: Captioner, arrays: list[np.ndarray], names: list[str],
                   beam_size: int) -> list[ImageCaption | ImageError]:
    """The batch's ``ImageCaption``s; should the captioner still refuse one of the images, each image is captioned
    alone so that the refused one comes back as its ``ImageError`` and the others still get captions."""
    from feature_extraction.images import ImageError

    try:
        return captioner.caption(arrays, beam_size=beam_size, names=names)
    except ImageError as err:
        if len(arrays) == 1:
            return [err]
    results: list[ImageCaption | ImageError] = []
    for array, name in zip(arrays, names):
        try:
            results.extend(captioner.caption([array], beam_size=beam_size, names=[name]))
        except ImageError as err:
            results.append(err)
    return results


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
        arrays, names = [], []
        for path in args.images[start : start + args.batch_size]:
            # Check every image before the batch goes through the networks, so that one bad image (unreadable,
            # or a 2000x8 strip the detector cannot take) is skipped and reported, not fatal for the others.
            try:
                array = load_image(path)
                captioner.check_image(array.shape[1], array.shape[0], str(path))
            except ImageError as err:
                print(f"error: {path}: {err.reason}; skipped", file=sys.stderr)
                failures += 1
                continue
            arrays.append(array)
            names.append(str(path))
        if not arrays:
            continue
        try:
            results = _caption_batch(captioner, arrays, names, args.beam_size)
        except ButdError as err:  # a setting, not an image (e.g. the checkpoint does not fit the detector)
            print(f"error: {err}", file=sys.stderr)
            return 2
        for array, result in zip(arrays, results):
            if isinstance(result, ImageError):
                print(f"error: {result.source}: {result.reason}; skipped", file=sys.stderr)
                failures += 1
                continue
            if args.json:
                print(json.dumps(result.to_json()), flush=True)
            else:
                print(f"{result.name}\t{result.caption}", flush=True)
            if args.visualize is not None:
                out = args.visualize / f"{_unique(Path(result.name).stem, figure_names)}.png"
                save_attention_figure(array, result, out, top_k=args.top_k)
                print(f"wrote {out}", file=sys.stderr)
    if failures:
        print(f"{failures} of {len(args.images)} images skipped", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
