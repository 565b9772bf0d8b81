"""Where computation runs and in which precision: one resolver for every tool, the trainer and the service.

Devices are named ``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``. Precisions are
``fp32``, ``bf16`` (bf16 autocast on CUDA) and ``auto`` (bf16 on CUDA, fp32 on CPU: CPU autocast is slower than
fp32 on most CPUs and would make CPU results differ from the reference numbers).
"""
from __future__ import annotations

import contextlib
from typing import Literal, get_args

import torch

from butd.errors import ConfigError

Precision = Literal["auto", "fp32", "bf16"]
PRECISIONS: tuple[str, ...] = get_args(Precision)


def resolve_device(device: str | torch.device, *, local_rank: int | None = None) -> torch.device:
    """The ``torch.device`` that ``device`` names; ConfigError for an unknown name or CUDA on a machine without it.

    ``local_rank`` (distributed training) picks ``cuda:<local_rank>`` when ``device`` names CUDA without an index.
    """
    name = str(device)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        resolved = torch.device(name)
    except RuntimeError as error:
        raise ConfigError(f"unknown device {str(device)!r} (use auto, cpu, cuda or cuda:N)") from error
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {str(device)!r} requested but CUDA is not available on this machine "
                              f"(use auto or cpu)")
        if resolved.index is None and local_rank is not None:
            resolved = torch.device("cuda", local_rank)
    return resolved


def check_precision(precision: str) -> Precision:
    """``precision`` itself if it is one of :data:`PRECISIONS`; ConfigError otherwise."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision  # type: ignore[return-value]


def uses_bf16(device: torch.device, precision: str) -> bool:
    """True when ``precision`` means bf16 autocast on ``device`` (``bf16`` or ``auto`` on CUDA)."""
    return device.type == "cuda" and check_precision(precision) in ("auto", "bf16")


def autocast_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA for ``bf16`` and ``auto``; a context that does nothing otherwise."""
    if uses_bf16(device, precision):
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
