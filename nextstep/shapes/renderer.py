"""The renderer: a `Scene` to pixels (solid shapes, pixel-centre sampling, no anti-aliasing)."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image

from .world import BACKGROUNDS, COLOURS, SHAPES, Scene


@lru_cache(maxsize=512)
def shape_mask(shape: str, d: int) -> np.ndarray:
    """(d, d) bool mask of `shape` filling a d x d box, by pixel-centre sampling."""
    c = np.arange(d) + 0.5  # pixel centres
    x, y = c[None, :], c[:, None]
    if shape == "square":
        return np.ones((d, d), dtype=bool)
    if shape == "circle":
        r = d / 2
        return (x - r) ** 2 + (y - r) ** 2 <= r * r
    if shape == "triangle":
        # Apex up, base on the bottom row: row r (0-based) is (r+1) pixels wide, so the
        # base is d wide and the box is exactly d x d.
        return np.abs(x - d / 2) <= (np.arange(d)[:, None] + 1) / 2
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def render(scene: Scene) -> np.ndarray:
    """(S, S, 3) uint8 image of `scene`."""
    S = scene.size
    image = np.empty((S, S, 3), dtype=np.uint8)
    image[:] = BACKGROUNDS[scene.background]
    for o in scene.objects:
        x0, y0, x1, y1 = o.bbox
        if x1 - x0 != y1 - y0 or x1 <= x0 or min(x0, y0) < 0 or max(x1, y1) > S:
            raise ValueError(f"object box {list(o.bbox)} must be a non-empty square inside the {S}px canvas")
        region = image[y0:y1, x0:x1]
        region[shape_mask(o.shape, x1 - x0)] = COLOURS[o.colour]
    return image


def render_image(scene: Scene) -> Image.Image:
    return Image.fromarray(render(scene))
