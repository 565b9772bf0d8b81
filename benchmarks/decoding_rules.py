"""What the decoding rules do to a trained checkpoint: CIDEr-D and repetition of one split under each rule.

For every variant (beam width x rules: none, ``suppress_unk``, + ``decoding_constraint``, + ``block_trigrams``, all),
decodes the split and reports the exact CIDEr-D (``butd.metrics.CiderD``, references tokenized as validation does:
the numbers of ``metrics.jsonl``, not the PTB-tokenized leaderboard) and how many captions contain ``<unk>``, repeat
a word at once or repeat a bigram (``butd.metrics.repetition``). The table in docs/evaluation.md comes from it.

    python benchmarks/decoding_rules.py --checkpoint demo_output/runs/xe/best.pt --data demo_output/data \
        --features demo_output/proxy/features.lmdb --split val [--beam-sizes 1 3]

Prints one JSON line per checkpoint.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from butd.core.threads import configure_threads
from butd.data.captions import CaptionData, tokenize
from butd.data.store import FeatureStore
from butd.decoding import DecodeOptions
from butd.inference import decode_images
from butd.metrics import CiderD
from butd.metrics.repetition import repetition_report
from butd.models import load_model

# name -> (suppress_unk, decoding_constraint, block_trigrams)
VARIANTS = {
    "raw": (False, False, False),
    "suppress_unk": (True, False, False),
    "suppress_unk+constraint": (True, True, False),
    "suppress_unk+trigrams": (True, False, True),
    "suppress_unk+constraint+trigrams": (True, True, True),
}


def measure(checkpoint: Path, data: CaptionData, store: FeatureStore, split: str, beam_sizes: list[int]) -> dict:
    loaded = load_model(checkpoint, device="cpu")
    image_ids = [int(i) for i in data.split_ids(split)]
    gts = {i: [" ".join(tokenize(r)) for r in data.references(i)] for i in image_ids}
    base = DecodeOptions.from_config(loaded.config.eval)
    rows = []
    for beam_size in beam_sizes:
        for name, (unk, constraint, trigrams) in VARIANTS.items():
            options = base.with_overrides(beam_size=beam_size, suppress_unk=unk, decoding_constraint=constraint,
                                          block_trigrams=trigrams)
            start = time.perf_counter()
            results = decode_images(loaded.model, store, image_ids, data.vocab, options=options, batch_size=100,
                                    max_boxes=loaded.config.data.max_boxes)
            seconds = time.perf_counter() - start
            captions = {i: results[i].caption for i in image_ids}
            score, _ = CiderD().compute_score(gts, {i: [c] for i, c in captions.items()})
            report = repetition_report(captions.values())
            rows.append({"beam_size": beam_size, "rules": name, "CIDEr-D": round(float(score), 4),
                         **report.to_json(), "decode_s": round(seconds, 2)})
    return {"benchmark": "decoding_rules", "checkpoint": str(checkpoint), "stage": loaded.stage, "split": split,
            "images": len(image_ids), "variants": rows}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, nargs="+", required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--features", type=Path, required=True)
    parser.add_argument("--split", default="val")
    parser.add_argument("--beam-sizes", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--threads", type=int, help="CPU threads (default: $BUTD_THREADS, else the physical cores)")
    args = parser.parse_args(argv)
    configure_threads(args.threads)
    data = CaptionData.load(args.data)
    with FeatureStore(args.features) as store:
        for checkpoint in args.checkpoint:
            print(json.dumps(measure(checkpoint, data, store, args.split, args.beam_sizes)), flush=True)


if __name__ == "__main__":
    main()
