"""Pieces shared by the decoders: token ids, the model protocol and the next-token distribution."""
from __future__ import annotations

from typing import Any, Protocol

import torch

from butd.models.regions import Regions

# Token ids fixed by docs/architecture.md (same as butd.data.captions.Vocabulary).
PAD, BOS, EOS = 0, 1, 2


class StepModel(Protocol):
    """What a decoder needs from a captioner: every registered model provides it."""

    def init_state(self, regions: Regions) -> tuple[torch.Tensor, ...]: ...

    def step(
        self, tokens: torch.Tensor, state: Any, regions: Regions
    ) -> tuple[torch.Tensor, Any, torch.Tensor | None]: ...  # attention None: the model has none


def next_token_logprobs(logits: torch.Tensor) -> torch.Tensor:
    """Float32 log-probs of the next token, [rows, V].

    <pad> and <bos> are never valid outputs (<pad> would silently end a caption, <bos> only
    starts one), so they get probability 0 and the rest is renormalised; every decoder and the
    re-scoring of a decoded sequence use this same distribution.
    """
    logits = logits.float()
    banned = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
    banned[PAD] = True
    banned[BOS] = True
    return torch.log_softmax(logits.masked_fill(banned, float("-inf")), dim=-1)


def forbid_early_eos(logprobs: torch.Tensor, step: int, min_length: int) -> torch.Tensor:
    """``logprobs`` with <eos> impossible while fewer than ``min_length`` words were emitted.

    The other tokens keep the model's log-probs (no renormalisation), so reported scores stay the
    model's own and a decoded sequence re-scores to the same value under teacher forcing.
    """
    if step >= min_length:
        return logprobs
    return logprobs.index_fill(-1, torch.tensor([EOS], device=logprobs.device), float("-inf"))


def reorder_state(state: tuple[torch.Tensor, ...], index: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Rows ``index`` of every state tensor (batch is on dim 0 by contract)."""
    return tuple(s.index_select(0, index) for s in state)
