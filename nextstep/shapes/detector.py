"""The shapes-world detector: find the background and the objects of an image.

Detection, in order:
1. Background: the median colour of the one-pixel border (objects keep a
   margin, so the border is background); named light or dark if it is within
   `BACKGROUND_TOL` of one, else unknown.
2. Foreground: pixels farther from that background colour than half the
   distance from it to the nearest palette colour. For a blurred edge this is
   the half-blend line, i.e. where the sharp edge was, so boxes stay exact.
3. Objects: 8-connected components of the foreground (row runs joined with a
   small union-find), ignoring specks under `MIN_AREA_FRAC` of the smallest
   legal object's box.
4. Per object: its box; its colour, the median of its interior pixels (one
   pixel eroded, so edge blends do not count), named by the nearest palette
   colour within `COLOUR_TOL`; its shape, from how much of its box it fills
   (square ~1, circle ~pi/4, triangle ~1/2) and, for a triangle, that its top
   half holds less than its bottom half (apex up). A box far from square, or a
   fill that fits no shape, gives shape None.

`checker` judges what `detect` finds against a caption or an edit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from .world import BACKGROUNDS, COLOURS

BACKGROUND_TOL = 40.0  # max RGB distance of the border colour from light/dark
COLOUR_TOL = 60.0  # max RGB distance of an object's colour from its palette colour
MIN_AREA_FRAC = 0.1  # specks below this fraction of (0.18 S)^2 pixels are not objects
SQUARE_FILL = 0.89  # fill (area / box area) >= this: square
CIRCLE_FILL = 0.65  # fill in [this, SQUARE_FILL): circle
CIRCLE_MAX_FILL = 0.8  # a triangle fills less than a circle
TRIANGLE_FILL = 0.35  # ... and at least this
TRIANGLE_TOP_RATIO = 0.7  # an apex-up triangle's top half holds < this times its bottom half
MAX_BOX_ASPECT = 1.35  # every shape's box is square; a box more oblong than this is no shape

_PALETTE = np.array(list(COLOURS.values()), dtype=np.float32)
_PALETTE_NAMES = list(COLOURS)


@dataclass(frozen=True)
class Detected:
    shape: str | None  # None: not one of the three shapes
    colour: str | None  # None: not a palette colour
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive)
    area: int
    rgb: tuple[int, int, int]

    @property
    def centre(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.bbox
        return (x0 + x1) / 2, (y0 + y1) / 2

    def describe(self) -> str:
        what = f"{self.colour or 'rgb%s' % (self.rgb,)} {self.shape or 'blob'}"
        return f"{what} at {list(self.bbox)}"


@dataclass(frozen=True)
class Detection:
    size: int
    background: str | None  # None: neither light nor dark
    objects: tuple[Detected, ...]

    @property
    def off_palette(self) -> bool:
        """Whether some object is of no palette colour (off-palette, or mixed)."""
        return any(o.colour is None for o in self.objects)

    def describe(self) -> str:
        objs = ", ".join(o.describe() for o in self.objects) or "no objects"
        return f"{objs} on a {self.background or 'unknown'} background"


def _as_array(image: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, Image.Image):
        arr = np.asarray(image.convert("RGB"))
    elif isinstance(image, np.ndarray):
        arr = image
    else:
        raise TypeError(f"expected a PIL image or an (H, W, 3) uint8 array, got {type(image).__name__}")
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an RGB image of shape (H, W, 3), got {arr.shape}")
    if arr.shape[0] != arr.shape[1] or arr.shape[0] < 16:
        raise ValueError(f"shapes-world images are square (at least 16 px), got {arr.shape[1]}x{arr.shape[0]}")
    return arr


def _runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Horizontal runs of True: (row, start, end exclusive), sorted by row then start."""
    padded = np.zeros((mask.shape[0], mask.shape[1] + 2), dtype=np.int8)
    padded[:, 1:-1] = mask
    d = np.diff(padded, axis=1)
    rs, xs = np.nonzero(d == 1)
    _, xe = np.nonzero(d == -1)
    return rs, xs, xe


def components(mask: np.ndarray) -> list[list[tuple[int, int, int]]]:
    """8-connected components of a bool mask, each as its list of runs (row, x0, x1 exclusive)."""
    rows, starts, ends = _runs(mask)
    n = len(rows)
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    # Runs of consecutive rows that overlap or touch diagonally belong together.
    row_start = np.searchsorted(rows, np.arange(mask.shape[0] + 1))
    for y in range(mask.shape[0] - 1):
        a, a_end, b, b_end = row_start[y], row_start[y + 1], row_start[y + 1], row_start[y + 2]
        while a < a_end and b < b_end:
            if starts[a] <= ends[b] and starts[b] <= ends[a]:
                ra, rb = find(a), find(b)
                if ra != rb:
                    parent[max(ra, rb)] = min(ra, rb)
            # advance the run that ends first
            if ends[a] < ends[b]:
                a += 1
            else:
                b += 1
    groups: dict[int, list[tuple[int, int, int]]] = {}
    for i in range(n):
        groups.setdefault(find(i), []).append((int(rows[i]), int(starts[i]), int(ends[i])))
    return list(groups.values())


def _classify_shape(mask: np.ndarray) -> str | None:
    """Shape of an object from its bool mask cropped to its box.

    Two numbers decide: fill (area / box area: square ~1, circle ~0.785, triangle
    ~0.5) and the ratio of the top half's area to the bottom half's (~1 for
    circle and square, ~1/3 for an apex-up triangle). The ratio survives blur and
    JPEG better than fill, whose apex and corners erode first.
    """
    h, w = mask.shape
    if max(h, w) > MAX_BOX_ASPECT * min(h, w):
        return None
    area = float(mask.sum())
    fill = area / (h * w)
    rows = mask.sum(axis=1).astype(np.float64)
    top = rows[: h // 2].sum() + (rows[h // 2] / 2 if h % 2 else 0.0)
    bottom = area - top
    if top < TRIANGLE_TOP_RATIO * bottom:
        return "triangle" if TRIANGLE_FILL <= fill < CIRCLE_MAX_FILL else None
    if bottom < TRIANGLE_TOP_RATIO * top:
        return None  # upside down: not a shape of this world
    if fill >= SQUARE_FILL:
        return "square"
    if fill >= CIRCLE_FILL:
        return "circle"
    return None


def _name_colour(rgb: np.ndarray) -> str | None:
    d = np.linalg.norm(_PALETTE - rgb, axis=1)
    i = int(d.argmin())
    return _PALETTE_NAMES[i] if d[i] <= COLOUR_TOL else None


def _measure(img: np.ndarray, bg: np.ndarray, runs: list[tuple[int, int, int]], min_area: float) -> Detected | None:
    """Colour, exact mask, box and shape of one component of the loose mask."""
    S = img.shape[0]
    y0, y1 = min(r for r, _, _ in runs), max(r for r, _, _ in runs) + 1
    x0, x1 = min(a for _, a, _ in runs), max(b for _, _, b in runs)
    # Work in the box grown by one pixel, where the exact edge may lie.
    Y0, Y1, X0, X1 = max(y0 - 1, 0), min(y1 + 1, S), max(x0 - 1, 0), min(x1 + 1, S)
    mask = np.zeros((Y1 - Y0, X1 - X0), dtype=bool)
    for r, a, b in runs:
        mask[r - Y0, a - X0:b - X0] = True
    # Colour: median of the interior (pixels whose 4 neighbours are in the object too).
    inner = mask.copy()
    inner[1:] &= mask[:-1]
    inner[:-1] &= mask[1:]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    patch = img[Y0:Y1, X0:X1]
    rgb = np.median(patch[inner if inner.sum() >= 3 else mask], axis=0)
    # Exact mask: past the half-blend between background and this object's own colour, so a
    # blurred edge is cut where the sharp edge was whatever the colour's contrast.
    v = rgb - bg
    t = (patch - bg) @ v / max(float(v @ v), 1e-6)
    near = mask.copy()  # the component grown by one pixel (8 neighbours)
    near[1:] |= mask[:-1]
    near[:-1] |= mask[1:]
    near[:, 1:] |= near[:, :-1].copy()
    near[:, :-1] |= near[:, 1:].copy()
    exact = (t > 0.5) & near
    area = int(exact.sum())
    if area < min_area:
        return None
    ys, xs = np.nonzero(exact)
    by0, by1, bx0, bx1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    shape = _classify_shape(exact[by0:by1, bx0:bx1])
    box = (int(bx0 + X0), int(by0 + Y0), int(bx1 + X0), int(by1 + Y0))
    return Detected(shape, _name_colour(rgb), box, area, tuple(int(round(c)) for c in rgb))


def detect(image: Image.Image | np.ndarray) -> Detection:
    """Find the background and the objects of a shapes-world image."""
    arr = _as_array(image)
    S = arr.shape[0]
    img = arr.astype(np.float32)
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    bg = np.median(border, axis=0)
    names = list(BACKGROUNDS)
    dists = [float(np.linalg.norm(bg - np.array(BACKGROUNDS[n], dtype=np.float32))) for n in names]
    background = names[int(np.argmin(dists))] if min(dists) <= BACKGROUND_TOL else None

    # A loose mask finds the objects: farther from the background than half the way to the
    # nearest palette colour.
    loose = np.linalg.norm(img - bg, axis=2) > 0.5 * float(np.linalg.norm(_PALETTE - bg, axis=1).min())
    min_area = MIN_AREA_FRAC * (0.18 * S) ** 2
    objects = []
    for runs in components(loose):
        if sum(x1 - x0 for _, x0, x1 in runs) < min_area:
            continue
        obj = _measure(img, bg, runs, min_area)
        if obj is not None:
            objects.append(obj)
    objects.sort(key=lambda o: (o.bbox[1], o.bbox[0]))
    return Detection(S, background, tuple(objects))
