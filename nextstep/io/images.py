"""The one conversion between images and the model's pixel tensors.

Pixels are float32 in [-1, 1], channels first: the reference's ToTensor +
Normalize(0.5, 0.5). Done in numpy (as exact as the torch ops, and much faster
in a busy DataLoader worker).
"""

from __future__ import annotations

import io
import os
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
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


class ImageTooLarge(ValueError):
    """An image whose header claims more pixels than allowed, refused before any pixel is decoded."""


def load_rgb(source: str | os.PathLike | bytes | BinaryIO, max_pixels: int | None = None) -> Image.Image:
    """A picture file as an RGB image: the one way the CLI and the server read images.

    Animations and multi-page files give their first frame; CMYK, palette, grey, 16-bit and alpha
    images go through PIL's convert("RGB") (alpha is dropped, not composited). With `max_pixels`,
    an image whose header claims more pixels is refused with ImageTooLarge before decoding: a tiny
    file can claim a 20000x20000 image and would otherwise allocate over a gigabyte.
    Raises ValueError (without the file's name) for anything that is not a readable picture.
    """
    if isinstance(source, bytes):
        source = io.BytesIO(source)
    try:
        with Image.open(source) as im:  # reads the header only
            if max_pixels is not None and im.width * im.height > max_pixels:
                raise ImageTooLarge(f"the image is {im.width}x{im.height} pixels, over the limit of "
                                    f"{max_pixels} pixels")
            im.seek(0)
            im.load()  # a truncated file fails here, not later
            return im.convert("RGB")
    except ImageTooLarge:
        raise
    except Image.DecompressionBombError as e:  # PIL's own cap, checked inside Image.open
        raise ImageTooLarge(str(e)) from None
    except UnidentifiedImageError:
        raise ValueError("not an image format PIL knows") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # PIL reports damaged files in all of these
        raise ValueError(str(e) or type(e).__name__) from None
