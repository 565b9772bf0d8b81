"""Checkpoints: atomic writes, version-checked reads, RNG state capture, and loading a trained captioner.

A checkpoint is one ``torch.save`` file holding only tensors and plain Python values, so it loads with
``torch.load(weights_only=True)`` (no arbitrary pickle is executed when reading one).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from butd.config import Config, config_from_dict
from butd.core.files import write_atomic
from butd.data.captions import Vocabulary
from butd.errors import DataError

FORMAT_VERSION = 1
REQUIRED_KEYS = ("format_version", "stage", "model_name", "model", "config", "vocab")


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` to ``path`` atomically: a temporary file in the same directory, fsync, then rename."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            torch.save(payload, handle)

    write_atomic(path, write)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`; DataError naming the file if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises RuntimeError, UnpicklingError, EOFError, ... for a bad file
        raise DataError(f"{path}: not a readable butd checkpoint ({type(error).__name__}: {error})") from error
    if not isinstance(payload, dict) or "format_version" not in payload:
        raise DataError(f"{path}: not a butd checkpoint (no format_version)")
    if payload["format_version"] != FORMAT_VERSION:
        raise DataError(f"{path}: checkpoint format_version {payload['format_version']!r} is not supported "
                        f"(this butd reads version {FORMAT_VERSION})")
    missing = [key for key in REQUIRED_KEYS if key not in payload]
    if missing:
        raise DataError(f"{path}: checkpoint lacks {', '.join(missing)}")
    return payload


def check_vocabulary(payload: dict[str, Any], vocab: Vocabulary, *, source: str | Path, data_dir: str | Path) -> None:
    """DataError unless the checkpoint was trained with exactly ``vocab`` (word ids would mean other words)."""
    words = list(payload["vocab"])
    if words == vocab.words:
        return
    first = next((i for i, (a, b) in enumerate(zip(words, vocab.words)) if a != b), min(len(words), len(vocab)))
    raise DataError(
        f"{source}: the checkpoint's vocabulary ({len(words)} words) differs from the one in {data_dir} "
        f"({len(vocab)} words), first at id {first}; word ids would decode to other words, so it cannot be used "
        f"with this data (preprocess the captions with the vocabulary the model was trained on)")


def capture_rng_state() -> dict[str, Any]:
    """Python, numpy, torch and CUDA RNG states as checkpoint-safe values (no numpy objects)."""
    np_state = np.random.get_state(legacy=False)
    numpy = {"bit_generator": np_state["bit_generator"],
             "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)), "pos": int(np_state["state"]["pos"]),
             "has_gauss": int(np_state["has_gauss"]), "gauss": float(np_state["gauss"])}
    return {"python": random.getstate(), "numpy": numpy, "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    numpy = state["numpy"]
    np.random.set_state({"bit_generator": numpy["bit_generator"],
                         "state": {"key": numpy["key"].numpy().astype(np.uint32), "pos": numpy["pos"]},
                         "has_gauss": numpy["has_gauss"], "gauss": numpy["gauss"]})
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


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
    from butd.models import (  # importing it registers every captioner
        build_model,
        load_state_checked,
    )

    path = Path(path)
    payload = load_checkpoint(path, map_location="cpu")
    config = config_from_dict(payload["config"], source=f"{path} (config)")
    vocab = Vocabulary(words=payload["vocab"])
    model = build_model(config.model, len(vocab))
    load_state_checked(model, payload["model"], source=path, checkpoint_model_name=payload["model_name"])
    model.to(device).eval()
    return LoadedModel(model=model, vocab=vocab, config=config, path=path, stage=str(payload["stage"]),
                       epoch=int(payload.get("epoch", 0)))
