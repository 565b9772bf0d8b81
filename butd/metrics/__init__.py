"""Caption metrics: exact and tensorised CIDEr-D, COCO leaderboard evaluation, result files."""
from __future__ import annotations

from butd.metrics.cider import CiderD
from butd.metrics.cider_tensor import TensorCiderD
from butd.metrics.coco_eval import METRIC_NAMES, EvalReport, score_captions
from butd.metrics.ngrams import DocumentFrequency
from butd.metrics.results import load_coco_references, load_results, write_results

__all__ = [
    "METRIC_NAMES",
    "CiderD",
    "DocumentFrequency",
    "EvalReport",
    "TensorCiderD",
    "load_coco_references",
    "load_results",
    "score_captions",
    "write_results",
]
