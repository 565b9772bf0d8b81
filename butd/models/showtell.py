"""Show and Tell: Vinyals et al. 2015, "Show and Tell: A Neural Image Caption Generator" (CVPR), the
"NIC" model of im2txt.

One LSTM and no attention. The image enters once, as an embedding (Linear + BatchNorm1d) of the
mean of its region features:
  * default: the embedding is the LSTM's first input, before <bos>, from a zero state (as in the
    paper: x_{-1} = CNN(I)); its output predicts nothing;
  * ``init_state_from_image``: the embedding sets the initial state instead (h0 = tanh(a), c0 = b
    for the two halves [a; b] of the embedding).
``init_state`` already does either, so decoders start every captioner the same way: ``init_state``,
then ``step`` from <bos>.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from butd.models.layers import RegionEmbedding, StepCaptioner, WordEmbedding
from butd.models.regions import Regions, masked_mean
from butd.models.registry import register_model

State = tuple[torch.Tensor, torch.Tensor]  # h, c


@register_model("showtell")
class ShowTellCaptioner(StepCaptioner):
    """Show and Tell: mean image feature -> LSTM -> words; ``step`` returns no attention (None).

    The image embedding is batch-normalised in ``init_state``: in training mode it uses the
    statistics of the batch's images, so train with more than one image per batch (a batch of one
    image has zero variance and loses the image).
    """

    name = "showtell"

    def __init__(
        self,
        *,
        vocab_size: int,
        feature_dim: int = 2048,
        rnn_size: int = 1000,
        input_encoding_size: int = 1000,
        dropout: float = 0.5,
        box_geometry: bool = False,
        init_state_from_image: bool = False,
    ) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.rnn_size = rnn_size
        self.init_state_from_image = init_state_from_image
        # No per-region embedding: only the mean feature is used, and the image embedding below is
        # linear, so embedding each region first would add nothing but a ReLU.
        self.region_embed = RegionEmbedding(
            feature_dim=feature_dim, size=0, embed=False, geometry=box_geometry, dropout=0.0
        )
        image_size = 2 * rnn_size if init_state_from_image else input_encoding_size
        self.image_embed = nn.Sequential(
            nn.Linear(self.region_embed.out_dim, image_size), nn.BatchNorm1d(image_size)
        )
        self.embed = WordEmbedding(vocab_size=vocab_size, size=input_encoding_size, dropout=dropout)
        self.lstm = nn.LSTMCell(input_encoding_size, rnn_size)
        self.dropout = nn.Dropout(dropout)
        self.logit = nn.Linear(rnn_size, vocab_size)

    @classmethod
    def from_config(cls, cfg: Any, vocab_size: int) -> ShowTellCaptioner:
        """Build from a ``butd.config.ModelConfig`` (``att_hid_size``, ``attention`` and
        ``embed_features`` do not apply: there is no attention)."""
        return cls(
            vocab_size=vocab_size,
            feature_dim=cfg.feature_dim,
            rnn_size=cfg.rnn_size,
            input_encoding_size=cfg.input_encoding_size,
            dropout=cfg.dropout,
            box_geometry=cfg.box_geometry,
            init_state_from_image=cfg.init_state_from_image,
        )

    def encode(
        self,
        features: torch.Tensor,
        region_mask: torch.Tensor,
        boxes: torch.Tensor | None = None,
        image_size: torch.Tensor | None = None,
    ) -> Regions:
        """Features [B, N, D] (+ geometry) zeroed on padding, their mean over real regions, and
        empty keys [B, N, 0] (nothing to attend with)."""
        mask = region_mask.bool()
        v = self.region_embed(features, mask, boxes, image_size)
        return Regions(features=v, mean=masked_mean(v, mask), keys=v.new_zeros(*v.shape[:2], 0), mask=mask)

    def init_state(self, regions: Regions) -> State:
        """The state after the image has entered the LSTM, each [B, rnn_size]."""
        image = self.image_embed(regions.mean)
        if self.init_state_from_image:
            h, c = image.chunk(2, dim=1)
            return torch.tanh(h), c  # h of an LSTM lies in (-1, 1)
        zeros = regions.mean.new_zeros(regions.batch_size, self.rnn_size)
        return self.lstm(image, (zeros, zeros))

    def advance(self, words: torch.Tensor, state: State, regions: Regions) -> tuple[torch.Tensor, State, None]:
        """One word: embedded previous words [B, E] -> (h [B, H], new state, None)."""
        h, c = self.lstm(words, state)
        return h, (h, c), None
