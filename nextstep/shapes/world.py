"""The shapes world of `shapes-world.md`: its vocabulary, geometry rules and scenes.

A `Scene` is the ground truth: background and, per object, shape, colour name
and pixel bounding box. The rest of the package is built on these: the caption
and edit grammar (`grammar`), the renderer (`renderer`), the samplers of scenes,
captions and edits (`sampling`), the seeded dataset (`dataset`), the checker
(`detector`, `checker`) and the GenEval-style benchmarks (`benchmark`).

Pixel conventions: a bounding box is [x0, y0, x1, y1) with x1, y1 exclusive, so
the object covers columns x0..x1-1; its centre is ((x0+x1)/2, (y0+y1)/2). A
pixel is inside a shape when its centre (x+0.5, y+0.5) is. Every shape fills its
box to the edges (circle of diameter d, triangle with a 1-2 pixel apex row and a
full base row), so the box a detector measures is the box the labels state.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..data.stream import DataError

SHAPES = ("circle", "square", "triangle")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 90, 220),
    "yellow": (240, 200, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"light": (245, 245, 245), "dark": (25, 25, 25)}
CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
RELATIONS = ("to the left of", "to the right of", "above", "below")
NUMBER_WORDS = {2: "two", 3: "three", 4: "four"}
EDIT_OPS = ("recolour", "add", "remove", "background")
DARK_SUFFIX = " on a dark background"
MAX_OBJECTS = 4


def check_size(size: int) -> None:
    """A canvas side must be a multiple of 16 and at least 32 pixels."""
    if not isinstance(size, int) or size < 32 or size % 16:
        raise ValueError(f"canvas size must be a multiple of 16 and at least 32, got {size!r}")


# ---------------------------------------------------------------------- geometry rules
def margin_px(size: int) -> int:
    """Smallest distance from an object to the canvas edge: 0.03 S, rounded up to whole pixels."""
    return math.ceil(0.03 * size)


def gap_px(size: int) -> int:
    """Smallest gap between two bounding boxes: 0.04 S, rounded up to whole pixels."""
    return math.ceil(0.04 * size)


def relation_holds(a: tuple[float, float], b: tuple[float, float], relation: str, size: int,
                   extra: float = 0.0) -> bool:
    """Whether centre `a` is `relation` centre `b` on a canvas of side `size` (spec: by more than 0.1 S).

    `extra` pixels are added to the threshold; the renderer uses extra=1 so that
    a half pixel at an edge never flips a relation.
    """
    t = 0.1 * size + extra
    (ax, ay), (bx, by) = a, b
    if relation == "to the left of":
        return ax < bx - t
    if relation == "to the right of":
        return ax > bx + t
    if relation == "above":
        return ay < by - t
    if relation == "below":
        return ay > by + t
    raise ValueError(f"unknown relation {relation!r}; expected one of {RELATIONS}")


def boxes_apart(a: Sequence[int], b: Sequence[int], gap: int) -> bool:
    """Whether boxes a and b (x0, y0, x1, y1) are separated by >= gap empty pixels along x or y."""
    gx = max(b[0] - a[2], a[0] - b[2])
    gy = max(b[1] - a[3], a[1] - b[3])
    return max(gx, gy) >= gap


# ---------------------------------------------------------------------- scenes
@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive)

    @property
    def centre(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.bbox
        return (x0 + x1) / 2, (y0 + y1) / 2

    def to_dict(self) -> dict[str, Any]:
        return {"shape": self.shape, "colour": self.colour, "bbox": list(self.bbox)}


@dataclass(frozen=True)
class Scene:
    size: int
    background: str
    objects: tuple[SceneObject, ...]

    def labels(self) -> dict[str, Any]:
        """The ground truth, as stored in manifests (JSON-able)."""
        return {"size": self.size, "background": self.background, "objects": [o.to_dict() for o in self.objects]}

    @classmethod
    def from_labels(cls, labels: dict[str, Any]) -> "Scene":
        try:
            objects = tuple(SceneObject(o["shape"], o["colour"], tuple(int(v) for v in o["bbox"]))
                            for o in labels["objects"])
            return cls(int(labels["size"]), labels["background"], objects)
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"not shapes-world labels ({type(e).__name__}: {e}): {str(labels)[:120]}") from None
