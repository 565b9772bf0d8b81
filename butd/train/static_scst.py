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

from butd.data.dataset import Batch
from butd.decoding.fixed_length import greedy_to_length, sample_to_length
from butd.config.defaults import BaselineKind  # the choices, checked when the config is read
from butd.train.rewards import CaptionReward, greedy_baseline, mean_baseline
from butd.train.scst import policy_gradient_loss
from butd.train.xe import StepOutput


class StaticScstObjective(nn.Module):
    """The SCST loss of a batch at fixed shapes; same interface and statistics as ``ScstObjective``."""

    def __init__(self, model: nn.Module, reward: CaptionReward, *, num_samples: int = 5, baseline: BaselineKind = "mean",
                 max_length: int = 16, temperature: float = 1.0, suppress_unk: bool = True) -> None:
        super().__init__()
        if baseline == "mean" and num_samples < 2:
            raise ValueError("scst.baseline=mean needs scst.num_samples >= 2")
        if reward.bleu_weight > 0:
            raise ValueError("the static SCST objective rewards CIDEr-D only (BLEU is computed on the host)")
        self.model = model
        self.reward = reward
        self.num_samples = num_samples
        self.baseline = baseline
        self.max_length = max_length
        self.temperature = temperature
        self.suppress_unk = suppress_unk  # as ScstObjective: neither samples nor the greedy baseline say <unk>

    def forward(self, batch: Batch, ss_prob: float = 0.0) -> StepOutput:
        del ss_prob  # scheduled sampling is an XE-stage technique
        regions = self.model.encode(batch.features, batch.region_mask, batch.boxes, batch.image_size)
        drawn = sample_to_length(self.model, regions, num_samples=self.num_samples, max_length=self.max_length,
                                 temperature=self.temperature, suppress_unk=self.suppress_unk)
        image_ids = batch.image_ids.repeat_interleave(self.num_samples)
        rewards = self.reward(image_ids, drawn.tokens, validate=False).view(-1, self.num_samples)
        if self.baseline == "mean":
            baseline = mean_baseline(rewards)
        else:
            baseline = greedy_baseline(self._greedy_rewards(batch), self.num_samples)
        advantage = (rewards - baseline).reshape(-1)
        loss = policy_gradient_loss(drawn.token_logprobs, drawn.mask, advantage)
        stats = {
            "reward": rewards.mean(),
            "baseline": baseline.mean(),
            "frac_better": (rewards > baseline).float().mean(),
            "sample_length": drawn.mask.sum(dim=1).mean(),
        }
        return StepOutput(loss=loss, stats={k: v.detach() for k, v in stats.items()})

    @torch.no_grad()
    def _greedy_rewards(self, batch: Batch) -> torch.Tensor:
        was_training = self.model.training
        self.model.eval()  # the baseline is the test-time caption: no dropout
        try:
            regions = self.model.encode(batch.features, batch.region_mask, batch.boxes, batch.image_size)
            greedy = greedy_to_length(self.model, regions, max_length=self.max_length, suppress_unk=self.suppress_unk)
        finally:
            self.model.train(was_training)
        return self.reward(batch.image_ids, greedy, validate=False)
