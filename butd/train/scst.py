"""The self-critical (SCST) step (Rennie et al. 2017): sample K captions per image, reward them with CIDEr-D, and
push up the log-probability of the samples that beat a baseline.

loss = -sum_i (r_i - b_i) * sum_t log p(w_it) / (number of sampled tokens), the sum over t running over the sampled
words and the ``<eos>`` that ends them (the end token is a decision the policy takes too). Dividing by the token count
rather than the caption count keeps the gradient scale independent of ``scst.num_samples`` and caption length.
Baselines: ``mean`` (the other K - 1 samples' mean reward, Luo 2020) or ``greedy`` (the reward of the greedy caption
decoded in eval mode without gradients). With ``suppress_unk`` (``scst.suppress_unk``, on by default) neither the
samples nor the greedy baseline contain ``<unk>``, as the evaluation's decoding does not.
"""
from __future__ import annotations

import torch
from torch import nn

from butd.data.dataset import Batch
from butd.decoding import SampleOutput, greedy_decode, sample
from butd.config.defaults import BaselineKind  # the choices, checked when the config is read
from butd.train.rewards import CaptionReward, greedy_baseline, mean_baseline
from butd.models.regions import Regions
from butd.train.xe import StepOutput


def policy_gradient_loss(token_logprobs: torch.Tensor, mask: torch.Tensor, advantage: torch.Tensor) -> torch.Tensor:
    """token_logprobs, mask [R, T], advantage [R] (no gradient) -> scalar loss normalised by the token count."""
    caption_logprob = (token_logprobs.float() * mask).sum(dim=1)
    return -(advantage.detach() * caption_logprob).sum() / mask.sum().clamp_min(1.0)


class ScstObjective(nn.Module):
    """The SCST loss of a batch as a module, so DistributedDataParallel wraps sampling and loss together."""

    def __init__(self, model: nn.Module, reward: CaptionReward, *, num_samples: int = 5, baseline: BaselineKind = "mean",
                 max_length: int = 16, temperature: float = 1.0, suppress_unk: bool = True) -> None:
        super().__init__()
        if baseline == "mean" and num_samples < 2:
            raise ValueError("scst.baseline=mean needs scst.num_samples >= 2")
        self.model = model
        self.reward = reward
        self.num_samples = num_samples
        self.baseline = baseline
        self.max_length = max_length
        self.temperature = temperature
        self.suppress_unk = suppress_unk

    def forward(self, batch: Batch, ss_prob: float = 0.0) -> StepOutput:
        del ss_prob  # scheduled sampling is an XE-stage technique
        regions = self.model.encode(batch.features, batch.region_mask, batch.boxes, batch.image_size)
        drawn = self._draw(regions)
        image_ids = batch.image_ids.repeat_interleave(self.num_samples)
        rewards = self._score(image_ids, drawn.tokens).view(-1, self.num_samples)
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
            greedy = self._greedy_tokens(regions)
        finally:
            self.model.train(was_training)
        return self._score(batch.image_ids, greedy)

    # The decoders and the reward call; the static objective (butd/train/static_scst.py) swaps in fixed-length
    # decoders and a reward without its host-side input check.
    def _score(self, image_ids: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return self.reward(image_ids, tokens)

    def _draw(self, regions: Regions) -> SampleOutput:
        return sample(self.model, regions, num_samples=self.num_samples, max_length=self.max_length,
                      temperature=self.temperature, suppress_unk=self.suppress_unk)

    def _greedy_tokens(self, regions: Regions) -> torch.Tensor:
        return greedy_decode(self.model, regions, max_length=self.max_length, suppress_unk=self.suppress_unk).tokens
