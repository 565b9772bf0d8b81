"""The checkpoint file: one typed object, saved and loaded in one place.

A checkpoint is one ``torch.save`` file holding only tensors and plain Python values (a flat mapping, format
version 1, documented in docs/formats.md), so it loads with ``torch.load(weights_only=True)``: no arbitrary pickle
is executed when reading one. :class:`Checkpoint` is that mapping with types: the trained model (weights, config,
vocabulary) and, for a run in progress, where its training stood. ``butd.models.loading.load_model`` builds a
captioner from it; ``butd.train`` writes and resumes it.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from butd.core.files import write_atomic
from butd.core.tokens import Vocabulary
from butd.errors import DataError

FORMAT_VERSION = 1
REQUIRED_KEYS = ("format_version", "stage", "model_name", "model", "config", "vocab")


@dataclass
class Checkpoint:
    """What one checkpoint file holds. The first five fields describe the model; the rest, a run's progress."""

    stage: str  # "xe" | "scst": the training stage that wrote it
    model_name: str  # registered captioner name (model.name)
    model: dict[str, torch.Tensor]  # state_dict
    config: dict[str, dict[str, Any]]  # the run's whole configuration (butd.config.config_to_dict)
    vocab: list[str]  # the vocabulary's words, special tokens first
    epoch: int = 0  # epochs completed
    iteration: int = 0  # batches consumed in the stage
    batch_in_epoch: int = 0  # batches of the current epoch already consumed (mid-epoch checkpoints)
    best_score: float = -math.inf  # best validation CIDEr-D so far
    val_metrics: dict[str, float] = field(default_factory=dict)  # the last validation's metrics
    bad_steps: int = 0  # skipped (non-finite) steps so far
    optimizer: dict[str, Any] | None = None  # optimizer.state_dict()
    scheduler: dict[str, Any] | None = None  # where the learning-rate schedule stood
    scaler: dict[str, Any] | None = None  # loss scaler state (None: bf16 needs none)
    rng: dict[str, Any] | None = None  # rank 0's RNG states
    rng_per_rank: list[dict[str, Any]] | None = None  # every rank's RNG states
    world_size: int = 1  # processes that trained it
    epoch_sums: dict[str, float] = field(default_factory=dict)  # training statistics of the epoch so far

    def to_payload(self) -> dict[str, Any]:
        """The flat mapping written to disk (tensors are shared, not copied)."""
        return {"format_version": FORMAT_VERSION, **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}}

    @classmethod
    def from_payload(cls, payload: dict[str, Any], *, source: str | Path = "checkpoint") -> Checkpoint:
        """Inverse of :meth:`to_payload`; DataError naming ``source`` when a required key is missing."""
        missing = [key for key in REQUIRED_KEYS if key not in payload]
        if missing:
            raise DataError(f"{source}: checkpoint lacks {', '.join(missing)}")
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in payload.items() if key in known})

    def save(self, path: str | Path) -> None:
        """Write atomically (see :func:`save_checkpoint`)."""
        save_checkpoint(path, self.to_payload())

    @classmethod
    def load(cls, path: str | Path, map_location: str | torch.device = "cpu") -> Checkpoint:
        """Read and check a checkpoint file (see :func:`load_checkpoint`)."""
        return cls.from_payload(load_checkpoint(path, map_location=map_location), source=path)

    def check_vocabulary(self, vocab: Vocabulary, *, source: str | Path, data_dir: str | Path) -> None:
        """DataError unless the checkpoint was trained with exactly ``vocab`` (word ids would mean other words)."""
        words = list(self.vocab)
        if words == vocab.words:
            return
        first = next((i for i, (a, b) in enumerate(zip(words, vocab.words)) if a != b), min(len(words), len(vocab)))
        raise DataError(
            f"{source}: the checkpoint's vocabulary ({len(words)} words) differs from the one in {data_dir} "
            f"({len(vocab)} words), first at id {first}; word ids would decode to other words, so it cannot be "
            f"used with this data (preprocess the captions with the vocabulary the model was trained on)")


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
