"""Packed teacher forcing: the XE fast path.

The plain loop (``StepCaptioner.forward``) runs every caption row for the longest caption's number of steps and
projects every position, padding included, onto the vocabulary. Packed teacher forcing computes the same loss
with less work, in the layout of ``torch.nn.utils.rnn.PackedSequence``:

1. rows are sorted longest first, so at step ``t`` the rows still running are a prefix ``[0, active[t])`` and the
   LSTMs shrink with them (COCO captions average ~11 tokens against a batch maximum of ~17);
2. the words of every step are embedded in one call;
3. the vocabulary projection (the largest matrix) and the loss run once, on the real tokens only.

The recurrence is unchanged: the model's own ``advance`` runs each step, so with dropout off the outputs equal
the plain loop's (tests/test_packed.py checks loss and gradients for every registered model).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from butd.models.layers import StepCaptioner
from butd.models.regions import Regions


@dataclass
class PackedRows:
    """Where each real token of a padded [R, T] batch goes in the packed (step-major) order."""

    order: torch.Tensor  # [R] original row of each sorted row (longest first; stable, so ties keep their order)
    active: list[int]  # rows still running at each step: non-increasing, active[0] == R (all rows have a token)
    lengths: torch.Tensor  # [R] tokens per original row

    @classmethod
    def from_lengths(cls, lengths: torch.Tensor) -> PackedRows:
        """``lengths`` [R] >= 1: the number of real tokens of each row (one host sync, for the step counts)."""
        if lengths.dim() != 1 or lengths.numel() == 0:
            raise ValueError(f"PackedRows: lengths must be a non-empty [R] tensor, got {tuple(lengths.shape)}")
        sorted_lengths, order = torch.sort(lengths, descending=True, stable=True)
        counts = sorted_lengths.tolist()
        if counts[-1] < 1:
            raise ValueError("PackedRows: every row needs at least one token")
        ending = Counter(counts)  # rows whose last token is at step n - 1
        active, running = [], len(counts)
        for t in range(counts[0]):
            active.append(running)
            running -= ending[t + 1]
        return cls(order=order, active=active, lengths=lengths)

    @property
    def num_tokens(self) -> int:
        return sum(self.active)

    def pack(self, padded: torch.Tensor) -> torch.Tensor:
        """[R, T, ...] padded values -> [P, ...], step-major: step 0 of every row, then step 1 of the running rows..."""
        rows = padded.index_select(0, self.order)
        return torch.cat([rows[:n, t] for t, n in enumerate(self.active)], dim=0)

    def unpack(self, packed: torch.Tensor, steps: int) -> torch.Tensor:
        """The inverse of ``pack``: [P, ...] -> [R, steps, ...] in the original row order, zeros on padding."""
        rows = len(self.order)
        per_step = packed.split(self.active)
        padded = [F.pad(part, [0, 0] * (part.dim() - 1) + [0, rows - part.shape[0]]) for part in per_step]
        padded += [packed.new_zeros(rows, *packed.shape[1:])] * (steps - len(per_step))
        stacked = torch.stack(padded, dim=1)
        return stacked.index_select(0, torch.argsort(self.order))


def packed_teacher_forcing(
    model: StepCaptioner, regions: Regions, inputs: torch.Tensor, rows: PackedRows, *, rows_per_image: int = 1
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run the decoder over the real tokens only.

    ``inputs`` [R, T] (``inputs[:, 0] == BOS``) are the teacher-forced previous words; caption row ``r`` belongs to
    image ``r // rows_per_image`` of ``regions`` (the XE batch's ``seq_per_img`` captions per image are gathered
    straight into sorted order, without repeating the regions first). Returns the decoder outputs [P, H] in packed order (``rows.pack`` gives the matching targets; feed
    them to ``model.word_logits``) and the attention weights [R, T, N] in the original row order (zero after a
    row's end), or ``None`` for a model without attention.
    """
    if inputs.dim() != 2 or inputs.shape[0] != len(rows.order) or inputs.shape[1] < len(rows.active):
        raise ValueError(f"packed_teacher_forcing: inputs {tuple(inputs.shape)} do not fit {len(rows.order)} rows "
                         f"of up to {len(rows.active)} tokens")
    if regions.batch_size * rows_per_image != len(rows.order):
        raise ValueError(f"packed_teacher_forcing: {regions.batch_size} images x {rows_per_image} rows per image "
                         f"do not make {len(rows.order)} caption rows")
    regions = regions.index_select(torch.div(rows.order, rows_per_image, rounding_mode="floor"))
    words = model.embed(inputs.index_select(0, rows.order)[:, : len(rows.active)])  # [R, T, E], one call
    state = model.init_state(regions)
    outputs, attention = [], []
    for t, n in enumerate(rows.active):
        state = tuple(s[:n] for s in state)  # finished rows drop out: the batch shrinks as captions end
        output, state, weights = model.advance(words[:n, t], state, regions.head(n))
        outputs.append(output)
        attention.append(weights)
    if attention[0] is None:
        return torch.cat(outputs, dim=0), None
    steps = inputs.shape[1]
    return torch.cat(outputs, dim=0), rows.unpack(torch.cat(attention, dim=0), steps)
