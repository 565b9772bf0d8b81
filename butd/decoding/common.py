"""Pieces shared by the decoders: token ids, the model protocol, the next-token distribution and the rules that
forbid tokens (``<unk>``, a word repeated at once, a repeated trigram)."""
from __future__ import annotations

from typing import Any, Protocol

import torch

from butd.core.tokens import BOS, EOS, PAD, UNK
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


def repeated_trigram_mask(history: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[..., t] token histories -> [..., V] bool, True for the tokens that would complete a trigram the row already
    contains (its last two tokens followed by that token earlier)."""
    lead, length = history.shape[:-1], history.shape[-1]
    banned = torch.zeros(*lead, vocab_size, dtype=torch.int32, device=history.device)
    if length < 3:
        return banned.bool()
    last = history[..., -2:]  # the bigram a new token would extend
    # Bigram j is (history[j], history[j+1]) followed by history[j+2], for j < t-2.
    match = (history[..., :-2] == last[..., :1]) & (history[..., 1:-1] == last[..., 1:])
    # scatter_add (not scatter) because several matches may name the same token.
    banned.scatter_add_(-1, history[..., 2:], match.to(torch.int32))
    return banned > 0


def forbidden_tokens(vocab_size: int, *, prev: torch.Tensor, history: torch.Tensor | None = None,
                     suppress_unk: bool = False, decoding_constraint: bool = False,
                     block_trigrams: bool = False) -> torch.Tensor | None:
    """[rows, V] bool, True for the tokens the decoding rules forbid as the next token of each row; None when no
    rule is on (nothing to mask). Every decoder applies this one mask.

    ``prev`` [rows] is each row's previous token, ``history`` [rows, t] its tokens so far (needed for
    ``block_trigrams`` only). ``suppress_unk``: never ``<unk>`` (the model's "some rare word" is no word a reader can
    use). ``decoding_constraint``: never the previous word again ("a a", "on on"). ``block_trigrams``: never a
    trigram the row already contains ("a bathroom with a bathroom with").
    """
    if not (suppress_unk or decoding_constraint or block_trigrams):
        return None
    banned = torch.zeros(prev.shape[0], vocab_size, dtype=torch.bool, device=prev.device)
    if suppress_unk:
        banned[:, UNK] = True
    if decoding_constraint:
        # <bos> (the first step's input) is never emitted anyway, and a row that has ended only emits <pad>.
        banned.scatter_(1, prev.unsqueeze(1), True)
    if block_trigrams and history is not None and history.shape[-1] >= 3:
        banned |= repeated_trigram_mask(history, vocab_size)
    return banned


def forbid(scores: torch.Tensor, banned: torch.Tensor | None) -> torch.Tensor:
    """``scores`` (logits or log-probs) with the ``banned`` tokens impossible (-inf). Greedy and beam search apply it
    to log-probs without renormalising, as ``forbid_early_eos`` does, so reported scores stay the model's own;
    sampling applies it to the logits, so the distribution sampled from is renormalised over the allowed tokens."""
    return scores if banned is None else scores.masked_fill(banned, float("-inf"))


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
