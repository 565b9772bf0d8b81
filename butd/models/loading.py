"""A trained captioner from a checkpoint file: the model its config describes, its weights, its vocabulary.

This is how inference (``butd.load``, ``tools/eval.py``, the ``Captioner``, the service) reads what training wrote;
it needs nothing of ``butd.train``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from butd.config import Config, config_from_dict
from butd.core.checkpoint import Checkpoint
from butd.core.tokens import Vocabulary
from butd.models.registry import build_model, load_state_checked  # the package registers every captioner


@dataclass
class LoadedModel:
    """A trained captioner ready for decoding."""

    model: nn.Module  # eval mode, on the device
    vocab: Vocabulary
    config: Config
    path: Path
    stage: str
    epoch: int


def load_model(path: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """Build the checkpoint's captioner from its own config and vocabulary, load the weights, eval mode."""
    path = Path(path)
    checkpoint = Checkpoint.load(path, map_location="cpu")
    config = config_from_dict(checkpoint.config, source=f"{path} (config)")
    vocab = Vocabulary(words=checkpoint.vocab)
    model = build_model(config.model, len(vocab))
    load_state_checked(model, checkpoint.model, source=path, checkpoint_model_name=checkpoint.model_name)
    model.to(device).eval()
    return LoadedModel(model=model, vocab=vocab, config=config, path=path, stage=str(checkpoint.stage),
                       epoch=int(checkpoint.epoch))
