"""The cross-entropy (XE) step: teacher forcing over ``seq_per_img`` captions per image.

Each label row (words, zero padded) becomes ``inputs = <bos> w1 .. wn`` and ``targets = w1 .. wn <eos>``; the loss
is the mean token cross-entropy over real target tokens (``<eos>`` included, padding excluded), optionally with
label smoothing. Scheduled sampling (Bengio et al. 2015) feeds, with probability ``ss_prob`` per token, a word
sampled from the model's previous prediction instead of the ground-truth word.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from butd.core.tokens import BOS, EOS, PAD
from butd.data.dataset import Batch
from butd.models.packed import PackedRows, packed_teacher_forcing
from butd.models.regions import Regions



@dataclass
class StepOutput:
    """What a training step's objective returns: the loss to minimise and detached scalars to log."""

    loss: torch.Tensor  # scalar, differentiable
    stats: dict[str, torch.Tensor] = field(default_factory=dict)  # detached scalars (logged as train/<name>)


def teacher_forcing_pair(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Label rows [R, L] -> (inputs, targets), both [R, T] with T = longest caption + 1 (the columns that are
    padding in every row are dropped: they cost compute and contribute nothing)."""
    lengths = (labels != PAD).sum(dim=1)
    steps = int(lengths.max()) + 1
    words = labels[:, : steps - 1]
    bos = torch.full_like(words[:, :1], BOS)
    inputs = torch.cat([bos, words], dim=1)
    targets = torch.cat([words, torch.zeros_like(bos)], dim=1)
    targets = targets.scatter(1, lengths.unsqueeze(1), EOS)
    return inputs, targets


def scheduled_sampling_prob(epoch: int, *, start: int, increase_every: int, increase_prob: float,
                            max_prob: float) -> float:
    """Probability of feeding a sampled word in ``epoch`` (0 before ``start``; -1 disables it)."""
    if start < 0 or epoch < start:
        return 0.0
    return min(increase_prob * ((epoch - start) // max(increase_every, 1)), max_prob)


class XeObjective(nn.Module):
    """The XE loss of a batch as a module, so DistributedDataParallel wraps the whole computation."""

    def __init__(self, model: nn.Module, *, label_smoothing: float = 0.0, packed: bool = True) -> None:
        super().__init__()
        self.model = model
        self.label_smoothing = label_smoothing
        self.packed = packed  # the packed fast path (butd.models.packed); same loss as the padded loop

    def forward(self, batch: Batch, ss_prob: float = 0.0) -> StepOutput:
        if batch.labels is None:
            raise ValueError("the XE step needs a batch with labels")
        b, seq_per_img, max_length = batch.labels.shape
        regions = self.model.encode(batch.features, batch.region_mask, batch.boxes, batch.image_size)
        inputs, targets = teacher_forcing_pair(batch.labels.reshape(b * seq_per_img, max_length))
        token_mask = targets != PAD
        if self.packed and ss_prob == 0:
            rows = PackedRows.from_lengths(token_mask.sum(dim=1))
            outputs, attention = packed_teacher_forcing(self.model, regions, inputs, rows, rows_per_image=seq_per_img)
            logits, targets = self.model.word_logits(outputs), rows.pack(targets)  # real tokens only
        elif ss_prob > 0:
            logits, attention = self._scheduled_sampling(regions.repeat(seq_per_img), inputs, ss_prob)
        else:
            logits, attention = self.model(regions.repeat(seq_per_img), inputs)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                               ignore_index=PAD, label_smoothing=self.label_smoothing)
        stats = {"xe": loss.detach()}
        # The model's own regulariser: Show-Attend-Tell's doubly stochastic attention, zero for the others.
        regularization = self.model.regularization_loss(attention, token_mask.float(),
                                                        regions.mask.repeat_interleave(seq_per_img, dim=0))
        if regularization.requires_grad:
            stats["regularization"] = regularization.detach()
            loss = loss + regularization
        return StepOutput(loss=loss, stats=stats)

    def _scheduled_sampling(self, regions: Regions, inputs: torch.Tensor,
                            ss_prob: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        state = self.model.init_state(regions)
        logits, attention = [], []
        for t in range(inputs.shape[1]):
            tokens = inputs[:, t]
            if t > 0:
                use_sample = torch.rand(tokens.shape, device=tokens.device) < ss_prob
                probs = torch.softmax(logits[-1].detach().float(), dim=-1)
                sampled = torch.multinomial(probs, 1).squeeze(1)
                tokens = torch.where(use_sample, sampled, tokens)
            step_logits, state, weights = self.model.step(tokens, state, regions)
            logits.append(step_logits)
            attention.append(weights)
        # Show and Tell has no attention (None at every step).
        return torch.stack(logits, dim=1), (torch.stack(attention, dim=1) if attention[0] is not None else None)
