"""Sampling and greedy decoding to the full length, with no host synchronisation: the decoders of the sync-free
SCST step (``train.step_runner``).

``sample`` and ``greedy_decode`` stop once every row has ended (a host read every few steps) and trim the trailing
all-``<pad>`` columns (one more read). These run all ``max_length`` steps instead, a row that has ended emitting
``<pad>`` at no cost, so their shapes depend on the batch only and a CUDA graph can record them. The draws are the
same: from the same random state, ``sample_to_length`` gives ``sample``'s tokens, log-probs and mask, padded to
``max_length`` columns (``<pad>``, 0, 0), and ``greedy_to_length`` gives ``greedy_decode``'s tokens padded with
``<pad>`` (tests/test_static_scst.py).
"""
from __future__ import annotations

import torch

from butd.core.tokens import BOS, EOS, PAD
from butd.decoding.common import StepModel, forbid, forbidden_tokens, next_token_logprobs
from butd.decoding.result import SampleOutput
from butd.decoding.sample import filter_logprobs
from butd.models.regions import Regions


def sample_to_length(model: StepModel, regions: Regions, *, num_samples: int, max_length: int = 16,
                     temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                     suppress_unk: bool = False) -> SampleOutput:
    """``num_samples`` captions per image (sample ``j`` of image ``i`` is row ``i * n + j``), always ``max_length``
    columns; see :func:`butd.decoding.sample` for the distribution, the outputs and ``suppress_unk``. Draws from the global RNG (a
    CUDA graph replays the default generator; a private generator it could not)."""
    if num_samples < 1 or max_length < 1:
        raise ValueError(f"sample_to_length: num_samples ({num_samples}) and max_length ({max_length}) must be >= 1")
    if temperature <= 0.0 or not 0.0 < top_p <= 1.0 or top_k < 0:
        raise ValueError(f"sample_to_length: need temperature > 0, 0 < top_p <= 1, top_k >= 0; got {temperature}, "
                         f"{top_p}, {top_k}")
    regions = regions.repeat(num_samples)
    device = regions.mean.device
    state = model.init_state(regions)
    prev = torch.full((regions.batch_size,), BOS, dtype=torch.long, device=device)
    finished = torch.zeros(regions.batch_size, dtype=torch.bool, device=device)
    tokens, logprobs, masks = [], [], []
    for _ in range(max_length):
        logits, state, _ = model.step(prev, state, regions)
        banned = forbidden_tokens(logits.shape[-1], prev=prev, suppress_unk=suppress_unk)
        dist = filter_logprobs(next_token_logprobs(forbid(logits, banned)), temperature=temperature, top_k=top_k,
                               top_p=top_p)
        uniform = torch.rand(dist.shape, device=device).clamp_min(1e-20)
        token = (dist.detach() - torch.log(-torch.log(uniform))).argmax(dim=-1)  # Gumbel-max: a draw from dist
        token = token.masked_fill(finished, PAD)
        tokens.append(token)
        logprobs.append(dist.gather(1, token.unsqueeze(1)).squeeze(1).masked_fill(finished, 0.0))
        masks.append((~finished).float())
        finished = finished | (token == EOS)
        prev = token
    return SampleOutput(tokens=torch.stack(tokens, dim=1), token_logprobs=torch.stack(logprobs, dim=1),
                        mask=torch.stack(masks, dim=1))


@torch.no_grad()
def greedy_to_length(model: StepModel, regions: Regions, *, max_length: int = 16, min_length: int = 1,
                     suppress_unk: bool = False) -> torch.Tensor:
    """Greedy tokens [B, max_length] (words, ``<eos>``, then ``<pad>``), ``<eos>`` not allowed before ``min_length``
    words; without gradients (put the model in eval mode first unless dropout is wanted)."""
    if max_length < 1:
        raise ValueError(f"greedy_to_length: max_length must be >= 1, got {max_length}")
    device = regions.mean.device
    state = model.init_state(regions)
    prev = torch.full((regions.batch_size,), BOS, dtype=torch.long, device=device)
    finished = torch.zeros(regions.batch_size, dtype=torch.bool, device=device)
    tokens = []
    for t in range(max_length):
        logits, state, _ = model.step(prev, state, regions)
        logprobs = forbid(next_token_logprobs(logits), forbidden_tokens(logits.shape[-1], prev=prev,
                                                                        suppress_unk=suppress_unk))
        if t < min_length:  # a mask made on the device: no host-to-device copy, which a graph could not record
            logprobs = logprobs.masked_fill(torch.arange(logprobs.shape[-1], device=device) == EOS, float("-inf"))
        best = logprobs.argmax(dim=-1).masked_fill(finished, PAD)
        tokens.append(best)
        finished = finished | (best == EOS)
        prev = best
    return torch.stack(tokens, dim=1)
