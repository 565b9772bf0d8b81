"""Show, Attend and Tell with soft attention: Xu et al. 2015, "Show, Attend and Tell: Neural Image
Caption Generation with Visual Attention" (ICML), section 4.2, on bottom-up regions instead of a
conv grid.

One LSTM. At every word the previous hidden state attends over the regions (additive, as in the
paper, or scaled dot-product); a gate ``beta = sigmoid(W_b h_{t-1})`` scales the attended feature
(section 4.2.1), and the LSTM input is ``[W_e y_{t-1}; beta * z_t]``. h0 and c0 are predicted from the
mean region feature by two linear layers + tanh. The XE loss adds the doubly stochastic
regulariser ``lambda * sum_i (1 - sum_t alpha_ti)^2`` (eq. 14), which pushes the model to look at
every region at some point of the caption.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from butd.models.attention import build_attention
from butd.models.layers import RegionEmbedding, StepCaptioner, WordEmbedding
from butd.models.regions import Regions, masked_mean
from butd.models.registry import register_model

State = tuple[torch.Tensor, torch.Tensor]  # h, c


def doubly_stochastic_penalty(
    attention: torch.Tensor, token_mask: torch.Tensor, region_mask: torch.Tensor
) -> torch.Tensor:
    """``sum_i (1 - sum_t alpha_ti)^2`` per caption, averaged over the batch (a scalar, float32).

    attention [B, T, N]; token_mask [B, T] (1.0 on the caption's real steps, 0.0 on padding steps,
    which do not count in ``sum_t``); region_mask [B, N] bool (padded regions are not in ``sum_i``).
    """
    if attention.dim() != 3 or tuple(token_mask.shape) != tuple(attention.shape[:2]) or (
        tuple(region_mask.shape) != (attention.shape[0], attention.shape[2])
    ):
        raise ValueError(
            f"doubly_stochastic_penalty: attention {tuple(attention.shape)} needs token_mask [B, T] and "
            f"region_mask [B, N]; got {tuple(token_mask.shape)} and {tuple(region_mask.shape)}"
        )
    per_region = (attention.float() * token_mask.float().unsqueeze(-1)).sum(dim=1)  # [B, N]
    return ((1.0 - per_region) ** 2 * region_mask.float()).sum(dim=1).mean()


@register_model("showattendtell")
class ShowAttendTellCaptioner(StepCaptioner):
    """Soft-attention LSTM captioner with the gated context and the doubly stochastic regulariser."""

    name = "showattendtell"

    def __init__(
        self,
        *,
        vocab_size: int,
        feature_dim: int = 2048,
        rnn_size: int = 1000,
        att_hid_size: int = 512,
        input_encoding_size: int = 1000,
        embed_features: bool = True,
        dropout: float = 0.5,
        box_geometry: bool = False,
        attention: str = "additive",
        doubly_stochastic_weight: float = 1.0,
    ) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.rnn_size = rnn_size
        self.doubly_stochastic_weight = doubly_stochastic_weight
        self.region_embed = RegionEmbedding(
            feature_dim=feature_dim, size=rnn_size, embed=embed_features, geometry=box_geometry, dropout=dropout
        )
        region_dim = self.region_embed.out_dim
        self.attention = build_attention(
            attention, feature_size=region_dim, query_size=rnn_size, att_hid_size=att_hid_size
        )
        self.init_h = nn.Linear(region_dim, rnn_size)  # f_init,h of the paper
        self.init_c = nn.Linear(region_dim, rnn_size)  # f_init,c
        self.gate = nn.Linear(rnn_size, region_dim)  # W_b: beta_t = sigmoid(W_b h_{t-1})
        self.embed = WordEmbedding(vocab_size=vocab_size, size=input_encoding_size, dropout=dropout)
        self.lstm = nn.LSTMCell(input_encoding_size + region_dim, rnn_size)
        self.dropout = nn.Dropout(dropout)
        self.logit = nn.Linear(rnn_size, vocab_size)

    @classmethod
    def from_config(cls, cfg: Any, vocab_size: int) -> ShowAttendTellCaptioner:
        """Build from a ``butd.config.ModelConfig`` (read by attribute)."""
        return cls(
            vocab_size=vocab_size,
            feature_dim=cfg.feature_dim,
            rnn_size=cfg.rnn_size,
            att_hid_size=cfg.att_hid_size,
            input_encoding_size=cfg.input_encoding_size,
            embed_features=cfg.embed_features,
            dropout=cfg.dropout,
            box_geometry=cfg.box_geometry,
            attention=cfg.attention,
            doubly_stochastic_weight=cfg.doubly_stochastic_weight,
        )

    def encode(
        self,
        features: torch.Tensor,
        region_mask: torch.Tensor,
        boxes: torch.Tensor | None = None,
        image_size: torch.Tensor | None = None,
    ) -> Regions:
        """Embed the regions of a batch once (same as Up-Down) and project the attention keys."""
        mask = region_mask.bool()
        v = self.region_embed(features, mask, boxes, image_size)
        return Regions(features=v, mean=masked_mean(v, mask), keys=self.attention.project_keys(v), mask=mask)

    def init_state(self, regions: Regions) -> State:
        """h0 = tanh(W_h mean), c0 = tanh(W_c mean), each [B, rnn_size]."""
        return torch.tanh(self.init_h(regions.mean)), torch.tanh(self.init_c(regions.mean))

    def advance(
        self, words: torch.Tensor, state: State, regions: Regions
    ) -> tuple[torch.Tensor, State, torch.Tensor]:
        """One word: embedded previous words [B, E] -> (h [B, H], new state, attention weights [B, N])."""
        h, c = state
        context, weights = self.attention(h, regions.keys, regions.features, regions.mask)
        gated = torch.sigmoid(self.gate(h)) * context
        h, c = self.lstm(torch.cat([words, gated], dim=1), (h, c))
        return h, (h, c), weights

    def regularization_loss(
        self, attention: torch.Tensor | None, token_mask: torch.Tensor, region_mask: torch.Tensor
    ) -> torch.Tensor:
        """``model.doubly_stochastic_weight`` * ``doubly_stochastic_penalty`` (a scalar; zero when the weight is 0)."""
        if attention is None or self.doubly_stochastic_weight == 0.0:
            return token_mask.new_zeros((), dtype=torch.float32)
        return self.doubly_stochastic_weight * doubly_stochastic_penalty(attention, token_mask, region_mask)
