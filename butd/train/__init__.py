"""Training: the loop shared by the cross-entropy and self-critical stages, rewards, DDP helpers.

``tools/train.py`` is the command line; ``train(cfg, TrainOptions(...))`` is the same thing from Python. Nothing
outside this package imports it: trained models are loaded with ``butd.models.load_model`` (``butd.load``).
"""
from __future__ import annotations

__all__ = ["NonFiniteLossError", "TrainOptions", "TrainResult", "train"]


def __getattr__(name: str):
    # Lazy: `import butd.train.rewards` (the benchmarks) should not load the whole loop.
    if name in __all__:
        from butd.train import loop

        return getattr(loop, name)
    raise AttributeError(f"module 'butd.train' has no attribute {name!r}")
