"""Device and dtype choices, in one place.

Defaults: CUDA with bfloat16 when a GPU is present, else CPU with float32 (the
reference's parity numbers are fp32). A model folder may prefer "bf16-mixed" on
CPUs (its `generation_defaults.json` key `cpu_dtype`): float32 weights with
bfloat16 matmuls under `torch.autocast`, the numerics the shapes recipe trains
with, and several times faster on CPUs with native bf16 (AVX512-BF16, AMX).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch

MIXED = "bf16-mixed"  # float32 weights, bfloat16 matmuls (autocast)
_NAMES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
DTYPE_NAMES = (*sorted(_NAMES), MIXED)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 matmuls natively (else autocast to bf16 is slower than fp32)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve(device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
            cpu_preference: str | None = None) -> tuple[torch.device, torch.dtype, torch.dtype | None]:
    """(device, weight dtype, autocast dtype or None). `cpu_preference` is a model's own choice
    for CPUs when `dtype` is not given; "bf16-mixed" is taken only where bf16 is native."""
    device = torch.device(device) if device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    if dtype is None and device.type == "cpu" and cpu_preference is not None:
        dtype = cpu_preference if cpu_preference != MIXED or cpu_has_native_bf16() else "float32"
    if dtype == MIXED:
        return device, torch.float32, torch.bfloat16
    if isinstance(dtype, str):
        if dtype not in _NAMES:
            raise ValueError(f"unknown dtype {dtype!r}; use one of {list(DTYPE_NAMES)}")
        dtype = _NAMES[dtype]
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return device, dtype, None


def autocast(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager:
    """`torch.autocast` to `dtype` on `device`, or nothing for None."""
    return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)
