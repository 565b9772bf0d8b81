"""The Up-Down captioner: Anderson et al. 2018, "Bottom-Up and Top-Down Attention for Image
Captioning and Visual Question Answering" (CVPR), section 3.2.

Two stacked LSTMs per word:
  1. the top-down attention LSTM sees the previous language state, the mean image feature and the
     previous word, and its output is the query of an additive attention over the regions;
  2. the language LSTM sees the attended feature and the attention LSTM's output, and predicts
     the next word.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from butd.models.attention import MaskedAdditiveAttention
from butd.models.layers import RegionEmbedding, StepCaptioner, WordEmbedding
from butd.models.regions import Regions, masked_mean
from butd.models.registry import register_model

State = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # h_att, c_att, h_lang, c_lang

__all__ = ["UpDownCaptioner", "WordEmbedding"]  # WordEmbedding: re-exported for older imports


@register_model("updown")
class UpDownCaptioner(StepCaptioner):
    """Top-down attention LSTM + additive attention over bottom-up regions + language LSTM."""

    name = "updown"

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
    ) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.rnn_size = rnn_size
        # Regions are embedded to the LSTM width, as the public implementations do (E = rnn_size);
        # without the embedding the raw features (+ geometry) are attended directly.
        self.region_embed = RegionEmbedding(
            feature_dim=feature_dim, size=rnn_size, embed=embed_features, geometry=box_geometry, dropout=dropout
        )
        region_dim = self.region_embed.out_dim
        self.embed = WordEmbedding(vocab_size=vocab_size, size=input_encoding_size, dropout=dropout)
        self.attention = MaskedAdditiveAttention(
            feature_size=region_dim, query_size=rnn_size, att_hid_size=att_hid_size
        )
        # Eq. 2: x1_t = [h2_{t-1}; v_mean; W_e Pi_t]
        self.att_lstm = nn.LSTMCell(rnn_size + region_dim + input_encoding_size, rnn_size)
        # Eq. 6: x2_t = [v_hat_t; h1_t]
        self.lang_lstm = nn.LSTMCell(region_dim + rnn_size, rnn_size)
        self.dropout = nn.Dropout(dropout)
        self.logit = nn.Linear(rnn_size, vocab_size)  # Eq. 7, before the softmax

    @classmethod
    def from_config(cls, cfg: Any, vocab_size: int) -> UpDownCaptioner:
        """Build from a ``butd.config.ModelConfig`` (read by attribute, so any object with its fields works)."""
        return cls(
            vocab_size=vocab_size,
            feature_dim=cfg.feature_dim,
            rnn_size=cfg.rnn_size,
            att_hid_size=cfg.att_hid_size,
            input_encoding_size=cfg.input_encoding_size,
            embed_features=cfg.embed_features,
            dropout=cfg.dropout,
            box_geometry=cfg.box_geometry,
        )

    def encode(
        self,
        features: torch.Tensor,
        region_mask: torch.Tensor,
        boxes: torch.Tensor | None = None,
        image_size: torch.Tensor | None = None,
    ) -> Regions:
        """Embed the regions of a batch once: features [B, N, D], region_mask [B, N] bool,
        boxes [B, N, 4] and image_size [B, 2] (w, h) only needed with ``box_geometry``."""
        mask = region_mask.bool()
        v = self.region_embed(features, mask, boxes, image_size)
        return Regions(features=v, mean=masked_mean(v, mask), keys=self.attention.project_keys(v), mask=mask)

    def init_state(self, regions: Regions) -> State:
        """Zero LSTM states, each [B, rnn_size]."""
        zeros = regions.mean.new_zeros(regions.batch_size, self.rnn_size)
        return (zeros, zeros, zeros, zeros)

    def advance(
        self, words: torch.Tensor, state: State, regions: Regions
    ) -> tuple[torch.Tensor, State, torch.Tensor]:
        """One word's LSTMs: embedded previous words [B, E] -> (h_lang [B, H], new state, attention [B, N])."""
        h_att, c_att, h_lang, c_lang = state
        h_att, c_att = self.att_lstm(torch.cat([h_lang, regions.mean, words], dim=1), (h_att, c_att))
        attended, weights = self.attention(h_att, regions.keys, regions.features, regions.mask)
        h_lang, c_lang = self.lang_lstm(torch.cat([attended, h_att], dim=1), (h_lang, c_lang))
        return h_lang, (h_att, c_att, h_lang, c_lang), weights
