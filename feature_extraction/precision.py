"""Extraction modes: how the detector computes (fp32, bf16, fp16) and how the features are stored.

* ``reference`` -- float32 compute with TF32 off for matmul and cuDNN, float32 storage: the arithmetic of the Caffe
  network that wrote the published features. PyTorch enables TF32 for cuDNN convolutions by default, so a plain
  "fp32" run on an Ampere/Hopper GPU would round every convolution input to 10 mantissa bits; this mode turns TF32
  off for the duration of the forward pass and restores the caller's flags afterwards.
* ``fast`` -- bf16 autocast, float16 storage: about twice the speed on a recent GPU and half the disk, at the cost
  of slightly different boxes (bf16 quantises the RPN logits and class scores, which creates ties in top-k and
  NMS). Its agreement with the reference mode is measured by ``benchmarks/extract_agreement.py`` and recorded in
  docs/extraction.md.

Autocast applies on whichever device the detector runs on (CPU autocast in bf16 is used to measure the fast mode's
agreement on machines without a GPU).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from butd.errors import ConfigError

# Compute precisions: None means plain float32 (no autocast).
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
STORAGE_DTYPES = ("float16", "float32")


@dataclass(frozen=True)
class ExtractionMode:
    """A named pair of compute precision and stored feature dtype."""

    name: str
    precision: str
    dtype: str


MODES: dict[str, ExtractionMode] = {
    "reference": ExtractionMode(name="reference", precision="fp32", dtype="float32"),
    "fast": ExtractionMode(name="fast", precision="bf16", dtype="float16"),
}
DEFAULT_MODE = "reference"


def resolve_mode(mode: str, *, precision: str | None = None, dtype: str | None = None) -> ExtractionMode:
    """``mode`` with its precision and/or storage dtype overridden; ConfigError for unknown names."""
    if mode not in MODES:
        raise ConfigError(f"extraction mode must be one of {', '.join(MODES)}, got {mode!r}")
    check_precision(precision or MODES[mode].precision)
    if dtype is not None and dtype not in STORAGE_DTYPES:
        raise ConfigError(f"stored feature dtype must be one of {', '.join(STORAGE_DTYPES)}, got {dtype!r}")
    base = MODES[mode]
    if precision in (None, base.precision) and dtype in (None, base.dtype):
        return base
    return ExtractionMode(name="custom", precision=precision or base.precision, dtype=dtype or base.dtype)


def check_precision(precision: str) -> str:
    """``precision`` if it is fp32, fp16 or bf16; ConfigError otherwise."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    return precision


@contextlib.contextmanager
def strict_fp32() -> Iterator[None]:
    """TF32 off for float32 matmul and cuDNN convolutions inside the block; the caller's flags are restored after
    (also when the block raises). The flags are process-wide: do not run other CUDA work concurrently."""
    matmul = torch.get_float32_matmul_precision()
    cudnn_tf32 = torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(matmul)
        torch.backends.cudnn.allow_tf32 = cudnn_tf32


@contextlib.contextmanager
def compute_context(device: torch.device, precision: str) -> Iterator[None]:
    """Strict float32 for ``fp32`` (also inside a caller's autocast region); autocast in bf16/fp16 on ``device``
    otherwise."""
    dtype = PRECISIONS[check_precision(precision)]
    if dtype is None:
        with torch.autocast(device.type, enabled=False), strict_fp32():
            yield
    else:
        with torch.autocast(device.type, dtype=dtype):
            yield
