"""One optimisation step, and the guards that stop a run before it writes a broken model.

``train_step`` takes one batch through the stage's objective, skips the update when the loss or a gradient is not
finite, and reports the step's values. ``DivergenceGuard`` watches the loss against its own running level: a loss
that explodes (``train.divergence_factor`` times the level) stops the run at once, before its weights can reach a
checkpoint. Any other failure inside a step becomes one ``TrainingStepError`` line that names the iteration.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from butd.data.dataset import Batch
from butd.errors import ButdError
from butd.train import distributed as dist


class NonFiniteLossError(ButdError, RuntimeError):
    """Training produced ``train.max_bad_steps`` non-finite losses or gradients in a row."""


class DivergenceError(ButdError, RuntimeError):
    """The loss exploded relative to its own running level: the weights are no longer worth keeping."""


class TrainingStepError(ButdError, RuntimeError):
    """A training step failed (out of memory, a numerical error in the optimizer, ...); names the iteration."""


@dataclass
class DivergenceGuard:
    """Flags a loss far above the run's own level: ``|loss| > factor * max(level, 1)``.

    ``level`` is a running mean of ``|loss|`` over the accepted steps. The floor of 1 keeps a run whose loss is
    near zero (SCST with a mean baseline) from being stopped by an ordinary fluctuation; an exploding run reaches
    thousands or millions within a few steps. ``factor`` 0 turns the guard off.
    """

    factor: float = 100.0
    decay: float = 0.9
    level: float | None = None

    def exploded(self, loss: float) -> bool:
        """True if ``loss`` (finite) is a divergence; otherwise it joins the running level."""
        magnitude = abs(loss)
        if self.factor > 0 and self.level is not None and magnitude > self.factor * max(self.level, 1.0):
            return True
        self.level = magnitude if self.level is None else self.decay * self.level + (1 - self.decay) * magnitude
        return False

    def describe(self, loss: float) -> str:
        """The line that reports ``loss`` as a divergence (the level is the one it was compared with)."""
        return f"the training loss exploded to {loss:.4g} ({self.factor:g}x its running level {self.level:.4g})"


def train_step(step_fn: nn.Module, model: nn.Module, optimizer: torch.optim.Optimizer, batch: Batch, *,
               ss_prob: float, grad_clip: float, bf16: bool, ctx: dist.DistContext,
               guard: DivergenceGuard | None = None) -> tuple[dict[str, float], bool]:
    """One optimisation step; returns the step's values (``loss`` and the objective's statistics) and whether
    the step was taken. A non-finite loss never reaches backward and non-finite gradients never reach the
    optimizer; the gradients are checked before clipping, since clipping would turn inf into a finite value.
    Raises ``DivergenceError`` (before any update) when ``guard`` says the loss exploded."""
    with torch.autocast(device_type=ctx.device.type, dtype=torch.bfloat16, enabled=bf16):
        output = step_fn(batch, ss_prob)
    stacked = torch.stack([output.loss.detach().float(), *[v.float() for v in output.stats.values()]])
    values = dict(zip(["loss", *output.stats], stacked.tolist()))  # one host sync for all of them
    good = dist.all_ranks_true(math.isfinite(values["loss"]), ctx)  # all ranks skip together (DDP all-reduce)
    if good and guard is not None and not dist.all_ranks_true(not guard.exploded(values["loss"]), ctx):
        optimizer.zero_grad(set_to_none=True)
        raise DivergenceError(guard.describe(values["loss"]))
    if good:
        output.loss.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        good = not grads or bool(torch.isfinite(torch.nn.utils.get_total_norm(grads)))  # same on every rank
        if good:
            if grad_clip > 0:
                torch.nn.utils.clip_grad_value_(model.parameters(), grad_clip)
            optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return values, good


def first_non_finite_parameter(model: nn.Module) -> str | None:
    """The name of the first parameter or buffer holding NaN/inf, or None when every value is finite."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return name
    return None
