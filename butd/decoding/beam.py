"""Batched beam search: every image of the batch and all its beams advance together as [B*K] rows."""
from __future__ import annotations

import torch

from butd.core.tokens import BOS, EOS, PAD
from butd.decoding.common import (StepModel, every_row_ended, forbid, forbid_early_eos, forbidden_tokens,
                                  next_token_logprobs, reorder_state, repeated_trigram_mask, steps_used)

__all__ = ["beam_search", "repeated_trigram_mask"]
from butd.decoding.result import DecodeOutput
from butd.models.regions import Regions


@torch.no_grad()
def beam_search(
    model: StepModel,
    regions: Regions,
    *,
    beam_size: int = 3,
    max_length: int = 16,
    length_penalty: float = 0.0,
    block_trigrams: bool = False,
    min_length: int = 1,
    suppress_unk: bool = False,
    decoding_constraint: bool = False,
) -> DecodeOutput:
    """Beam search over every image of ``regions`` at once.

    Scores are summed log-probs (the distribution of ``next_token_logprobs``). A beam that has
    emitted <eos> stays in the beam and only extends with <pad> at cost 0; a beam reaching
    ``max_length`` without <eos> is kept as it is. Decoding stops when every beam has ended.

    ``length_penalty`` alpha ranks hypotheses by ``logprob / length**alpha`` (length = emitted
    tokens, <eos> included), both when choosing the K survivors at every step and when ordering
    the final beams; 0 (the default) is the plain sum. ``block_trigrams`` forbids a beam from
    producing a trigram it already contains, ``decoding_constraint`` the same word twice in a row,
    ``suppress_unk`` the ``<unk>`` token (``forbidden_tokens``). <eos> is not allowed before ``min_length`` words.

    Returns the best beam of each image as ``tokens`` [B, T] / ``logprob`` [B] (the plain sum) /
    ``attention`` [B, T, N] (None if the model has none), and all beams, best first, as
    ``alternatives`` [B, K, T] / ``alternative_logprobs`` [B, K]. Runs without gradients; put the
    model in eval mode first.
    """
    if beam_size < 1 or max_length < 1:
        raise ValueError(f"beam_search: beam_size ({beam_size}) and max_length ({max_length}) must be >= 1")
    batch, beams = regions.batch_size, beam_size
    device = regions.mean.device
    rows = regions.repeat(beams)  # row b*K + k is beam k of image b
    state = model.init_state(rows)
    prev = torch.full((batch * beams,), BOS, dtype=torch.long, device=device)
    # Only beam 0 is live at the start, otherwise the K beams would pick the same K words.
    scores = torch.zeros(batch, beams, device=device)
    scores[:, 1:] = float("-inf")
    lengths = torch.zeros(batch, beams, device=device)
    finished = torch.zeros(batch, beams, dtype=torch.bool, device=device)
    row_offset = (torch.arange(batch, device=device) * beams).unsqueeze(1)
    # Per step: the token chosen by each new beam, the beam it extends and its attention.
    # The sequences are assembled by following the backpointers once at the end.
    token_steps: list[torch.Tensor] = []
    parent_steps: list[torch.Tensor] = []
    attention_steps: list[torch.Tensor] = []
    history = torch.empty(batch, beams, 0, dtype=torch.long, device=device)  # only for trigram blocking
    pad_only = None

    for t in range(max_length):
        logits, state, weights = model.step(prev, state, rows)
        vocab = logits.shape[-1]
        logprobs = forbid_early_eos(next_token_logprobs(logits), t, min_length).view(batch, beams, vocab)
        if pad_only is None:
            emittable = vocab - 2 - int(suppress_unk)  # <pad> and <bos> are never emitted (nor <unk> if suppressed)
            if beams > emittable:
                raise ValueError(f"beam_search: beam_size {beams} exceeds the {emittable} emittable tokens")
            pad_only = torch.full((vocab,), float("-inf"), device=device)
            pad_only[PAD] = 0.0
        trigram_history = history.reshape(batch * beams, t) if block_trigrams and t >= 3 else None
        banned = forbidden_tokens(vocab, prev=prev, history=trigram_history, suppress_unk=suppress_unk,
                                  decoding_constraint=decoding_constraint, block_trigrams=block_trigrams)
        if banned is not None:
            logprobs = forbid(logprobs, banned.view(batch, beams, vocab))
        logprobs = torch.where(finished.unsqueeze(-1), pad_only, logprobs)
        candidates = scores.unsqueeze(-1) + logprobs  # [B, K, V]
        if length_penalty != 0.0:
            new_length = (lengths + (~finished).float()).clamp_min(1.0).unsqueeze(-1)
            ranking = candidates / new_length.pow(length_penalty)
        else:
            ranking = candidates
        _, best = ranking.view(batch, beams * vocab).topk(beams, dim=-1)  # sorted, best first
        parent = torch.div(best, vocab, rounding_mode="floor")  # [B, K]
        token = best - parent * vocab
        scores = candidates.view(batch, beams * vocab).gather(1, best)
        parent_finished = finished.gather(1, parent)
        lengths = lengths.gather(1, parent) + (~parent_finished).float()
        finished = parent_finished | (token == EOS)

        flat_parent = (parent + row_offset).view(-1)
        state = reorder_state(state, flat_parent)
        if weights is not None:  # a model without attention (Show and Tell) returns None
            weights = weights.float().index_select(0, flat_parent).view(batch, beams, -1)
            attention_steps.append(weights.masked_fill(parent_finished.unsqueeze(-1), 0.0))
        token_steps.append(token)
        parent_steps.append(parent)
        if block_trigrams:
            history = torch.cat([history.gather(1, parent.unsqueeze(-1).expand_as(history)), token.unsqueeze(-1)], 2)
        prev = token.view(-1)
        if every_row_ended(finished, t):
            break

    # Follow the backpointers from the final beams to the first step (attention: best beam only).
    pointer = torch.arange(beams, device=device).expand(batch, beams)
    tokens, attention = [], []
    for t in reversed(range(len(token_steps))):
        tokens.append(token_steps[t].gather(1, pointer))
        if attention_steps:
            weights = attention_steps[t]
            best_row = pointer[:, :1].unsqueeze(-1).expand(-1, 1, weights.shape[-1])
            attention.append(weights.gather(1, best_row))  # [B, 1, N]
        pointer = parent_steps[t].gather(1, pointer)
    # topk returned the survivors of the last step best first under the final ranking
    # (sum / final length**alpha), so beam 0 is the answer.
    alternatives = torch.stack(tokens[::-1], dim=2)  # [B, K, T]
    steps = steps_used(alternatives)
    alternatives = alternatives[..., :steps]
    return DecodeOutput(
        tokens=alternatives[:, 0],
        logprob=scores[:, 0],
        attention=torch.cat(attention[::-1], dim=1)[:, :steps] if attention else None,
        alternatives=alternatives,
        alternative_logprobs=scores,
    )
