"""Device and dtype choices, in one place.

Defaults: CUDA with bfloat16 when a GPU is present, else CPU with float32
(the reference's parity numbers are fp32; bf16 on CPU is opt-in).
"""

from __future__ import annotations

import torch


def resolve(device: str | torch.device | None = None, dtype: str | torch.dtype | None = None
            ) -> tuple[torch.device, torch.dtype]:
    device = torch.device(device) if device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(dtype, str):
        names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                 "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
        if dtype not in names:
            raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(names)}")
        dtype = names[dtype]
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return device, dtype
