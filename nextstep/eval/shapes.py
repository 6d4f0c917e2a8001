"""The shapes-world checker: find the objects in an image and judge it against a caption or an edit.

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

Judging follows the spec: the image passes when the detected background is the
caption's, every object is a known shape in a palette colour, and the objects
can be matched one-to-one to the caption's phrases (shape, and colour where
given) with the relation holding. An edit passes when its object phrase picks
out exactly one source object and the target holds exactly the source's objects
with that one change, every other object within `tolerance` pixels of its
source box.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageFilter

from ..data.shapes import (
    BACKGROUNDS,
    COLOURS,
    MAX_OBJECTS,
    SHAPES,
    Caption,
    Edit,
    Phrase,
    Scene,
    SceneObject,
    boxes_apart,
    gap_px,
    margin_px,
    parse_caption,
    parse_instruction,
    place_objects,
    relation_holds,
)

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

    def describe(self) -> str:
        objs = ", ".join(o.describe() for o in self.objects) or "no objects"
        return f"{objs} on a {self.background or 'unknown'} background"


@dataclass(frozen=True)
class CheckResult:
    passed: bool
    reason: str  # "ok", or what is wrong
    detection: Detection

    def __bool__(self) -> bool:
        return self.passed


# ---------------------------------------------------------------------- detection
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


# ---------------------------------------------------------------------- judging
def _unknown(det: Detection) -> str | None:
    bad = [o for o in det.objects if o.shape is None or o.colour is None]
    if bad:
        return "not a known shape in a palette colour: " + ", ".join(o.describe() for o in bad)
    return None


def _assign(phrases: Sequence[Phrase], objects: Sequence[Detected], ok=lambda pairing: True) -> list[int] | None:
    """A one-to-one assignment phrase i -> objects[a[i]] where shapes and colours fit and `ok` holds."""
    used = [False] * len(objects)
    chosen: list[int] = []

    def search(i: int) -> bool:
        if i == len(phrases):
            return ok(chosen)
        for j, o in enumerate(objects):
            if not used[j] and phrases[i].matches(o.shape, o.colour):
                used[j] = True
                chosen.append(j)
                if search(i + 1):
                    return True
                chosen.pop()
                used[j] = False
        return False

    return list(chosen) if search(0) else None


def check(image: Image.Image | np.ndarray, caption: str | Caption) -> CheckResult:
    """Judge `image` against `caption` (a string is parsed first; `CaptionError` if it does not parse)."""
    cap = parse_caption(caption) if isinstance(caption, str) else caption
    det = detect(image)

    def fail(reason: str) -> CheckResult:
        return CheckResult(False, reason, det)

    if det.background != cap.background:
        return fail(f"background is {det.background or 'neither light nor dark'}, the caption asks {cap.background}")
    if (why := _unknown(det)) is not None:
        return fail(why)
    if len(det.objects) != len(cap.objects):
        return fail(f"found {len(det.objects)} objects ({det.describe()}), the caption asks for {len(cap.objects)}")

    def relation_ok(pairing: list[int]) -> bool:
        if cap.relation is None:
            return True
        a, b = det.objects[pairing[0]], det.objects[pairing[1]]
        return relation_holds(a.centre, b.centre, cap.relation, det.size)

    if _assign(cap.objects, det.objects, relation_ok) is None:
        asked = "objects" if cap.relation is None else "objects and relation"
        return fail(f"found {det.describe()}: not the {asked} of {str(cap)!r}")
    return CheckResult(True, "ok", det)


def check_edit(source: Image.Image | np.ndarray, target: Image.Image | np.ndarray, instruction: str | Edit,
               tolerance: float | None = None) -> CheckResult:
    """Judge an edit. `tolerance`: how far (pixels, per box coordinate) an untouched object may move;
    default 0.05 S. The result's detection is the target's."""
    edit = parse_instruction(instruction) if isinstance(instruction, str) else instruction
    src, tgt = detect(source), detect(target)

    def fail(reason: str) -> CheckResult:
        return CheckResult(False, reason, tgt)

    if src.size != tgt.size:
        return fail(f"source is {src.size}px and target {tgt.size}px")
    tol = 0.05 * src.size if tolerance is None else tolerance
    if src.background is None or (why := _unknown(src)) is not None:
        return fail("source: " + (why or "background is neither light nor dark"))

    # The expected target: (shape, colour or None, box or None) per object, and the background.
    expected = [(o.shape, o.colour, o.bbox) for o in src.objects]
    background = src.background
    if edit.op in ("recolour", "remove"):
        hits = [i for i, o in enumerate(src.objects) if edit.phrase.matches(o.shape, o.colour)]
        if len(hits) != 1:
            return fail(f"'the {edit.phrase.words()}' picks out {len(hits)} objects of the source "
                        f"({src.describe()}), not one")
        i = hits[0]
        if edit.op == "remove":
            del expected[i]
        else:
            expected[i] = (expected[i][0], edit.colour, expected[i][2])
    elif edit.op == "add":
        expected.append((edit.phrase.shape, edit.phrase.colour, None))
    else:
        background = edit.background

    if tgt.background != background:
        return fail(f"target background is {tgt.background or 'neither light nor dark'}, expected {background}")
    if (why := _unknown(tgt)) is not None:
        return fail("target: " + why)
    if len(tgt.objects) != len(expected):
        return fail(f"target has {len(tgt.objects)} objects ({tgt.describe()}), expected {len(expected)}")

    def fits(e: tuple, o: Detected) -> bool:
        shape, colour, box = e
        if o.shape != shape or (colour is not None and o.colour != colour):
            return False
        return box is None or all(abs(a - b) <= tol for a, b in zip(box, o.bbox))

    used = [False] * len(tgt.objects)

    def search(i: int) -> bool:
        if i == len(expected):
            return True
        for j, o in enumerate(tgt.objects):
            if not used[j] and fits(expected[i], o):
                used[j] = True
                if search(i + 1):
                    return True
                used[j] = False
        return False

    if not search(0):
        return fail(f"target ({tgt.describe()}) is not the source ({src.describe()}) after {str(edit)!r}")
    return CheckResult(True, "ok", tgt)


# ---------------------------------------------------------------------- test tooling
def degrade(image: Image.Image, rng: np.random.Generator, noise: float = 5.0, blur: float = 0.6,
            jpeg_quality: int | None = 75) -> Image.Image:
    """Mild real-world damage: Gaussian pixel noise (std `noise`), Gaussian blur (radius `blur`), JPEG."""
    arr = np.asarray(image.convert("RGB"), dtype=np.float32)
    if noise:
        arr = arr + rng.normal(0.0, noise, arr.shape)
    out = Image.fromarray(np.clip(arr.round(), 0, 255).astype(np.uint8))
    if blur:
        out = out.filter(ImageFilter.GaussianBlur(blur))
    if jpeg_quality is not None:
        buf = io.BytesIO()
        out.save(buf, format="JPEG", quality=jpeg_quality)
        out = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    return out


CORRUPTIONS = ("background", "missing", "extra", "shape", "colour", "swap_colours", "relation")


def corrupt(rng: np.random.Generator, scene: Scene, caption: Caption) -> tuple[Scene, str]:
    """A scene that `caption` does NOT describe, made by one random applicable corruption:
    flip the background, drop an object, add one, change a shape, change a named colour,
    swap two named colours, or mirror the positions of a relation. Returns (scene, kind)."""
    kinds = list(CORRUPTIONS)
    rng.shuffle(kinds)
    objs = list(scene.objects)
    for kind in kinds:
        out = _corrupt(rng, scene, caption, objs, kind)
        if out is not None:
            return out, kind
    raise RuntimeError(f"no corruption applies to {caption}")


def _corrupt(rng: np.random.Generator, scene: Scene, caption: Caption, objs: list[SceneObject],
             kind: str) -> Scene | None:
    S = scene.size
    i = int(rng.integers(len(objs)))
    if kind == "background":
        return replace(scene, background="dark" if scene.background == "light" else "light")
    if kind == "missing":
        return replace(scene, objects=tuple(objs[:i] + objs[i + 1:]))
    if kind == "extra":
        if len(objs) >= MAX_OBJECTS:
            return None
        shape = SHAPES[int(rng.integers(3))]
        colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
        new = place_objects(rng, S, [(shape, colour)], objs)
        return None if new is None else replace(scene, objects=tuple(objs + new))
    if kind == "shape":
        others = [s for s in SHAPES if s != objs[i].shape]
        objs[i] = replace(objs[i], shape=others[int(rng.integers(len(others)))])
        return replace(scene, objects=tuple(objs))
    if kind == "colour":
        # Only a colour the caption names can be wrong; phrases and objects share their order.
        named = [j for j, p in enumerate(caption.objects) if p.colour is not None]
        if not named:
            return None
        j = named[int(rng.integers(len(named)))]
        others = [c for c in COLOURS if c != objs[j].colour]
        objs[j] = replace(objs[j], colour=others[int(rng.integers(len(others)))])
        return replace(scene, objects=tuple(objs))
    if kind == "swap_colours":
        if caption.form != "and" or len({p.colour for p in caption.objects} - {None}) != 2:
            return None
        a, b = objs
        return replace(scene, objects=(replace(a, colour=b.colour), replace(b, colour=a.colour)))
    if kind == "relation":
        if caption.relation is None:
            return None
        # Mirror every box across the relation's axis (shapes stay upright): the relation
        # flips, margins and gaps are kept.
        horizontal = caption.relation in ("to the left of", "to the right of")
        mirrored = []
        for o in objs:
            x0, y0, x1, y1 = o.bbox
            box = (S - x1, y0, S - x0, y1) if horizontal else (x0, S - y1, x1, S - y0)
            mirrored.append(replace(o, bbox=box))
        return replace(scene, objects=tuple(mirrored))
    raise ValueError(f"unknown corruption {kind!r}")


EDIT_CORRUPTIONS = ("unchanged", "moved", "extra", "wrong_background")


def corrupt_edit(rng: np.random.Generator, source: Scene, edit: Edit, target: Scene) -> tuple[Scene, str]:
    """A target that is NOT `source` after `edit`: left unchanged, an untouched object moved by
    0.1 S, an extra object added, or the background flipped. Returns (scene, kind)."""
    kinds = list(EDIT_CORRUPTIONS)
    rng.shuffle(kinds)
    S = target.size
    for kind in kinds:
        if kind == "unchanged":
            return source, kind
        if kind == "wrong_background":
            return replace(target, background="dark" if target.background == "light" else "light"), kind
        objs = list(target.objects)
        if kind == "extra" and len(objs) < MAX_OBJECTS:
            new = place_objects(rng, S, [(SHAPES[int(rng.integers(3))], list(COLOURS)[int(rng.integers(6))])], objs)
            if new is not None:
                return replace(target, objects=tuple(objs + new)), kind
        if kind == "moved":
            shift = int(np.ceil(0.1 * S))
            # An added object may sit anywhere: move one the edit must leave in place.
            movable = len(objs) - 1 if edit.op == "add" else len(objs)
            for i in rng.permutation(movable):
                o = objs[int(i)]
                for dx, dy in ((shift, 0), (-shift, 0), (0, shift), (0, -shift)):
                    x0, y0, x1, y1 = o.bbox
                    box = (x0 + dx, y0 + dy, x1 + dx, y1 + dy)
                    m = margin_px(S)
                    inside = min(box[:2]) >= m and max(box[2:]) <= S - m
                    rest = objs[:int(i)] + objs[int(i) + 1:]
                    if inside and all(boxes_apart(box, p.bbox, gap_px(S)) for p in rest):
                        objs[int(i)] = replace(o, bbox=box)
                        return replace(target, objects=tuple(objs)), kind
    return source, "unchanged"
