"""Up-Down vs Show-Attend-Tell vs Show-and-Tell on the attention world (butd.data.attention_world).

Generates the world (1,200 images: 960 train, 120 val, 120 test; 8-30 regions of which 1-3 are coloured shapes),
trains each decoder with XE at the settings of tests/test_attention_world.py (LSTM 64, attention 32, embeddings 64,
no dropout, Adam 1e-2, batch 20, Show-Attend-Tell without the doubly stochastic term), then scores the best
checkpoint on the test split: exact CIDEr-D (data tokenization) with greedy decoding and with beam 3.

    python benchmarks/attention_world.py --output runs/attention_world [--epochs 6] [--seed 3]

Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from butd.config import load_config
from butd.core.threads import configure_threads
from butd.data.attention_world import AttentionWorldConfig, make_attention_world
from butd.data.captions import CaptionData, tokenize
from butd.data.store import FeatureStore
from butd.decoding import DecodeOptions
from butd.inference import decode_images
from butd.metrics import CiderD
from butd.models import load_model
from butd.train.loop import TrainOptions, train

MODELS = {"updown": (), "showattendtell": ("model.doubly_stochastic_weight=0",), "showtell": ()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    threads = configure_threads(args.threads)
    world = make_attention_world(args.output / "world", AttentionWorldConfig(num_images=1200))
    data = CaptionData.load(world.data_dir)
    test_ids = [int(i) for i in data.split_ids("test")]
    gts = {i: [" ".join(tokenize(r)) for r in data.references(i)] for i in test_ids}
    rows = {}
    for name, extra in MODELS.items():
        run = args.output / f"{name}-seed{args.seed}"
        cfg = load_config(None, [
            f"model.name={name}", "model.feature_dim=32", "model.rnn_size=64", "model.att_hid_size=32",
            "model.input_encoding_size=64", "model.dropout=0.0", "data.num_workers=0", "data.cache=memory",
            "train.batch_size=20", "train.seq_per_img=3", f"train.max_epochs={args.epochs}", "train.lr=1e-2",
            "train.lr_decay_every=0", "train.device=cpu", "train.tensorboard=false", "train.log_every=1000",
            f"train.seed={args.seed}", "eval.batch_size=200", *extra])
        start = time.perf_counter()
        if not (run / "best.pt").exists():
            train(cfg, TrainOptions(stage="xe", data_dir=world.data_dir, features=world.features, output=run))
        seconds = time.perf_counter() - start
        val = [round(json.loads(line)["CIDEr-D"], 3) for line in (run / "metrics.jsonl").read_text().splitlines()]
        loaded = load_model(run / "best.pt")
        row = {"val_cider_d_by_epoch": val, "train_s": round(seconds, 1),
               "parameters": sum(p.numel() for p in loaded.model.parameters())}
        with FeatureStore(world.features) as store:
            for beam in (1, 3):
                results = decode_images(loaded.model, store, test_ids, data.vocab,
                                        options=DecodeOptions(beam_size=beam), batch_size=200)
                score, _ = CiderD().compute_score(gts, {i: [results[i].caption] for i in test_ids})
                row[f"test_cider_d_beam{beam}"] = round(float(score), 3)
        rows[name] = row
    print(json.dumps({"benchmark": "attention_world", "epochs": args.epochs, "seed": args.seed, "threads": threads,
                      "test_images": len(test_ids), "models": rows}))


if __name__ == "__main__":
    main()
