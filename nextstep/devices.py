"""Device and dtype choices, in one place.

Defaults: CUDA with bfloat16 when a GPU is present, else CPU with float32 (the
reference's parity numbers are fp32). A model folder may prefer "bf16-mixed" on
CPUs (its `generation_defaults.json` key `cpu_dtype`): float32 weights with
bfloat16 matmuls under `torch.autocast`, the numerics the shapes recipe trains
with, and several times faster on CPUs with native bf16 (AVX512-BF16, AMX).
"""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager, nullcontext

import torch

logger = logging.getLogger(__name__)

MIXED = "bf16-mixed"  # float32 weights, bfloat16 matmuls (autocast)
_NAMES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
DTYPE_NAMES = (*sorted(_NAMES), MIXED)
TRAINING_PRECISIONS = ("auto", "fp32", "bf16")  # a training run's `[train] precision`


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 matmuls natively (else autocast to bf16 is slower than fp32)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def preferred_cpu_dtype(preference: str | None) -> str | None:
    """A model's CPU dtype preference (`cpu_dtype`) as this CPU takes it: "bf16-mixed" only where
    bf16 is native (emulated bf16 matmuls are several times slower than float32), else float32."""
    return "float32" if preference == MIXED and not cpu_has_native_bf16() else preference


def resolve(device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
            cpu_preference: str | None = None) -> tuple[torch.device, torch.dtype, torch.dtype | None]:
    """(device, weight dtype, autocast dtype or None). `cpu_preference` is a model's own choice
    for CPUs when `dtype` is not given; "bf16-mixed" is taken only where bf16 is native."""
    device = torch.device(device) if device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    if dtype is None and device.type == "cpu" and cpu_preference is not None:
        dtype = preferred_cpu_dtype(cpu_preference)
    if dtype == MIXED:
        return device, torch.float32, torch.bfloat16
    if isinstance(dtype, str):
        if dtype not in _NAMES:
            raise ValueError(f"unknown dtype {dtype!r}; use one of {list(DTYPE_NAMES)}")
        dtype = _NAMES[dtype]
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return device, dtype, None


def training_autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """The autocast dtype a training run's `precision` ("auto", "fp32", "bf16") asks for on `device`.
    "auto" is bf16 on a GPU and fp32 on a CPU. "bf16" on a CPU without native bf16 falls back to
    fp32: emulated bf16 matmuls run tens of times slower than fp32 there."""
    if precision not in TRAINING_PRECISIONS:
        raise ValueError(f"unknown training precision {precision!r} (auto, fp32 or bf16)")
    if precision == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
        logger.warning("precision = 'bf16': this CPU has no native bf16 (emulated bf16 matmuls are tens of "
                       "times slower than fp32), so this run trains in fp32")
        return None
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.bfloat16 if use_bf16 else None


def autocast(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager:
    """`torch.autocast` to `dtype` on `device`, or nothing for None."""
    return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)
