"""Data-parallel training across processes (``torchrun``): setup, teardown and the few collectives the loop uses.

A single process (no ``WORLD_SIZE`` in the environment) is world size 1 and every helper is a no-op, so the loop
reads the same with one GPU, several GPUs, or the CPU.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from butd.core.devices import resolve_device


@dataclass(frozen=True)
class DistContext:
    """Where this process sits: its rank among ``world_size`` processes and the device it trains on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0 alone logs, validates and writes checkpoints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup_distributed(device_preference: str = "auto") -> DistContext:
    """Join the process group that ``torchrun`` describes in the environment (NCCL on GPUs, gloo on CPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_preference, local_rank=local_rank)
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", rank=rank,
                                world_size=world_size)
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def teardown_distributed() -> None:
    """Leave the process group (if one was joined)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    """Wait for every rank (e.g. while rank 0 validates)."""
    if ctx.distributed:
        dist.barrier()


def all_ranks_true(flag: bool | torch.Tensor, ctx: DistContext) -> bool:
    """True only if ``flag`` holds on every rank: all ranks must agree to take or skip an optimizer step, or the
    gradient all-reduce of the ranks that go on would wait forever for the ones that skipped."""
    if not ctx.distributed:
        return bool(flag)
    value = torch.as_tensor(flag, dtype=torch.float32, device=ctx.device).reshape(1)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item() > 0)


def gather_objects(obj: object, ctx: DistContext) -> list[object]:
    """``obj`` of every rank, in rank order (a one-element list on a single process)."""
    if not ctx.distributed:
        return [obj]
    out: list[object] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: object, ctx: DistContext) -> object:
    """Rank 0's ``obj`` on every rank."""
    if not ctx.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
