"""Sampling captions (for self-critical sequence training and diverse outputs)."""
from __future__ import annotations

import torch

from butd.core.tokens import BOS, EOS, PAD
from butd.decoding.common import StepModel, every_row_ended, forbid, forbidden_tokens, next_token_logprobs, steps_used
from butd.decoding.result import SampleOutput
from butd.models.regions import Regions


def filter_logprobs(logprobs: torch.Tensor, *, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """The distribution actually sampled from, as log-probs [rows, V]: tempered, restricted to the
    ``top_k`` most probable tokens (0: all) and to the smallest set whose mass reaches ``top_p``
    (nucleus; 1.0: all), then renormalised."""
    if temperature == 1.0 and top_k == 0 and top_p == 1.0:
        return logprobs  # the model's own distribution: renormalising it again would be one more pass over [rows, V]
    out = logprobs / temperature if temperature != 1.0 else logprobs
    if top_k > 0 and top_k < out.shape[-1]:
        kth = out.topk(top_k, dim=-1).values[:, -1:]
        out = out.masked_fill(out < kth, float("-inf"))
    if top_p < 1.0:
        sorted_lp, order = out.sort(dim=-1, descending=True)
        probs = torch.softmax(sorted_lp, dim=-1)
        # Drop a token when the tokens ranked before it already reach top_p (the first always stays).
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        out = out.masked_fill(drop, float("-inf"))
    return torch.log_softmax(out, dim=-1)


def sample(
    model: StepModel,
    regions: Regions,
    *,
    num_samples: int,
    max_length: int = 16,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    suppress_unk: bool = False,
    decoding_constraint: bool = False,
) -> SampleOutput:
    """Draw ``num_samples`` captions per image; sample ``j`` of image ``i`` is row ``i * n + j``.

    ``token_logprobs`` [B*n, T] are differentiable log-probs of the sampled tokens under the
    distribution they were drawn from (after temperature / top-k / top-p and renormalisation):
    that is the distribution whose score function the policy gradient needs. With the defaults
    (temperature 1, no filtering) it is the model's own distribution. ``mask`` is 1.0 for every
    token up to and including <eos>, 0.0 on the <pad> after it. ``T <= max_length``: decoding
    stops once every row has ended (checked every ``STOP_CHECK_EVERY`` steps: the only host syncs, with the
    final trim of the all-<pad> steps).
    Pass a seeded ``generator`` for reproducible samples. ``suppress_unk`` / ``decoding_constraint`` forbid
    ``<unk>`` / the previous word (``forbidden_tokens``) before the softmax: the distribution sampled from, and
    whose log-probs are returned, is the model's renormalised over the allowed tokens.
    """
    if num_samples < 1 or max_length < 1:
        raise ValueError(f"sample: num_samples ({num_samples}) and max_length ({max_length}) must be >= 1")
    if temperature <= 0.0 or not 0.0 < top_p <= 1.0 or top_k < 0:
        raise ValueError(
            f"sample: need temperature > 0, 0 < top_p <= 1, top_k >= 0; got {temperature}, {top_p}, {top_k}"
        )
    regions = regions.repeat(num_samples)
    rows = regions.batch_size
    device = regions.mean.device
    state = model.init_state(regions)
    prev = torch.full((rows,), BOS, dtype=torch.long, device=device)
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    tokens, logprobs, masks = [], [], []
    for t in range(max_length):
        logits, state, _ = model.step(prev, state, regions)
        banned = forbidden_tokens(logits.shape[-1], prev=prev, suppress_unk=suppress_unk,
                                  decoding_constraint=decoding_constraint)
        dist = filter_logprobs(next_token_logprobs(forbid(logits, banned)), temperature=temperature, top_k=top_k,
                               top_p=top_p)
        # Gumbel-max: argmax(log p + Gumbel noise) is a draw from p, without the host sync
        # torch.multinomial may need; banned tokens (-inf) can never win.
        uniform = torch.rand(dist.shape, device=device, generator=generator).clamp_min(1e-20)
        token = (dist.detach() - torch.log(-torch.log(uniform))).argmax(dim=-1)
        token = token.masked_fill(finished, PAD)
        token_logprob = dist.gather(1, token.unsqueeze(1)).squeeze(1)
        tokens.append(token)
        logprobs.append(token_logprob.masked_fill(finished, 0.0))
        masks.append((~finished).float())
        finished = finished | (token == EOS)
        prev = token
        if every_row_ended(finished, t):
            break
    tokens = torch.stack(tokens, dim=1)
    steps = steps_used(tokens)
    return SampleOutput(
        tokens=tokens[:, :steps],
        token_logprobs=torch.stack(logprobs, dim=1)[:, :steps],
        mask=torch.stack(masks, dim=1)[:, :steps],
    )
