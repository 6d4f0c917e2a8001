"""2-D sin-cos position embedding of image tokens (the optional `gen_pos_embed`)."""

from __future__ import annotations

import torch
from torch import Tensor


def _sincos_1d(dim: int, pos: Tensor) -> Tensor:
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64, device="cpu") / (dim / 2.0))
    angles = pos.double().reshape(-1)[:, None] * omega[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d(dim: int, height: int, width: int) -> Tensor:
    """(height * width, dim) table in raster order.

    Token (i, j) gets [sincos(j), sincos(i)]: the first half of the channels
    encodes the column, the second half the row (MAE's layout, which the
    official 32x32 `gen_pos_embed` buffer follows). Computed for the grid
    actually generated, so any height and width get true 2-D positions.
    Always computed on the CPU: under `torch.device("meta")` (building a model to load)
    arange would run torch's Python reference kernel, whose first call imports torch._dynamo,
    3 s of a cold start.
    """
    rows, cols = torch.meshgrid(torch.arange(height, device="cpu"), torch.arange(width, device="cpu"),
                                indexing="ij")
    return torch.cat([_sincos_1d(dim // 2, cols), _sincos_1d(dim // 2, rows)], dim=1).float()
