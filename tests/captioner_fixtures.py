"""Shared by the captioner, service and browser tests: the small random detector and a tiny saved checkpoint.

The decoder is an untrained, tiny Up-Down model with sharpened logits (so that beam search has clear winners and
batching cannot flip a near-tie) and a penalised ``<eos>`` (so captions have several words).
"""
from __future__ import annotations

from dataclasses import replace
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from butd.config import Config, config_to_dict
from butd.models import UpDownCaptioner
from butd.core.checkpoint import save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
COCO_IMAGES = ROOT.parent / "shared" / "data" / "coco_images"
WORDS = ["<pad>", "<bos>", "<eos>", "<unk>", "a", "sheep", "dog", "man", "in", "on", "the", "grass", "field",
         "next", "to", "tree", "with", "white", "black", "standing", "sitting", "laying", "of", "and", "two"]
MAX_LENGTH = 8


@lru_cache(maxsize=1)
def fast_detector():
    """The reduced random bottom-up detector with a smaller test-time resize and fewer proposals, on CPU.

    Tests that start the real tools use ``--detector random --small-detector`` (the same network at the full
    600-pixel scale); in-process tests use this cheaper configuration of it. Built once per test process.
    """
    from feature_extraction.config import DetectorConfig
    from feature_extraction.detector import BottomUpDetector
    from feature_extraction.weights import initialize_random

    config = replace(DetectorConfig.small(), test_scale=224, test_max_size=400, rpn_pre_nms_topk=1000,
                     rpn_post_nms_topk=100)
    detector = BottomUpDetector(config=config)
    initialize_random(detector, seed=0)
    return detector


def detector_feature_dim() -> int:
    """Size of the small detector's region features."""
    from feature_extraction.config import DetectorConfig

    return DetectorConfig.small().feature_dim


def write_tiny_checkpoint(path: Path, *, feature_dim: int | None = None, seed: int = 0) -> Path:
    """Save a tiny untrained Up-Down captioner in the documented checkpoint payload format."""
    config = Config()
    config.model.feature_dim = feature_dim if feature_dim is not None else detector_feature_dim()
    config.model.rnn_size = 32
    config.model.att_hid_size = 16
    config.model.input_encoding_size = 24
    config.model.dropout = 0.0
    config.eval.max_length = MAX_LENGTH
    torch.manual_seed(seed)
    model = UpDownCaptioner.from_config(config.model, len(WORDS))
    with torch.no_grad():
        model.logit.weight.mul_(20.0)
        model.logit.bias[2] = -4.0  # <eos>
        model.attention.score.weight.mul_(10.0)  # sharper attention: words look at different regions
    payload = {
        "format_version": 1,
        "stage": "xe",
        "model_name": "updown",
        "model": model.state_dict(),
        "config": config_to_dict(config),
        "vocab": WORDS,
        "epoch": 0,
        "iteration": 0,
    }
    save_checkpoint(path, payload)
    return path


def coco_image_paths() -> list[Path]:
    """The real COCO images of the shared data folder (empty when it is absent)."""
    return sorted(COCO_IMAGES.glob("*.jpg")) if COCO_IMAGES.is_dir() else []


def synthetic_image(width: int, height: int, seed: int) -> np.ndarray:
    """An RGB uint8 picture with a few coloured rectangles on a gradient (something for the detector to see)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    image = np.stack([x * 255 // max(1, width), y * 255 // max(1, height), (x + y) % 256], axis=-1).astype(np.uint8)
    for _ in range(4):
        x1, y1 = rng.integers(0, width // 2), rng.integers(0, height // 2)
        x2, y2 = x1 + rng.integers(width // 8, width // 2), y1 + rng.integers(height // 8, height // 2)
        image[y1:y2, x1:x2] = rng.integers(0, 256, size=3)
    return image
