"""The shapes world of `shapes-world.md`: renderer, caption and edit grammar, seeded dataset.

A `Scene` is the ground truth (background and, per object, shape, colour name
and pixel bounding box); `render` draws it; `Caption` and `Edit` are the two
grammars, each with a formatter (`str(...)`) and a strict parser that raises
`CaptionError` naming what it could not read. `sample_scene` draws a caption of
a benchmark category and a scene that it describes exactly; `sample_edit` draws
a source scene, an instruction and the target scene. `ShapesDataset` is the
endless, seeded stream the small model trains on: sample k depends only on
(seed, k), so any worker can make any sample and a resume is exact.

Pixel conventions: a bounding box is [x0, y0, x1, y1) with x1, y1 exclusive, so
the object covers columns x0..x1-1; its centre is ((x0+x1)/2, (y0+y1)/2). A
pixel is inside a shape when its centre (x+0.5, y+0.5) is. Every shape fills its
box to the edges (circle of diameter d, triangle with a 1-2 pixel apex row and a
full base row), so the box a detector measures is the box the labels state.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from itertools import islice
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..errors import NextStepError
from .stream import DataError, Record, StreamDataset

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


class CaptionError(NextStepError, ValueError):
    """A caption or edit instruction outside the shapes-world grammar."""


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


# ---------------------------------------------------------------------- rendering
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


# ---------------------------------------------------------------------- grammar
@dataclass(frozen=True)
class Phrase:
    """`[COLOUR] SHAPE`; colour None means any colour."""

    shape: str
    colour: str | None = None

    def words(self) -> str:
        return f"{self.colour} {self.shape}" if self.colour else self.shape

    def with_article(self) -> str:
        w = self.words()
        return ("an " if w.startswith("orange") else "a ") + w

    def matches(self, shape: str | None, colour: str | None) -> bool:
        return shape == self.shape and (self.colour is None or colour == self.colour)


@dataclass(frozen=True)
class Caption:
    """A parsed caption. form: "single" | "and" | "count" | "relation"; for "count", `objects`
    holds the same phrase N times."""

    form: str
    objects: tuple[Phrase, ...]
    relation: str | None = None
    background: str = "light"

    def __str__(self) -> str:
        objs = self.objects
        if self.form == "single":
            text = objs[0].with_article()
        elif self.form == "and":
            text = f"{objs[0].with_article()} and {objs[1].with_article()}"
        elif self.form == "count":
            text = f"{NUMBER_WORDS[len(objs)]} {objs[0].words()}s"
        elif self.form == "relation":
            text = f"{objs[0].with_article()} {self.relation} {objs[1].with_article()}"
        else:
            raise ValueError(f"unknown caption form {self.form!r}")
        return text + (DARK_SUFFIX if self.background == "dark" else "")


@dataclass(frozen=True)
class Edit:
    """A parsed edit instruction. `phrase` is the object referred to (recolour, remove) or added
    (add); `colour` the new colour of a recolour; `background` the new background."""

    op: str
    phrase: Phrase | None = None
    colour: str | None = None
    background: str | None = None

    def __str__(self) -> str:
        if self.op == "recolour":
            return f"make the {self.phrase.words()} {self.colour}"
        if self.op == "add":
            return f"add {self.phrase.with_article()}"
        if self.op == "remove":
            return f"remove the {self.phrase.words()}"
        if self.op == "background":
            return f"change the background to {self.background}"
        raise ValueError(f"unknown edit op {self.op!r}")


class _Words:
    """A cursor over the words of a caption, with errors that say where parsing stopped."""

    def __init__(self, text: str, what: str) -> None:
        self.text, self.what = text, what
        self.words = text.split(" ")
        self.i = 0

    def fail(self, expected: str) -> CaptionError:
        got = f"{self.words[self.i]!r} (word {self.i + 1})" if self.i < len(self.words) else "the end"
        return CaptionError(f"cannot parse {self.what} {self.text!r}: expected {expected}, got {got}")

    def peek(self) -> str | None:
        return self.words[self.i] if self.i < len(self.words) else None

    def take(self, *allowed: str) -> str:
        w = self.peek()
        if w is None or w not in allowed:
            raise self.fail(" or ".join(repr(a) for a in allowed))
        self.i += 1
        return w

    def end(self) -> None:
        if self.i != len(self.words):
            raise self.fail("the end of the " + self.what)

    def colour(self) -> str | None:
        if self.peek() in COLOURS:
            self.i += 1
            return self.words[self.i - 1]
        return None

    def shape(self, plural: bool = False, after_colour_slot: bool = False) -> str:
        names = [s + "s" for s in SHAPES] if plural else list(SHAPES)
        w = self.peek()
        if w not in names:
            what = "a shape (" + ", ".join(names) + ")"
            raise self.fail(("a colour or " if after_colour_slot else "") + what)
        self.i += 1
        return w[:-1] if plural else w

    def phrase(self, article: bool) -> Phrase:
        if article:
            a = self.take("a", "an")
            if (a == "an") != (self.peek() == "orange"):
                raise CaptionError(f"cannot parse {self.what} {self.text!r}: use 'an' before 'orange' "
                                   f"and 'a' before any other word (word {self.i})")
        colour = self.colour()
        return Phrase(self.shape(after_colour_slot=colour is None), colour)


def _clean(text: str, what: str) -> str:
    if not isinstance(text, str):
        raise CaptionError(f"a {what} must be a string, got {type(text).__name__}")
    t = text.strip()
    if not t:
        raise CaptionError(f"the {what} is empty")
    if t != t.lower():
        raise CaptionError(f"cannot parse {what} {text!r}: the grammar is lower case")
    if " ".join(t.split()) != t:
        raise CaptionError(f"cannot parse {what} {text!r}: words must be separated by single spaces")
    return t


def parse_caption(text: str) -> Caption:
    """Parse a caption of the shapes-world grammar; `CaptionError` says where it does not fit."""
    t = _clean(text, "caption")
    background = "light"
    if t.endswith(DARK_SUFFIX):
        background, t = "dark", t[: -len(DARK_SUFFIX)]
    w = _Words(t, "caption")
    w.text = text.strip()
    first = w.peek()
    counts = {v: k for k, v in NUMBER_WORDS.items()}
    if first in counts:
        w.take(first)
        colour = w.colour()
        shape = w.shape(plural=True, after_colour_slot=colour is None)
        w.end()
        return Caption("count", (Phrase(shape, colour),) * counts[first], None, background)
    a = w.phrase(article=True)
    if w.peek() is None:
        return Caption("single", (a,), None, background)
    if w.peek() == "and":
        w.take("and")
        b = w.phrase(article=True)
        w.end()
        return Caption("and", (a, b), None, background)
    for rel in RELATIONS:
        n = len(rel.split(" "))
        if " ".join(w.words[w.i:w.i + n]) == rel:
            w.i += n
            b = w.phrase(article=True)
            w.end()
            return Caption("relation", (a, b), rel, background)
    raise w.fail("'and', a relation (" + ", ".join(RELATIONS) + ") or the end"
                 + ("" if "background" not in t else "; a background clause must read ' on a dark background'"))


def parse_instruction(text: str) -> Edit:
    """Parse an edit instruction; `CaptionError` says where it does not fit."""
    t = _clean(text, "instruction")
    w = _Words(t, "instruction")
    op = w.take("make", "add", "remove", "change")
    if op == "make":
        w.take("the")
        # `make the [COLOUR] SHAPE COLOUR`: the colour before the shape is optional.
        colour = w.colour()
        shape = w.shape(after_colour_slot=colour is None)
        new = w.take(*COLOURS)
        w.end()
        return Edit("recolour", Phrase(shape, colour), colour=new)
    if op == "add":
        p = w.phrase(article=True)
        w.end()
        return Edit("add", p)
    if op == "remove":
        w.take("the")
        colour = w.colour()
        p = Phrase(w.shape(after_colour_slot=colour is None), colour)
        w.end()
        return Edit("remove", p)
    for word in ("the", "background", "to"):
        w.take(word)
    bg = w.take(*BACKGROUNDS)
    w.end()
    return Edit("background", background=bg)


# ---------------------------------------------------------------------- sampling
def _pick(rng: np.random.Generator, seq: Sequence) -> Any:
    return seq[int(rng.integers(len(seq)))]


def _random_object(rng: np.random.Generator, size: int, shape: str, colour: str) -> SceneObject:
    d = int(round(rng.uniform(0.18 * size, 0.30 * size)))
    m = margin_px(size)
    x0 = int(rng.integers(m, size - m - d + 1))
    y0 = int(rng.integers(m, size - m - d + 1))
    return SceneObject(shape, colour, (x0, y0, x0 + d, y0 + d))


def place_objects(rng: np.random.Generator, size: int, specs: Sequence[tuple[str, str]],
                  existing: Sequence[SceneObject] = (), tries: int = 100) -> list[SceneObject] | None:
    """Place objects (shape, colour) by the placement rules next to `existing`; None if it failed."""
    placed = list(existing)
    gap = gap_px(size)
    for shape, colour in specs:
        for _ in range(tries):
            o = _random_object(rng, size, shape, colour)
            if all(boxes_apart(o.bbox, p.bbox, gap) for p in placed):
                placed.append(o)
                break
        else:
            return None
    return placed[len(existing):]


def sample_caption(rng: np.random.Generator, category: str, colour_prob: float | None = None,
                   dark_prob: float = 0.0) -> Caption:
    """A caption of `category`. colour_prob None follows the benchmark (colours only in `colors` and
    `color_attr`); otherwise each object phrase names a colour with that probability."""
    if category not in CATEGORIES:
        raise ValueError(f"unknown category {category!r}; expected one of {CATEGORIES}")

    def colour() -> str | None:
        give = category in ("colors", "color_attr") if colour_prob is None else rng.random() < colour_prob
        return _pick(rng, list(COLOURS)) if give else None

    background = "dark" if rng.random() < dark_prob else "light"
    if category in ("single_object", "colors"):
        return Caption("single", (Phrase(_pick(rng, SHAPES), colour()),), None, background)
    if category == "counting":
        n = int(rng.integers(2, MAX_OBJECTS + 1))
        return Caption("count", (Phrase(_pick(rng, SHAPES), colour()),) * n, None, background)
    a, b = (str(s) for s in rng.permutation(SHAPES)[:2])  # two different shapes
    pa, pb = Phrase(a, colour()), Phrase(b, colour())
    if category == "position":
        return Caption("relation", (pa, pb), _pick(rng, RELATIONS), background)
    return Caption("and", (pa, pb), None, background)


def scene_for_caption(rng: np.random.Generator, caption: Caption, size: int, tries: int = 1000) -> Scene:
    """A scene that `caption` describes exactly; free colours are drawn at random."""
    _check_size(size)
    for _ in range(tries):
        specs = [(p.shape, p.colour or _pick(rng, list(COLOURS))) for p in caption.objects]
        objs = place_objects(rng, size, specs)
        if objs is None:
            continue
        if caption.relation and not relation_holds(objs[0].centre, objs[1].centre, caption.relation, size, 1.0):
            continue
        return Scene(size, caption.background, tuple(objs))
    raise RuntimeError(f"could not place {caption!s} on a {size}px canvas in {tries} tries")


def sample_scene(rng: np.random.Generator, size: int, category: str, colour_prob: float | None = None,
                 dark_prob: float = 0.0) -> tuple[Scene, Caption]:
    caption = sample_caption(rng, category, colour_prob, dark_prob)
    return scene_for_caption(rng, caption, size), caption


def matching(objects: Sequence[SceneObject], phrase: Phrase) -> list[int]:
    """Indices of the objects that `phrase` describes."""
    return [i for i, o in enumerate(objects) if phrase.matches(o.shape, o.colour)]


def referring_phrase(rng: np.random.Generator, objects: Sequence[SceneObject], i: int) -> Phrase | None:
    """A phrase `the [COLOUR] SHAPE` that picks out exactly object i, or None if none does."""
    o = objects[i]
    bare, full = Phrase(o.shape), Phrase(o.shape, o.colour)
    if len(matching(objects, bare)) == 1:
        return full if rng.random() < 0.5 else bare
    return full if len(matching(objects, full)) == 1 else None


def apply_edit(scene: Scene, edit: Edit, added: SceneObject | None = None) -> Scene:
    """The target of `edit` on `scene` (for "add", the new object is `added`)."""
    objs = list(scene.objects)
    if edit.op == "background":
        return replace(scene, background=edit.background)
    if edit.op == "add":
        if added is None:
            raise ValueError("apply_edit: an 'add' edit needs the added object")
        return replace(scene, objects=tuple(objs + [added]))
    hits = matching(objs, edit.phrase)
    if len(hits) != 1:
        raise ValueError(f"'the {edit.phrase.words()}' picks out {len(hits)} objects of the scene, not one")
    i = hits[0]
    if edit.op == "remove":
        del objs[i]
    elif edit.op == "recolour":
        objs[i] = replace(objs[i], colour=edit.colour)
    else:
        raise ValueError(f"unknown edit op {edit.op!r}")
    return replace(scene, objects=tuple(objs))


def _try_edit(rng: np.random.Generator, source: Scene, op: str) -> tuple[Edit, Scene] | None:
    objs = source.objects
    if op == "background":
        edit = Edit("background", background="dark" if source.background == "light" else "light")
        return edit, apply_edit(source, edit)
    if op == "add":
        if len(objs) >= MAX_OBJECTS:
            return None
        shape, colour = _pick(rng, SHAPES), _pick(rng, list(COLOURS))
        new = place_objects(rng, source.size, [(shape, colour)], objs)
        if new is None:
            return None
        edit = Edit("add", Phrase(shape, colour if rng.random() < 0.5 else None))
        return edit, apply_edit(source, edit, new[0])
    if op == "remove" and len(objs) < 2:
        return None  # a target needs at least one object
    for i in rng.permutation(len(objs)):
        phrase = referring_phrase(rng, objs, int(i))
        if phrase is None:
            continue
        if op == "remove":
            edit = Edit("remove", phrase)
        else:
            edit = Edit("recolour", phrase, colour=_pick(rng, [c for c in COLOURS if c != objs[i].colour]))
        return edit, apply_edit(source, edit)
    return None


def sample_edit(rng: np.random.Generator, size: int, dark_prob: float = 0.3) -> tuple[Scene, Edit, Scene]:
    """(source scene, instruction, target scene) with one of the four edit kinds, chosen uniformly
    among those that fit the source."""
    _check_size(size)
    while True:
        n = int(rng.integers(1, MAX_OBJECTS + 1))
        specs = [(_pick(rng, SHAPES), _pick(rng, list(COLOURS))) for _ in range(n)]
        objs = place_objects(rng, size, specs)
        if objs is None:
            continue
        source = Scene(size, "dark" if rng.random() < dark_prob else "light", tuple(objs))
        for op in rng.permutation(EDIT_OPS):
            result = _try_edit(rng, source, str(op))
            if result is not None:
                return source, result[0], result[1]


def _check_size(size: int) -> None:
    if not isinstance(size, int) or size < 32 or size % 16:
        raise ValueError(f"canvas size must be a multiple of 16 and at least 32, got {size!r}")


# ---------------------------------------------------------------------- samples and dataset
@dataclass(frozen=True)
class ShapesSample:
    """One sample of the world: a captioned scene, or an edit (source, instruction, target)."""

    index: int
    scene: Scene  # the image (the target, for an edit)
    caption: str | None = None
    category: str | None = None
    source: Scene | None = None
    instruction: str | None = None

    @property
    def is_edit(self) -> bool:
        return self.source is not None


@dataclass(frozen=True)
class ShapesConfig:
    """What `make_sample` draws: canvas size, seed, and the caption/edit mixture."""

    size: int = 64
    seed: int = 0
    edits: bool = False
    categories: tuple[str, ...] = CATEGORIES
    colour_prob: float | None = 0.5  # None: the benchmark's colour rule per category
    dark_prob: float = 0.2

    def __post_init__(self) -> None:
        _check_size(self.size)
        bad = [c for c in self.categories if c not in CATEGORIES]
        if bad or not self.categories:
            raise ValueError(f"categories must be a non-empty subset of {CATEGORIES}, got {self.categories!r}")
        for name in ("colour_prob", "dark_prob"):
            p = getattr(self, name)
            if p is not None and not 0 <= p <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {p!r}")


def make_sample(config: ShapesConfig, index: int) -> ShapesSample:
    """Sample `index` of the world `config`: a pure function of (config, index)."""
    if index < 0:
        raise ValueError(f"sample index must be >= 0, got {index}")
    rng = np.random.default_rng([config.seed, index])
    if config.edits:
        source, edit, target = sample_edit(rng, config.size, config.dark_prob)
        return ShapesSample(index, target, source=source, instruction=str(edit))
    category = _pick(rng, config.categories)
    scene, caption = sample_scene(rng, config.size, category, config.colour_prob, config.dark_prob)
    return ShapesSample(index, scene, str(caption), category)


def to_pixels(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> contiguous (3, H, W) float32 in [-1, 1], the model's pixel convention.

    Done in numpy: it is as exact and, in a busy DataLoader worker, much faster
    than the same torch ops.
    """
    chw = np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32)
    return torch.from_numpy(chw / np.float32(127.5) - np.float32(1.0))


class ShapesDataset(StreamDataset):
    """The endless seeded shapes stream. Worker-safe: sample k is `make_sample(config, k)`.

    Rank r of R owns global indices r, r+R, r+2R, ... (its slots 0, 1, 2, ...);
    its DataLoader workers take turns over the slots not yet consumed. Samples:
    {"key", "caption", "pixels", "labels", "category"} or, with edits,
    {"key", "instruction", "source", "target", "labels"}; pixels are (3, S, S)
    in [-1, 1].
    """

    UNIT = "shapes"

    def __init__(self, size: int = 64, seed: int = 0, edits: bool = False,
                 categories: Sequence[str] = CATEGORIES, colour_prob: float | None = 0.5, dark_prob: float = 0.2,
                 rank: int | None = None, world_size: int | None = None) -> None:
        super().__init__(seed=seed, shuffle=False, rank=rank, world_size=world_size)
        self.config = ShapesConfig(size, seed, edits, tuple(categories), colour_prob, dark_prob)

    def _source_id(self) -> str:
        c = self.config
        return f"shapes(size={c.size}, edits={c.edits}, categories={list(c.categories)}, " \
               f"colour_prob={c.colour_prob}, dark_prob={c.dark_prob})"

    def _read(self, rank: int, world: int, wid: int, nw: int) -> Iterator[Record]:
        for slot in islice(self._todo(self.UNIT), wid, None, nw):
            k = rank + world * slot
            yield Record(self.UNIT, slot, f"{k:09d}", k)

    def _decode(self, record: Record) -> dict:
        s = make_sample(self.config, record.data)
        if s.is_edit:
            return {"instruction": s.instruction, "source": to_pixels(render(s.source)),
                    "target": to_pixels(render(s.scene)),
                    "labels": {"source": s.source.labels(), "target": s.scene.labels()}}
        return {"caption": s.caption, "pixels": to_pixels(render(s.scene)), "labels": s.scene.labels(),
                "category": s.category}
