"""Masked attention over image regions, shared by the attention captioners.

Both kinds score every region against a query (the decoder's hidden state), take a softmax over the
real regions only and return the weighted sum of the region features. The key projection does not
depend on the step, so ``project_keys`` is called once per image by ``encode`` and reused by every
step (``Regions.keys``).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from butd.errors import ConfigError


def masked_attend(
    scores: torch.Tensor, values: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax of ``scores`` [B, N] over the real regions (``mask`` [B, N] True), then the weighted
    sum of ``values`` [B, N, E] -> (context [B, E], weights [B, N]).

    The weights sum to 1 over the real regions and are exactly 0 on padding.
    """
    # The most negative finite value rather than -inf: exp() underflows to exactly 0 all the
    # same, and an image with no real region gives a uniform row (zeroed below) instead of NaN.
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    weights = torch.softmax(scores, dim=-1).masked_fill(~mask, 0.0)
    context = torch.bmm(weights.unsqueeze(1).to(values.dtype), values).squeeze(1)
    return context, weights


class MaskedAdditiveAttention(nn.Module):
    """Additive (Bahdanau) attention: ``a_i = w_a^T tanh(W_va v_i + W_ha h)``."""

    def __init__(self, *, feature_size: int, query_size: int, att_hid_size: int) -> None:
        super().__init__()
        self.key = nn.Linear(feature_size, att_hid_size)  # W_va
        self.query = nn.Linear(query_size, att_hid_size, bias=False)  # W_ha (the key bias suffices)
        self.score = nn.Linear(att_hid_size, 1, bias=False)  # w_a (a bias would cancel in the softmax)

    def project_keys(self, features: torch.Tensor) -> torch.Tensor:
        """``W_va v_i`` for every region: [B, N, E] -> [B, N, A]."""
        return self.key(features)

    def forward(
        self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Attend with ``query`` [B, Q] over ``keys`` [B, N, A] / ``values`` [B, N, E].

        Returns the attended feature [B, E] and the weights [B, N] (see ``masked_attend``).
        """
        hidden = torch.tanh(keys + self.query(query).unsqueeze(1))
        return masked_attend(self.score(hidden).squeeze(-1), values, mask)


class MaskedDotAttention(nn.Module):
    """Scaled dot-product attention: ``a_i = (W_k v_i) . (W_q h) / sqrt(A)``.

    Same interface as ``MaskedAdditiveAttention``; cheaper (no [B, N, A] tanh per step).
    """

    def __init__(self, *, feature_size: int, query_size: int, att_hid_size: int) -> None:
        super().__init__()
        self.key = nn.Linear(feature_size, att_hid_size, bias=False)  # a key bias only adds q.b: same for all i
        self.query = nn.Linear(query_size, att_hid_size)
        self.scale = 1.0 / math.sqrt(att_hid_size)

    def project_keys(self, features: torch.Tensor) -> torch.Tensor:
        """``W_k v_i`` for every region: [B, N, E] -> [B, N, A]."""
        return self.key(features)

    def forward(
        self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Attend with ``query`` [B, Q] over ``keys`` [B, N, A] / ``values`` [B, N, E] -> ([B, E], [B, N])."""
        scores = torch.bmm(keys, self.query(query).unsqueeze(-1)).squeeze(-1) * self.scale
        return masked_attend(scores, values, mask)


def build_attention(kind: str, *, feature_size: int, query_size: int, att_hid_size: int) -> nn.Module:
    """``"additive"`` or ``"dot"`` attention (``model.attention``); anything else is a ``ConfigError``."""
    kinds = {"additive": MaskedAdditiveAttention, "dot": MaskedDotAttention}
    if kind not in kinds:
        raise ConfigError(f"model.attention: unknown attention {kind!r}; choose additive or dot")
    return kinds[kind](feature_size=feature_size, query_size=query_size, att_hid_size=att_hid_size)
