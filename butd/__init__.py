"""butd: the Bottom-Up and Top-Down attention captioner (Anderson et al. 2018) with self-critical training.

The public API is small:

- ``butd.build_model(config, vocab_size)``: a captioner from a ``butd.config.ModelConfig`` (or a full ``Config``).
- ``butd.load(checkpoint, device="cpu")``: a trained captioner with its vocabulary and configuration.
- ``butd.Captioner``: pixels to captions with per-word attention over detected regions.
- ``butd.caption(images, detector=..., checkpoint=...)``: one call from image files to captions.

Submodules are imported lazily, so ``import butd`` stays cheap.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:  # pragma: no cover
    from butd.models.loading import LoadedModel


def build_model(config: Any, vocab_size: int):
    """Build the captioner named by ``config.name`` (``updown`` by default) for a vocabulary of ``vocab_size``.

    ``config`` is a ``butd.config.ModelConfig`` or a whole ``butd.config.Config`` (its ``model`` section is used).
    """
    from butd.models import build_model as _build

    return _build(getattr(config, "model", config), vocab_size)


def load(checkpoint: str, device: str = "cpu") -> "LoadedModel":
    """Load a checkpoint written by ``tools/train.py``: the model (eval mode, on ``device``), vocabulary and config."""
    from butd.models.loading import load_model

    return load_model(checkpoint, device=device)


def caption(images, *, detector: str, checkpoint: str, beam_size: int = 3, device: str = "cpu"):
    """Caption image files, bytes or PIL images with a detector's weights (or ``"random"``) and a trained checkpoint."""
    from butd.captioner import Captioner

    return Captioner.from_files(detector, checkpoint, device=device).caption(images, beam_size=beam_size)


def __getattr__(name: str):
    if name == "Captioner":
        from butd.captioner import Captioner

        return Captioner
    raise AttributeError(f"module 'butd' has no attribute {name!r}")
