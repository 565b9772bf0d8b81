"""Decoder outputs as tensors, and their conversion to per-image Python results."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from butd.core.tokens import words_of


@dataclass
class DecodeOutput:
    """Greedy or beam-search captions of a batch."""

    tokens: torch.Tensor  # [B, T] int64: words, <eos> (if ended within T), then <pad>
    logprob: torch.Tensor  # [B] float: sum of the log-probs of the emitted tokens, <eos> included
    attention: torch.Tensor | None  # [B, T, N]: one row per emitted token, zero after <eos>
    alternatives: torch.Tensor | None = None  # [B, K, T] beam search: every final beam, best first
    alternative_logprobs: torch.Tensor | None = None  # [B, K]


@dataclass
class SampleOutput:
    """Sampled captions; sample ``j`` of image ``i`` is row ``i * n + j``."""

    tokens: torch.Tensor  # [B * n, T] int64
    token_logprobs: torch.Tensor  # [B * n, T] differentiable log-probs of the sampled tokens (0 on padding)
    mask: torch.Tensor  # [B * n, T] float: 1.0 up to and including <eos>, then 0.0


class Decoder(Protocol):
    """Anything that turns word ids into text (``butd.data.captions.Vocabulary``)."""

    def decode(self, ids: Sequence[int]) -> str: ...


@dataclass
class CaptionResult:
    """The caption of one image, ready for JSON output or the attention display."""

    image_id: int
    caption: str
    tokens: list[int]  # word ids only (no <eos>/<pad>)
    logprob: float  # summed log-prob of the words and <eos>
    # [len(tokens), num_real_regions]: row w is the attention while emitting word w; all zeros for a
    # model without attention (Show and Tell), so the shape stays the same for every model.
    attention: np.ndarray
    boxes: np.ndarray  # [num_real_regions, 4] x1, y1, x2, y2 pixels, same order as the attention columns
    alternatives: list[tuple[str, float]] = field(default_factory=list)  # beam search: (caption, logprob), best first


def to_results(
    output: DecodeOutput,
    vocab: Decoder,
    *,
    image_ids: torch.Tensor | Sequence[int],
    boxes: torch.Tensor,
    region_mask: torch.Tensor,
) -> list[CaptionResult]:
    """Split a batch's ``DecodeOutput`` into one ``CaptionResult`` per image.

    Attention keeps one row per word (the <eos> step is dropped: it points at no word) and only
    the columns of real regions; ``boxes`` [B, N, 4] are cut to the same real regions. A decoder
    output without attention gives all-zero attention rows (nothing was attended).
    """
    ids = image_ids.tolist() if isinstance(image_ids, torch.Tensor) else [int(i) for i in image_ids]
    tokens = output.tokens.tolist()
    if not len(ids) == len(tokens) == boxes.shape[0] == region_mask.shape[0]:
        raise ValueError(
            f"to_results: batch sizes differ: {len(ids)} image ids, {len(tokens)} captions, "
            f"{boxes.shape[0]} box rows, {region_mask.shape[0]} mask rows"
        )
    logprobs = output.logprob.float().tolist()
    mask = region_mask.bool().cpu()
    boxes_np = boxes.float().cpu()
    attention = output.attention.float().cpu() if output.attention is not None else None
    alternatives = output.alternatives.tolist() if output.alternatives is not None else None
    alt_logprobs = output.alternative_logprobs.float().tolist() if output.alternative_logprobs is not None else None

    results = []
    for b, image_id in enumerate(ids):
        words = words_of(tokens[b])
        real = mask[b]
        if attention is not None:
            att = attention[b, : len(words)][:, real].numpy()
        else:
            att = np.zeros((len(words), int(real.sum())), dtype=np.float32)
        alts = []
        if alternatives is not None and alt_logprobs is not None:
            alts = [(vocab.decode(words_of(row)), lp) for row, lp in zip(alternatives[b], alt_logprobs[b])]
        results.append(
            CaptionResult(
                image_id=int(image_id),
                caption=vocab.decode(words),
                tokens=words,
                logprob=logprobs[b],
                attention=att,
                boxes=boxes_np[b][real].numpy(),
                alternatives=alts,
            )
        )
    return results
