"""The SCST loss with static shapes: the objective of the sync-free step runners for the ``scst`` stage.

The eager objective (:class:`~butd.train.scst.ScstObjective`) samples until every caption has ended and trims the
all-``<pad>`` columns, both host reads, and its reward checks its inputs on the host. Here every sample runs
``scst.max_length`` steps (``butd.decoding.fixed_length``: a caption that has ended emits ``<pad>``, masked out of
the loss), the CIDEr-D reward runs without its host check (the images are training images, the tokens come from the
model's vocabulary), and the baseline is computed on the device; the loss is the same policy gradient
(:func:`~butd.train.scst.policy_gradient_loss`). From the same random state it equals the eager loss, statistics
and gradients (tests/test_static_scst.py).
"""
from __future__ import annotations

import torch
from torch import nn

from butd.decoding import SampleOutput
from butd.decoding.fixed_length import greedy_to_length, sample_to_length
from butd.models.regions import Regions
from butd.train.rewards import CaptionReward
from butd.train.scst import ScstObjective


class StaticScstObjective(ScstObjective):
    """The SCST loss of a batch at fixed shapes; same interface, loss and statistics as ``ScstObjective``."""

    def __init__(self, model: nn.Module, reward: CaptionReward, **settings) -> None:
        if reward.bleu_weight > 0:
            raise ValueError("the static SCST objective rewards CIDEr-D only (BLEU is computed on the host)")
        super().__init__(model, reward, **settings)

    def _score(self, image_ids: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return self.reward(image_ids, tokens, validate=False)  # no host-side check of the tokens: no sync

    def _draw(self, regions: Regions) -> SampleOutput:
        return sample_to_length(self.model, regions, num_samples=self.num_samples, max_length=self.max_length,
                                temperature=self.temperature, suppress_unk=self.suppress_unk)

    def _greedy_tokens(self, regions: Regions) -> torch.Tensor:
        return greedy_to_length(self.model, regions, max_length=self.max_length, suppress_unk=self.suppress_unk)
