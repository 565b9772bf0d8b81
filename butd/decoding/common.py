"""Pieces shared by the decoders: token ids, the model protocol and the next-token distribution."""
from __future__ import annotations

from typing import Any, Protocol

import torch

from butd.core.tokens import BOS, EOS, PAD
from butd.models.regions import Regions

# Token ids fixed by docs/architecture.md (same as butd.data.captions.Vocabulary).

# Decoders stop once every row has ended, but asking "has every row ended?" copies a flag to the host, which on a
# GPU stalls the queue of launched kernels. Asking every few steps keeps the GPU busy; the steps decoded after the
# last row ended only add <pad> columns, which ``steps_used`` trims, so the output is the same.
STOP_CHECK_EVERY = 4


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


def every_row_ended(finished: torch.Tensor, step: int) -> bool:
    """Whether decoding may stop after ``step`` (0-based): checked, with one host sync, every ``STOP_CHECK_EVERY``
    steps only."""
    return (step + 1) % STOP_CHECK_EVERY == 0 and bool(finished.all())


def steps_used(tokens: torch.Tensor) -> int:
    """Columns of ``tokens`` [..., T] up to the last one any row emitted a token in (<pad> is never emitted, so the
    rest are the trailing all-<pad> steps decoded after every row ended); at least 1."""
    emitted = (tokens != PAD).reshape(-1, tokens.shape[-1]).any(dim=0)
    last = torch.where(emitted, torch.arange(emitted.numel(), device=tokens.device), -1).max()
    return max(int(last) + 1, 1)


def reorder_state(state: tuple[torch.Tensor, ...], index: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Rows ``index`` of every state tensor (batch is on dim 0 by contract)."""
    return tuple(s.index_select(0, index) for s in state)
