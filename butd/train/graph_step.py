"""The whole training step as device work only (``train.step_runner: static | cuda_graph``).

:class:`SyncFreeStep` does what ``butd.train.step.train_step`` does — forward, loss, backward, the finiteness check
of the loss and the gradients, value clipping, Adam, the divergence guard — without ever waiting for the device:

- the decisions become tensors: ``ok`` (loss and gradient norm finite, no explosion) is computed on the device and
  reaches the fused Adam kernel as its ``found_inf`` flag, which leaves the weights and the moments untouched (and
  takes back the step count) when the step is bad — the update the eager step would not have made;
- the divergence guard's running level lives on the device; an exploding loss skips its update and latches
  ``diverged``, so no later step updates the weights either;
- the loss, the statistics and the flags of each step are written into a small device table (``read`` copies it to
  the host: one sync every few steps, when the runner needs the values).

The host learns of a bad step or an explosion when it reads the table (``butd.train.runner``), not at the step: the
weights are the ones the eager loop would hold, but the error is raised up to ``capacity`` steps later, and the
loop reads the table before anything it writes (logs, checkpoints, validation).

:class:`CapturedStep` records the sync-free step of a full batch as one CUDA graph (forward, backward, clipping
and the optimizer) and replays it: one launch per iteration instead of a thousand.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from butd.data.dataset import Batch
from butd.train.step import DivergenceGuard

FLAG_COLUMNS = 3  # ok, exploded, the guard's level after the step (-1: none yet)


@dataclass
class StepRecord:
    """One step as read back from the device."""

    values: dict[str, float]  # loss and the objective's statistics
    good: bool  # the update was made
    exploded: bool  # the guard found the loss exploded (no update at or after this step)
    level: float | None  # the guard's running level after this step


def adopt_optimizer(optimizer: torch.optim.Optimizer, *, capture: bool) -> None:
    """Make the loop's Adam one the sync-free step can drive: fused (one kernel for every parameter, and the
    ``found_inf`` flag that skips an update on the device) with its step counts on the parameters' devices; for
    CUDA-graph capture also ``capturable``, with the learning rate in a device tensor the host refills each step
    (a Python float would be frozen into the graph)."""
    if not isinstance(optimizer, torch.optim.Adam):
        raise ValueError(f"the sync-free step drives torch.optim.Adam, got {type(optimizer).__name__}")
    if capture:  # the warm-up steps run uncaptured on purpose: torch's one-time warning about it would only confuse
        optimizer._warned_capturable_if_run_uncaptured = True  # type: ignore[attr-defined]
    for group in optimizer.param_groups:
        group["fused"], group["foreach"], group["capturable"] = True, None, capture
        device = group["params"][0].device
        if capture and not isinstance(group["lr"], torch.Tensor):
            group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32, device=device)
        for param in group["params"]:
            state = optimizer.state.get(param)
            if state and "step" in state:  # a checkpoint of the eager loop keeps them on the CPU
                state["step"] = state["step"].to(device=param.device, dtype=torch.float32)


class SyncFreeStep:
    """One optimisation step with no host synchronisation; see the module docstring.

    ``capacity`` steps fit in the record table: the caller reads it (``read``) before the next step when full.
    The optimizer must have gone through :func:`adopt_optimizer`; this step owns its ``found_inf`` flag.
    """

    def __init__(self, *, objective: nn.Module, model: nn.Module, optimizer: torch.optim.Optimizer,
                 grad_clip: float, bf16: bool, guard: DivergenceGuard, capacity: int,
                 device: torch.device) -> None:
        if capacity < 1:
            raise ValueError(f"SyncFreeStep: capacity must be >= 1, got {capacity}")
        if not all(group.get("fused") for group in optimizer.param_groups):
            raise ValueError("SyncFreeStep needs a fused Adam (butd.train.graph_step.adopt_optimizer)")
        self.objective, self.model, self.optimizer = objective, model, optimizer
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.grad_clip, self.bf16, self.device, self.capacity = grad_clip, bf16, device, capacity
        self.factor, self.decay = guard.factor, guard.decay
        self.found_inf = torch.zeros((), dtype=torch.float32, device=device)
        optimizer.found_inf = self.found_inf  # read by Adam.step: 1.0 leaves every tensor as it was
        self.level = torch.tensor(-1.0 if guard.level is None else guard.level, dtype=torch.float32, device=device)
        self.diverged = torch.zeros((), dtype=torch.bool, device=device)
        self.slot = torch.zeros(1, dtype=torch.int64, device=device)  # the table row of the next step
        self.names: list[str] | None = None  # "loss" and the objective's statistics, known after the first step
        self.records: torch.Tensor | None = None
        self.pending = 0  # steps written since the last read (host count)

    def set_learning_rate(self, lr: float) -> None:
        """The next step's rate: refills the device tensor of a captured optimizer, sets the float otherwise."""
        for group in self.optimizer.param_groups:
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr

    def __call__(self, batch: Batch) -> None:
        """Queue one step on the device; nothing here waits for it."""
        self.reserve_record()
        self.device_step(batch)

    def reserve_record(self) -> None:
        """Count the next step's row of the record table (host side); an error when the table is full."""
        if self.pending >= self.capacity:
            raise RuntimeError(f"SyncFreeStep: {self.pending} steps unread; read() before the next step")
        self.pending += 1

    def device_step(self, batch: Batch) -> None:
        """The step's device work, which a CUDA graph can record (the host count is ``reserve_record``'s)."""
        self.optimizer.zero_grad(set_to_none=True)  # backward writes fresh gradients (the graph's own when captured)
        # No autocast weight cache: a graph replays its casts, a cache would hold copies from the capture.
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.bf16,
                            cache_enabled=False):
            output = self.objective(batch)
        if self.records is None:
            self.names = ["loss", *output.stats]
            self.records = torch.zeros(self.capacity, len(self.names) + FLAG_COLUMNS, device=self.device)
        loss = output.loss.detach().float()
        finite = torch.isfinite(loss)
        magnitude, level = loss.abs(), self.level
        has_level = level >= 0
        if self.factor > 0:
            exploded = finite & has_level & ~self.diverged & (magnitude > self.factor * level.clamp_min(1.0))
        else:
            exploded = torch.zeros_like(finite)
        live = finite & ~exploded & ~self.diverged  # the steps the eager loop would take to backward
        running = torch.where(has_level, self.decay * level + (1 - self.decay) * magnitude, magnitude)
        self.level.copy_(torch.where(live, running, level))
        output.loss.backward()
        grads = [p.grad for p in self.params if p.grad is not None]
        ok = live
        if grads:  # checked before clipping, which would turn inf into a finite value
            ok = ok & torch.isfinite(torch.nn.utils.get_total_norm(grads))
        self.diverged.logical_or_(exploded)
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_value_(self.params, self.grad_clip)
        self.found_inf.copy_((~ok).float())
        self.optimizer.step()
        row = torch.stack([loss, *[v.detach().float() for v in output.stats.values()], ok.float(),
                           exploded.float(), self.level])
        self.records.index_copy_(0, self.slot, row.unsqueeze(0))
        self.slot.add_(1)

    def read(self) -> list[StepRecord]:
        """The records of the steps since the last read, oldest first (one host sync); empties the table."""
        if self.pending == 0 or self.records is None or self.names is None:
            return []
        rows = self.records[: self.pending].tolist()
        self.slot.zero_()
        self.pending = 0
        width = len(self.names)
        return [StepRecord(values=dict(zip(self.names, row[:width])), good=row[width] > 0.5,
                           exploded=row[width + 1] > 0.5, level=row[width + 2] if row[width + 2] >= 0 else None)
                for row in rows]


def pad_regions(batch: Batch, regions: int) -> Batch:
    """The batch with its region axis padded to ``regions`` (zero features and boxes, mask False): a padded region
    changes nothing, since every model masks padding out of its mean and its attention."""
    extra = regions - batch.features.shape[1]
    if extra <= 0:
        return batch
    return Batch(image_ids=batch.image_ids, features=F.pad(batch.features, (0, 0, 0, extra)),
                 boxes=F.pad(batch.boxes, (0, 0, 0, extra)), image_size=batch.image_size,
                 region_mask=F.pad(batch.region_mask, (0, extra)), labels=batch.labels)


def _shape_key(batch: Batch) -> tuple:
    return tuple((f.name, None if t is None else (tuple(t.shape), t.dtype))
                 for f in fields(Batch) for t in [getattr(batch, f.name)])


class CapturedStep:
    """The sync-free step of full batches as one CUDA graph per input shape.

    The first ``warmup`` full batches of a shape run uncaptured on a side stream (real steps: they create the
    optimizer state and warm the libraries, as capture requires); the next one is captured and replayed, and every
    later one is copied into the graph's input tensors and replayed. Regions are padded to the most seen so far, so
    a store with varying region counts settles on one shape; a larger count starts over (warm-up, capture). Other
    batch sizes (the epoch's last, partial batch) run the same step uncaptured.
    """

    def __init__(self, step: SyncFreeStep, *, batch_size: int, warmup: int = 3) -> None:
        if step.device.type != "cuda":
            raise ValueError(f"CapturedStep needs a CUDA device, got {step.device}")
        if warmup < 1:
            raise ValueError("CapturedStep: warmup must be >= 1 (the first step creates the optimizer state)")
        self.step, self.batch_size, self.warmup = step, batch_size, warmup
        self.regions = 0
        self.key: tuple | None = None
        self.warmed = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.inputs: Batch | None = None  # the graph's input tensors
        self.captures = 0  # graphs recorded so far (tests, benchmarks)

    def __call__(self, batch: Batch) -> None:
        if len(batch) != self.batch_size:
            self.step(batch)
            return
        self.regions = max(self.regions, batch.features.shape[1])
        batch = pad_regions(batch, self.regions)
        key = _shape_key(batch)
        if key != self.key:
            self.key, self.warmed, self.graph, self.inputs = key, 0, None, None
        if self.graph is None and self.warmed < self.warmup:
            self.warmed += 1
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.step(batch)
            torch.cuda.current_stream().wait_stream(side)
            return
        if self.graph is None:
            self.inputs = Batch(**{f.name: None if getattr(batch, f.name) is None else getattr(batch, f.name).clone()
                                   for f in fields(Batch)})
            self.graph = torch.cuda.CUDAGraph()
            # thread_local: the DataLoader's pin-memory thread may call CUDA while this thread captures.
            with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
                self.step.device_step(self.inputs)  # recorded, not run: the replay below runs it
            self.captures += 1
        else:
            assert self.inputs is not None
            for f in fields(Batch):
                source = getattr(batch, f.name)
                if source is not None:
                    getattr(self.inputs, f.name).copy_(source, non_blocking=True)
        self.step.reserve_record()
        self.graph.replay()
