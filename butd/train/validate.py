"""Validation during training: greedy captions of the val images scored with the exact CIDEr-D.

References and captions are tokenized with the data's own rule (``butd.data.captions.tokenize``: lowercase, ASCII
punctuation deleted, split on whitespace), not the PTB tokenizer of ``tools/eval.py``; the numbers are therefore
close to, but not identical with, the leaderboard evaluation. Document frequencies come from the val references
being scored, as pycocoevalcap computes them.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from butd.config import EvalConfig
from butd.data.captions import CaptionData, tokenize
from butd.data.store import FeatureStore
from butd.decoding import DecodeOptions
from butd.inference import decode_images
from butd.metrics import CiderD


def validate(model: nn.Module, store: FeatureStore, data: CaptionData, image_ids: Sequence[int],
             eval_cfg: EvalConfig, *, device: torch.device | str, bf16: bool,
             max_boxes: int = 0) -> dict[str, float]:
    """``{"CIDEr-D": score, "val_images": count}`` of beam-1 (greedy) captions; the model's mode is restored."""
    was_training = model.training
    model.eval()
    try:
        options = DecodeOptions.from_config(eval_cfg).with_overrides(beam_size=1)
        results = decode_images(model, store, [int(i) for i in image_ids], data.vocab, options=options,
                                batch_size=eval_cfg.batch_size, device=device,
                                precision="bf16" if bf16 else "fp32", max_boxes=max_boxes)
    finally:
        model.train(was_training)
    gts = {int(i): [" ".join(tokenize(r)) for r in data.references(int(i))] for i in image_ids}
    res = {i: [results[i].caption] for i in gts}
    score, _ = CiderD().compute_score(gts, res)
    return {"CIDEr-D": float(score), "val_images": len(gts)}
