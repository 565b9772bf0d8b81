"""Training: the loop shared by the cross-entropy and self-critical stages, checkpoints, rewards, DDP helpers.

``tools/train.py`` is the command line; ``train(cfg, TrainOptions(...))`` is the same thing from Python. Submodules
are imported lazily so that ``butd.train.checkpoint`` (used to load trained models) stays light.
"""
from __future__ import annotations

__all__ = ["LoadedModel", "NonFiniteLossError", "TrainOptions", "TrainResult", "load_model", "train"]


def __getattr__(name: str):
    if name in ("LoadedModel", "load_model"):
        from butd.train import checkpoint

        return getattr(checkpoint, name)
    if name in ("NonFiniteLossError", "TrainOptions", "TrainResult", "train"):
        from butd.train import loop

        return getattr(loop, name)
    raise AttributeError(f"module 'butd.train' has no attribute {name!r}")
