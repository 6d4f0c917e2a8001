"""The one conversion between images and the model's pixel tensors.

Pixels are float32 in [-1, 1], channels first: the reference's ToTensor +
Normalize(0.5, 0.5). Done in numpy (as exact as the torch ops, and much faster
in a busy DataLoader worker).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import Tensor


def to_pixels(image: np.ndarray) -> Tensor:
    """(H, W, 3) uint8 -> contiguous (3, H, W) float32 in [-1, 1]."""
    chw = np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32)
    return torch.from_numpy(chw / np.float32(127.5) - np.float32(1.0))


def pil_to_pixels(image: Image.Image) -> Tensor:
    """A PIL image (any mode) -> (3, H, W) float32 in [-1, 1]."""
    return to_pixels(np.asarray(image.convert("RGB")))


def pixels_to_pil(x: Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in about [-1, 1] -> PIL images (clamped, rounded to uint8)."""
    x = (x.float() / 2 + 0.5).clamp(0, 1).mul(255).round().to(torch.uint8)
    return [Image.fromarray(a) for a in x.permute(0, 2, 3, 1).cpu().numpy()]
