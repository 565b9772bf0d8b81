"""Building blocks shared by the captioners: word and region embeddings, and the step-based base class.

Every captioner is a ``StepCaptioner``: it encodes the regions once (``encode``), starts a state
(``init_state``) and advances one word at a time (``step``). Teacher forcing (``forward``) is the same
loop of ``step`` for every model, so training, sampling and beam search see exactly the same
computation.
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from butd.errors import ConfigError, DataError
from butd.models.regions import Regions, box_geometry

BOX_GEOMETRY_DIM = 5  # x1/w, y1/h, x2/w, y2/h, area/(w*h)


class WordEmbedding(nn.Module):
    """Embedding + ReLU + dropout (W_e x_t), the word input shared by the captioners."""

    def __init__(self, *, vocab_size: int, size: int, dropout: float) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, size)
        self.dropout = nn.Dropout(dropout)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B] int64 -> [B, size]."""
        return self.dropout(torch.relu(self.embed(tokens)))


class RegionEmbedding(nn.Module):
    """Optional box geometry, then an optional Linear + ReLU + dropout, zeroed on padding."""

    def __init__(self, *, feature_dim: int, size: int, embed: bool, geometry: bool, dropout: float) -> None:
        super().__init__()
        self.feature_dim = feature_dim
        self.geometry = geometry
        in_dim = feature_dim + (BOX_GEOMETRY_DIM if geometry else 0)
        self.proj = (
            nn.Sequential(nn.Linear(in_dim, size), nn.ReLU(), nn.Dropout(dropout)) if embed else nn.Identity()
        )
        self.out_dim = size if embed else in_dim

    def forward(
        self,
        features: torch.Tensor,
        mask: torch.Tensor,
        boxes: torch.Tensor | None,
        image_size: torch.Tensor | None,
    ) -> torch.Tensor:
        """[B, N, D] (+ boxes [B, N, 4], image_size [B, 2]) -> [B, N, out_dim]."""
        if features.dim() != 3 or features.shape[-1] != self.feature_dim:
            raise DataError(
                f"region features have shape {tuple(features.shape)}; the model expects [B, N, {self.feature_dim}]"
            )
        if tuple(mask.shape) != tuple(features.shape[:2]):
            raise DataError(f"region_mask has shape {tuple(mask.shape)}, features {tuple(features.shape)}")
        x = features.float()  # the feature store may hold float16
        if self.geometry:
            if boxes is None or image_size is None:
                raise ConfigError("model.box_geometry is on: encode() needs boxes and image_size")
            x = torch.cat([x, box_geometry(boxes, image_size)], dim=-1)
        keep = mask.unsqueeze(-1)
        # Zero padding before and after the projection: garbage (even inf/NaN) in padded rows
        # must not reach the attention values or the mean, and relu(bias) would not be zero.
        x = self.proj(x.masked_fill(~keep, 0.0))
        return x.masked_fill(~keep, 0.0)


class StepCaptioner(nn.Module):
    """Base class of the registered captioners: the word step, teacher forcing and the default regulariser.

    Subclasses set ``name`` (the ``model.name`` they are registered under), build ``self.embed`` (a
    ``WordEmbedding``), ``self.dropout`` and ``self.logit`` (the vocabulary projection), and implement
    ``from_config``, ``encode``, ``init_state`` and ``advance``. A word step is always
    ``embed -> advance -> word_logits``; splitting it this way lets the packed XE path
    (``butd.models.packed``) embed a whole caption batch at once and project only the real tokens.
    """

    name: ClassVar[str] = ""
    embed: WordEmbedding
    dropout: nn.Dropout
    logit: nn.Linear

    @classmethod
    def from_config(cls, cfg: Any, vocab_size: int) -> StepCaptioner:
        """Build from a ``butd.config.ModelConfig`` (read by attribute)."""
        raise NotImplementedError(f"{cls.__qualname__} must implement from_config")

    def encode(
        self,
        features: torch.Tensor,
        region_mask: torch.Tensor,
        boxes: torch.Tensor | None = None,
        image_size: torch.Tensor | None = None,
    ) -> Regions:
        """Encode a batch of images once: features [B, N, D], region_mask [B, N] bool (+ boxes, image_size)."""
        raise NotImplementedError(f"{type(self).__qualname__} must implement encode")

    def init_state(self, regions: Regions) -> tuple[torch.Tensor, ...]:
        """The decoder state before <bos>; every tensor has batch on dim 0."""
        raise NotImplementedError(f"{type(self).__qualname__} must implement init_state")

    def advance(
        self, words: torch.Tensor, state: tuple[torch.Tensor, ...], regions: Regions
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...], torch.Tensor | None]:
        """The recurrent core of one step: embedded previous words [B, E] -> (output [B, H] fed to
        ``word_logits``, new state, attention weights [B, N] or ``None`` for a model without attention)."""
        raise NotImplementedError(f"{type(self).__qualname__} must implement advance")

    def compile_advance(self, *, backend: str = "inductor", fullgraph: bool = False) -> None:
        """Replace ``advance`` on this instance by its ``torch.compile`` version (``train.compile``).

        The per-word core is where every decoder and the XE loop spend their time: compiling it fuses the LSTM
        gates, the attention's tanh/softmax and the concatenations into few kernels. ``dynamic=True`` because the
        batch shrinks step by step in packed XE and beams vary in decoding. Each way of calling it (train or eval
        mode, with or without gradients, first step or later) is a graph of its own; past torch's recompile limit
        a new variant runs eager, with a torch warning, unless ``fullgraph`` (tests) turns that into an error.
        The state dict is unchanged.
        """
        self.advance = torch.compile(  # type: ignore[method-assign]
            self.advance, backend=backend, dynamic=True, fullgraph=fullgraph)

    def word_logits(self, output: torch.Tensor) -> torch.Tensor:
        """Dropout, then the vocabulary projection (before the softmax): [..., H] -> [..., V]."""
        return self.logit(self.dropout(output))

    def step(
        self, tokens: torch.Tensor, state: tuple[torch.Tensor, ...], regions: Regions
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...], torch.Tensor | None]:
        """One word: previous tokens [B] -> (logits [B, V], new state, attention [B, N] or None)."""
        output, state, weights = self.advance(self.embed(tokens), state, regions)
        return self.word_logits(output), state, weights

    def forward(self, regions: Regions, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Teacher forcing: inputs [B, T] (inputs[:, 0] == BOS) -> logits [B, T, V], attention [B, T, N]
        (``None`` for a model without attention). ``logits[:, t]`` predicts the token after ``inputs[:, t]``."""
        if inputs.dim() != 2 or inputs.shape[1] == 0:
            raise ValueError(f"forward: inputs must be [B, T] with T >= 1, got {tuple(inputs.shape)}")
        state = self.init_state(regions)
        logits, attention = [], []
        for t in range(inputs.shape[1]):
            step_logits, state, weights = self.step(inputs[:, t], state, regions)
            logits.append(step_logits)
            attention.append(weights)
        stacked = None if attention[0] is None else torch.stack(attention, dim=1)
        return torch.stack(logits, dim=1), stacked

    def regularization_loss(
        self, attention: torch.Tensor | None, token_mask: torch.Tensor, region_mask: torch.Tensor
    ) -> torch.Tensor:
        """The model's own term of the XE loss (scalar); zero unless a subclass defines one.

        attention [B, T, N] or None, token_mask [B, T] float (1 on real target tokens), region_mask
        [B, N] bool.
        """
        return token_mask.new_zeros((), dtype=torch.float32)
