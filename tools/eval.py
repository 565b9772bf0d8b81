"""Evaluate captions the way the COCO leaderboard does (BLEU-1..4, METEOR, ROUGE-L, CIDEr-D, SPICE).

Three modes (details and output formats: docs/evaluation.md):

    # 1. decode a split of DATA_DIR with a checkpoint and score it
    python tools/eval.py --checkpoint CKPT --data DATA_DIR --features FEATS.lmdb --split test --output OUT_DIR
    # 2. caption the images of a COCO image-info file for the evaluation server (no scoring)
    python tools/eval.py --checkpoint CKPT --image-info image_info_test2014.json --features FEATS.lmdb --output OUT_DIR
    # 3. score an existing COCO result file
    python tools/eval.py --results RESULTS.json --references captions_val2014.json --output OUT_DIR

Scores print as a table x100; OUT_DIR/metrics.json holds the raw (0-1) values. Errors in the inputs print one
message on stderr and exit with status 2.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from butd.core.threads import configure_threads
from butd.errors import ButdError
from butd.evaluate import (EvalSettings, Evaluation, caption_image_info, evaluate_results_file, evaluate_split,
                           format_leaderboard)
from butd.core.devices import PRECISIONS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    parser.add_argument("--output", required=True, type=Path, help="directory for metrics.json and caption files")
    model = parser.add_argument_group("decoding (modes 1 and 2)")
    model.add_argument("--checkpoint", type=Path, help="trained captioner (best.pt of a run)")
    model.add_argument("--features", type=Path, help="LMDB feature store holding the images' regions")
    model.add_argument("--data", type=Path, help="DATA_DIR written by tools/prepro_captions.py (mode 1)")
    model.add_argument("--split", default="test", help="split of DATA_DIR to evaluate: train | val | test")
    model.add_argument("--image-info", type=Path,
                       help="COCO file with an \"images\" list (image_info_test2014.json, captions_val2014.json)")
    model.add_argument("--beam-size", type=int, help="beam width, 1 = greedy (default: checkpoint's eval.beam_size)")
    model.add_argument("--max-length", type=int, help="maximum caption length (default: eval.max_length)")
    model.add_argument("--batch-size", type=int, help="images per decoding batch (default: eval.batch_size)")
    model.add_argument("--length-penalty", type=float, help="rank beams by logprob / length**A (default: 0)")
    model.add_argument("--block-trigrams", action=argparse.BooleanOptionalAction, default=None,
                       help="forbid a beam from repeating a trigram (default: eval.block_trigrams)")
    model.add_argument("--set", action="append", default=[], metavar="eval.KEY=VALUE",
                       help="any other decoding key of the config's eval section (repeatable)")
    model.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    model.add_argument("--precision", default="fp32", choices=PRECISIONS,
                       help="fp32 (default, reference numbers) or bf16 autocast on CUDA (auto: bf16 on CUDA)")
    model.add_argument("--threads", type=int, help="CPU threads for torch (default: $BUTD_THREADS, else the physical "
                                                   "cores)")
    model.add_argument("--alg", help="algorithm name in the result file name (default: <model>-<stage>)")
    scoring = parser.add_argument_group("scoring (modes 1 and 3)")
    scoring.add_argument("--results", type=Path, help="existing COCO result file to score (mode 3)")
    scoring.add_argument("--references", type=Path, help="COCO caption annotations (.json or .json.xz) for --results")
    scoring.add_argument("--spice-jars", type=Path,
                         help="directory with stanford-corenlp-3.6.0.jar and -models.jar (or $BUTD_SPICE_JARS); "
                              "without them SPICE is reported as unavailable")
    return parser


def check_mode(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """Which mode the arguments ask for; a usage error (exit 2) when they mix or miss arguments."""
    def refuse_extra(mode: str, names: list[str]) -> None:
        given = [f"--{n.replace('_', '-')}" for n in names if getattr(args, n) is not None]
        if given:
            parser.error(f"{mode} does not use {', '.join(given)}")

    def require(mode: str, names: list[str]) -> None:
        missing = [f"--{n.replace('_', '-')}" for n in names if getattr(args, n) is None]
        if missing:
            parser.error(f"{mode} needs {', '.join(missing)}")

    if args.results is not None:
        require("--results", ["references"])
        refuse_extra("--results", ["checkpoint", "features", "data", "image_info", "beam_size", "max_length",
                                   "batch_size", "length_penalty", "block_trigrams", "alg"])
        return "results"
    if args.references is not None:
        parser.error("--references is only used with --results")
    if args.image_info is not None:
        require("--image-info", ["checkpoint", "features"])
        refuse_extra("--image-info", ["data", "spice_jars"])
        return "image-info"
    require("split evaluation", ["checkpoint", "data", "features"])
    return "split"


def eval_overrides(args: argparse.Namespace) -> tuple[str, ...]:
    """The decoding flags given on the command line as ``eval.KEY=VALUE`` overrides of the checkpoint's config."""
    flags = {"beam_size": args.beam_size, "max_length": args.max_length, "batch_size": args.batch_size,
             "length_penalty": args.length_penalty, "block_trigrams": args.block_trigrams}
    return tuple(f"eval.{key}={str(value).lower() if isinstance(value, bool) else value}"
                 for key, value in flags.items() if value is not None) + tuple(args.set)


def check_set(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``--set`` changes decoding only: a key outside the eval section is a usage error."""
    for item in args.set:
        if not item.startswith("eval."):
            parser.error(f"--set {item!r}: only eval.KEY=VALUE keys change decoding here")


def report(evaluation: Evaluation) -> None:
    """Print the scores table (if scored), the notes and the files written."""
    if evaluation.metrics:
        print(format_leaderboard({evaluation.label: evaluation.metrics}))
    print(f"{evaluation.num_images} images")
    for note in evaluation.notes:
        print(f"note: {note}")
    for path in evaluation.files:
        print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    mode = check_mode(parser, args)
    check_set(parser, args)
    settings = EvalSettings(overrides=eval_overrides(args), device=args.device, precision=args.precision)
    try:
        configure_threads(args.threads)
        if mode == "results":
            evaluation = evaluate_results_file(args.results, references=args.references, output_dir=args.output,
                                               spice_jars=args.spice_jars)
        elif mode == "image-info":
            evaluation = caption_image_info(args.checkpoint, image_info=args.image_info, features=args.features,
                                            output_dir=args.output, settings=settings, alg=args.alg)
        else:
            evaluation = evaluate_split(args.checkpoint, data_dir=args.data, features=args.features,
                                        split=args.split, output_dir=args.output, settings=settings,
                                        spice_jars=args.spice_jars, alg=args.alg)
    except ButdError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    report(evaluation)
    return 0


if __name__ == "__main__":
    sys.exit(main())
