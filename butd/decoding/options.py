"""How captions are decoded: one typed object that travels from the config to the decoder.

``DecodeOptions.from_config(cfg.eval)`` is built once (validation, ``tools/eval.py``, the ``Captioner``); callers
that change one setting use :meth:`DecodeOptions.with_overrides`. :func:`decode` runs greedy decoding for beam 1
and beam search otherwise, so no caller repeats that choice or the list of settings.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from butd.config import EvalConfig
from butd.decoding.beam import beam_search
from butd.decoding.common import StepModel
from butd.decoding.greedy import greedy_decode
from butd.decoding.result import DecodeOutput
from butd.errors import ConfigError
from butd.models.regions import Regions

MAX_BEAM_SIZE = 100


@dataclass(frozen=True)
class DecodeOptions:
    """The decoding settings of one call; see ``EvalConfig`` in butd/config/defaults.py for each key."""

    beam_size: int = 3  # 1: greedy decoding
    max_length: int = 16  # words at most (the caption may end earlier with <eos>)
    min_length: int = 1  # no <eos> before this many words (1: never an empty caption)
    length_penalty: float = 0.0  # beam search ranks by logprob / length**length_penalty
    block_trigrams: bool = True  # a caption (each beam) never repeats a trigram
    suppress_unk: bool = True  # never emit <unk>
    decoding_constraint: bool = True  # never the same word twice in a row

    def __post_init__(self) -> None:
        if not 1 <= self.beam_size <= MAX_BEAM_SIZE:
            raise ConfigError(f"beam_size must be in 1..{MAX_BEAM_SIZE}, got {self.beam_size}")
        if self.max_length < 1 or not 0 <= self.min_length <= self.max_length:
            raise ConfigError(f"need max_length >= 1 and 0 <= min_length <= max_length, got "
                              f"max_length={self.max_length}, min_length={self.min_length}")
        if self.length_penalty < 0:
            raise ConfigError(f"length_penalty must be >= 0, got {self.length_penalty}")

    @classmethod
    def from_config(cls, cfg: EvalConfig) -> DecodeOptions:
        """The options of a config's ``eval`` section (every field of this class is a key there)."""
        return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)})

    def with_overrides(self, **overrides: Any) -> DecodeOptions:
        """A copy with the given fields changed; a value of ``None`` keeps the current one (an unset CLI flag)."""
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def to_json(self) -> dict[str, Any]:
        """The settings as a JSON object (recorded in ``metrics.json``)."""
        return dataclasses.asdict(self)


def decode(model: StepModel, regions: Regions, options: DecodeOptions) -> DecodeOutput:
    """Caption every image of ``regions``: greedy decoding for beam 1, batched beam search otherwise."""
    rules = {"suppress_unk": options.suppress_unk, "decoding_constraint": options.decoding_constraint,
             "block_trigrams": options.block_trigrams}
    if options.beam_size == 1:
        return greedy_decode(model, regions, max_length=options.max_length, min_length=options.min_length, **rules)
    return beam_search(model, regions, beam_size=options.beam_size, max_length=options.max_length,
                       length_penalty=options.length_penalty, min_length=options.min_length, **rules)
