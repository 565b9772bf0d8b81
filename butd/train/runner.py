"""How the training loop takes its steps (``train.step_runner``): one interface, three runners.

- ``eager``: ``butd.train.step.train_step`` per batch, the reference. Each step's values are known when it returns
  (a host sync per step), so a bad step or an exploding loss is handled at that step.
- ``static``: the sync-free step (``butd.train.graph_step``) on the stage's fixed-shape objective
  (``butd.train.static_xe``, ``butd.train.static_scst``): the host queues steps without waiting and reads their values
  back every ``train.log_every`` steps, or earlier when the loop logs or writes a checkpoint.
- ``cuda_graph``: ``static`` with each full batch's step replayed as one CUDA graph (CUDA only).

Both deferred runners skip a bad step's update on the device and stop updating at an explosion, as the eager
runner does; what changes is when the host hears of it: within ``train.log_every`` steps, always before the next
log line, checkpoint or validation, so no checkpoint is written between the event and its error.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, get_args

import torch
from torch import nn

from butd.config import Config
from butd.config.defaults import StepRunnerKind
from butd.data.dataset import Batch
from butd.errors import ConfigError
from butd.train import distributed as dist
from butd.train.graph_step import CapturedStep, SyncFreeStep, adopt_optimizer
from butd.train.step import DivergenceGuard, train_step

RUNNERS: tuple[str, ...] = get_args(StepRunnerKind)  # the choices, checked when the config is read


@dataclass
class StepOutcome:
    """What the loop learns of one step."""

    iteration: int  # 1-based iteration of the step
    images: int
    values: dict[str, float]  # loss and the objective's statistics
    good: bool  # the update was made
    divergence: str | None = None  # the guard's line when the loss exploded at this step (the run must stop)


class StepRunner(Protocol):
    def step(self, batch: Batch, *, lr: float, ss_prob: float, iteration: int) -> list[StepOutcome]:
        """Take a step at rate ``lr``; returns the outcomes that became known (this step's or earlier ones)."""
        ...

    def flush(self) -> list[StepOutcome]:
        """The outcomes of every step taken and not yet returned."""
        ...


class EagerRunner:
    """``train_step`` per batch: each outcome is known at its step."""

    def __init__(self, *, step_fn: nn.Module, model: nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float,
                 bf16: bool, ctx: dist.DistContext, guard: DivergenceGuard) -> None:
        self.step_fn, self.model, self.optimizer = step_fn, model, optimizer
        self.grad_clip, self.bf16, self.ctx, self.guard = grad_clip, bf16, ctx, guard

    def step(self, batch: Batch, *, lr: float, ss_prob: float, iteration: int) -> list[StepOutcome]:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        values, good = train_step(self.step_fn, self.model, self.optimizer, batch, ss_prob=ss_prob,
                                  grad_clip=self.grad_clip, bf16=self.bf16, ctx=self.ctx, guard=self.guard)
        return [StepOutcome(iteration=iteration, images=len(batch), values=values, good=good)]

    def flush(self) -> list[StepOutcome]:
        return []


class DeferredRunner:
    """The sync-free step (captured or not); outcomes come back when its record table is read."""

    def __init__(self, *, step: SyncFreeStep, guard: DivergenceGuard, captured: CapturedStep | None = None) -> None:
        self.sync_free, self.guard, self.captured = step, guard, captured
        self.pending: list[tuple[int, int]] = []  # (iteration, images) of the steps not read back yet

    def step(self, batch: Batch, *, lr: float, ss_prob: float, iteration: int) -> list[StepOutcome]:
        del ss_prob  # no scheduled sampling at fixed shapes: refused for XE at set-up, ignored by SCST as in eager
        self.sync_free.set_learning_rate(lr)
        (self.captured or self.sync_free)(batch)
        self.pending.append((iteration, len(batch)))
        return self.flush() if len(self.pending) >= self.sync_free.capacity else []

    def flush(self) -> list[StepOutcome]:
        records = self.sync_free.read()
        pending, self.pending = self.pending, []
        outcomes = []
        for (iteration, images), record in zip(pending, records):
            if record.level is not None:
                self.guard.level = record.level  # the host guard follows the device's, for its messages
            divergence = self.guard.describe(record.values["loss"]) if record.exploded else None
            outcomes.append(StepOutcome(iteration=iteration, images=images, values=record.values, good=record.good,
                                        divergence=divergence))
            if divergence:  # the steps after it made no update and will never be looked at
                break
        return outcomes


def check_step_runner(cfg: Config, ctx: dist.DistContext, stage: str) -> None:
    """ConfigError (one line) when ``train.step_runner`` cannot run this stage here; nothing for ``eager``."""
    tc = cfg.train
    kind = tc.step_runner
    if kind == "eager":
        return
    if kind == "cuda_graph" and ctx.device.type != "cuda":
        raise ConfigError(f"train.step_runner=cuda_graph needs a CUDA device (this run uses {ctx.device.type}); "
                          f"use train.step_runner=static, the same step without the graph")
    if stage == "scst" and cfg.scst.bleu_weight > 0:
        raise ConfigError(f"train.step_runner={kind} rewards CIDEr-D on the device; scst.bleu_weight > 0 computes "
                          f"BLEU on the host: set scst.bleu_weight=0 or use train.step_runner=eager")
    if ctx.distributed:
        raise ConfigError(f"train.step_runner={kind} runs in one process; use train.step_runner=eager with torchrun")
    if stage == "xe" and tc.scheduled_sampling_start >= 0:
        raise ConfigError(f"train.step_runner={kind} has no scheduled sampling; set "
                          f"train.scheduled_sampling_start=-1 or use train.step_runner=eager")
    if kind == "cuda_graph" and tc.compile:
        raise ConfigError("train.compile and train.step_runner=cuda_graph do not go together (the graph already "
                          "removes the launch overhead); drop one of them")


def build_runner(cfg: Config, ctx: dist.DistContext, *, step_fn: nn.Module, model: nn.Module,
                 optimizer: torch.optim.Optimizer, bf16: bool, guard: DivergenceGuard) -> StepRunner:
    """The runner ``train.step_runner`` names (checked by :func:`check_step_runner`). ``step_fn`` is the stage's
    objective: the fixed-shape one for the deferred runners (``butd.train.setup`` builds the matching one)."""
    tc = cfg.train
    if tc.step_runner == "eager":
        return EagerRunner(step_fn=step_fn, model=model, optimizer=optimizer, grad_clip=tc.grad_clip, bf16=bf16,
                           ctx=ctx, guard=guard)
    return deferred_runner(tc.step_runner, objective=step_fn, model=model, optimizer=optimizer,
                           grad_clip=tc.grad_clip, bf16=bf16, guard=guard, device=ctx.device,
                           read_every=tc.log_every, batch_size=tc.batch_size)


def deferred_runner(kind: str, *, objective: nn.Module, model: nn.Module, optimizer: torch.optim.Optimizer,
                    grad_clip: float, bf16: bool, guard: DivergenceGuard, device: torch.device, read_every: int,
                    batch_size: int, warmup: int = 3) -> DeferredRunner:
    """A ``static`` or ``cuda_graph`` runner (also used by the benchmarks); adopts ``optimizer`` (fused Adam)."""
    adopt_optimizer(optimizer, capture=kind == "cuda_graph")
    step = SyncFreeStep(objective=objective, model=model, optimizer=optimizer, grad_clip=grad_clip, bf16=bf16,
                        guard=guard, capacity=max(1, read_every), device=device)
    captured = CapturedStep(step, batch_size=batch_size, warmup=warmup) if kind == "cuda_graph" else None
    return DeferredRunner(step=step, guard=guard, captured=captured)


def portable_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """``optimizer.state_dict()`` as any runner on any device can resume it: a learning rate held in a device tensor
    (cuda_graph) becomes a float again, and ``capturable`` is off (the resuming runner sets its own flags)."""
    state = optimizer.state_dict()
    for group in state["param_groups"]:  # copies: the optimizer's own groups are untouched
        if isinstance(group.get("lr"), torch.Tensor):
            group["lr"] = float(group["lr"])
        if "capturable" in group:
            group["capturable"] = False
    return state
