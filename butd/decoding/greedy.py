"""Greedy decoding: the most probable token at every step."""
from __future__ import annotations

import torch

from butd.core.tokens import BOS, EOS, PAD
from butd.decoding.common import (StepModel, every_row_ended, forbid, forbid_early_eos, forbidden_tokens,
                                  next_token_logprobs, steps_used)
from butd.decoding.result import DecodeOutput
from butd.models.regions import Regions


@torch.no_grad()
def greedy_decode(
    model: StepModel, regions: Regions, *, max_length: int = 16, min_length: int = 1, suppress_unk: bool = False,
    decoding_constraint: bool = False, block_trigrams: bool = False,
) -> DecodeOutput:
    """Decode every image of ``regions`` greedily.

    Returns tokens [B, T] (words, <eos>, then <pad>), the summed log-prob of the emitted tokens
    (<eos> included) and attention [B, T, N] (zero after <eos>; None if the model has none).
    ``T <= max_length``: decoding stops as soon as every row has emitted <eos>. Runs without
    gradients; put the model in eval mode first unless dropout is wanted. <eos> is not allowed
    before ``min_length`` words (default 1: never an empty caption); log-probs stay the model's.
    ``suppress_unk``, ``decoding_constraint`` and ``block_trigrams`` forbid tokens as ``forbidden_tokens`` says.
    """
    if max_length < 1:
        raise ValueError(f"greedy_decode: max_length must be >= 1, got {max_length}")
    batch = regions.batch_size
    device = regions.mean.device
    state = model.init_state(regions)
    prev = torch.full((batch,), BOS, dtype=torch.long, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    logprob = torch.zeros(batch, dtype=torch.float32, device=device)
    tokens, attention = [], []
    for t in range(max_length):
        logits, state, weights = model.step(prev, state, regions)
        banned = forbidden_tokens(logits.shape[-1], prev=prev, history=torch.stack(tokens, 1) if block_trigrams and
                                  t >= 3 else None, suppress_unk=suppress_unk,
                                  decoding_constraint=decoding_constraint, block_trigrams=block_trigrams)
        logprobs = forbid(forbid_early_eos(next_token_logprobs(logits), t, min_length), banned)
        best_logprob, best = logprobs.max(dim=-1)
        # A row that has ended keeps emitting <pad> at no cost.
        best = best.masked_fill(finished, PAD)
        logprob = logprob + best_logprob.masked_fill(finished, 0.0)
        tokens.append(best)
        if weights is not None:  # a model without attention (Show and Tell) returns None
            attention.append(weights.float().masked_fill(finished.unsqueeze(1), 0.0))
        finished = finished | (best == EOS)
        prev = best
        if every_row_ended(finished, t):
            break
    tokens = torch.stack(tokens, dim=1)
    steps = steps_used(tokens)
    return DecodeOutput(
        tokens=tokens[:, :steps],
        logprob=logprob,
        attention=torch.stack(attention, dim=1)[:, :steps] if attention else None,
    )
