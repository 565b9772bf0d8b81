"""The XE loss with static shapes: the objective of the sync-free step runners (``train.step_runner``).

The eager objective (:class:`~butd.train.xe.XeObjective`) trims the batch to its longest caption and, on the packed
path, shrinks the batch as captions end: both read lengths on the host, so every batch has its own shapes and the
host waits for the GPU before it can launch the next kernel. Here every caption row runs ``max_length + 1`` steps
(the labels' full width: the most words a caption can have, plus ``<eos>``), whatever the batch holds; padding
positions are computed and then ignored by the loss. Shapes depend only on the batch size, the number of regions
and the label width, so the step can be recorded once as a CUDA graph and replayed.

The loss is the eager one: mean token cross-entropy over the real target tokens (``<eos>`` included), label
smoothing, and the model's own regulariser on the attention of the real steps. With dropout off it equals the
eager loss and gradients (tests/test_graph_step.py): a padding position feeds no loss term, and the recurrence
past a caption's end only feeds padding positions, so it contributes exact zeros to every gradient.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from butd.core.tokens import BOS, EOS, PAD
from butd.data.dataset import Batch
from butd.train.xe import StepOutput


def full_length_teacher_forcing(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Label rows [R, L] -> (inputs, targets), both [R, L + 1], with no host sync: ``<bos> w1 .. wL`` and
    ``w1 .. wn <eos> <pad> ..``. The same pairs as :func:`~butd.train.xe.teacher_forcing_pair`, padded to the full
    width instead of trimmed to the longest caption of the batch."""
    lengths = (labels != PAD).sum(dim=1, keepdim=True)
    bos = torch.full_like(labels[:, :1], BOS)
    inputs = torch.cat([bos, labels], dim=1)
    targets = torch.cat([labels, torch.zeros_like(bos)], dim=1).scatter(1, lengths, EOS)
    return inputs, targets


class StaticXeObjective(nn.Module):
    """The XE loss of a batch at fixed shapes; same interface and statistics as ``XeObjective``.

    Scheduled sampling is not supported (the step runners refuse it at set-up): it draws words step by step from
    the model's own predictions, which the eager objective does.
    """

    def __init__(self, model: nn.Module, *, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.model = model
        self.label_smoothing = label_smoothing

    def forward(self, batch: Batch, ss_prob: float = 0.0) -> StepOutput:
        if batch.labels is None:
            raise ValueError("the XE step needs a batch with labels")
        if ss_prob > 0:
            raise ValueError("the static XE objective has no scheduled sampling (train.step_runner=eager has)")
        b, seq_per_img, max_length = batch.labels.shape
        model = self.model
        regions = model.encode(batch.features, batch.region_mask, batch.boxes, batch.image_size).repeat(seq_per_img)
        inputs, targets = full_length_teacher_forcing(batch.labels.reshape(b * seq_per_img, max_length))
        words = model.embed(inputs)  # [R, T, E]: every step's words in one call
        state = model.init_state(regions)
        outputs, attention = [], []
        for t in range(inputs.shape[1]):
            output, state, weights = model.advance(words[:, t], state, regions)
            outputs.append(output)
            attention.append(weights)
        logits = model.word_logits(torch.stack(outputs, dim=1))  # one vocabulary projection for every position
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                               ignore_index=PAD, label_smoothing=self.label_smoothing)
        stats = {"xe": loss.detach()}
        weights = None if attention[0] is None else torch.stack(attention, dim=1)
        regularization = model.regularization_loss(weights, (targets != PAD).float(), regions.mask)
        if regularization.requires_grad:  # a property of the model, so the statistics' names never change
            stats["regularization"] = regularization.detach()
            loss = loss + regularization
        return StepOutput(loss=loss, stats=stats)
