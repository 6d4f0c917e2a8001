"""Plans: the thought the shapes model is trained to write before it draws (self-CoT, docs/self-cot.md).

A plan is a canonical description of a scene made from the renderer's labels: every
object as "COLOUR SHAPE ROW COLUMN", its cell on a 3x3 grid of the canvas taken from
its box centre, the objects in reading order (row, column, then x, y), joined by
", ", then " on a dark background" if the background is dark; a scene without objects
is "nothing". It commits to the colours and places a caption leaves open:

    "red circle top left, blue square bottom centre on a dark background"

For an edit the plan describes the target scene (the intended result). The eval
(`nextstep eval shapes|edits --think`) reads a generated thought with `parse_plan` and
asks two questions: does the thought satisfy the caption (`thought_agrees_with_caption`),
and does the image show what the thought says (`image_agrees_with_thought`)?
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .checker import _assign
from .detector import Detection, detect
from .grammar import Caption, parse_caption
from .world import COLOURS, DARK_SUFFIX, SHAPES, Scene

ROWS = ("top", "middle", "bottom")
COLUMNS = ("left", "centre", "right")
NOTHING = "nothing"  # the plan of a scene without objects
SEPARATOR = ", "


def cell(centre: tuple[float, float], size: int) -> tuple[int, int]:
    """(row, column) index on the 3x3 grid of a `size` px canvas of a box centre (cx, cy)."""
    cx, cy = centre
    return min(2, int(3 * cy / size)), min(2, int(3 * cx / size))


@dataclass(frozen=True)
class PlannedObject:
    colour: str | None  # None only for a detected object of no palette colour (never in a parsed plan)
    shape: str | None
    row: int  # 0 top, 1 middle, 2 bottom
    column: int  # 0 left, 1 centre, 2 right

    def __str__(self) -> str:
        return f"{self.colour} {self.shape} {ROWS[self.row]} {COLUMNS[self.column]}"


@dataclass(frozen=True)
class Plan:
    objects: tuple[PlannedObject, ...]
    background: str = "light"

    def __str__(self) -> str:
        text = SEPARATOR.join(map(str, self.objects)) or NOTHING
        return text + (DARK_SUFFIX if self.background == "dark" else "")

    def contents(self) -> tuple[Counter, str | None]:
        """What two plans must share to agree: the multiset of (colour, shape, cell), and the background."""
        return Counter((o.colour, o.shape, o.row, o.column) for o in self.objects), self.background


def _planned(objects: list[tuple[str | None, str | None, tuple[float, float]]], size: int) -> list[PlannedObject]:
    """Objects given as (colour, shape, centre), in the plan's order: cell, then x, then y."""
    keyed = sorted((cell(c, size), c[0], c[1], colour or "", shape or "", colour, shape)
                   for colour, shape, c in objects)
    return [PlannedObject(colour, shape, rc[0], rc[1]) for rc, _, _, _, _, colour, shape in keyed]


def scene_plan(scene: Scene) -> Plan:
    """The plan of a scene (its labels)."""
    objects = _planned([(o.colour, o.shape, o.centre) for o in scene.objects], scene.size)
    return Plan(tuple(objects), scene.background)


def plan_text(scene: Scene) -> str:
    """The plan of a scene as text, e.g. "red circle top left, blue square bottom centre"."""
    return str(scene_plan(scene))


def detection_plan(detection: Detection) -> Plan:
    """What a detection shows, as a plan (objects of no known colour or shape keep None there)."""
    objects = _planned([(o.colour, o.shape, o.centre) for o in detection.objects], detection.size)
    return Plan(tuple(objects), detection.background)


def parse_plan(text: str) -> Plan | None:
    """The plan `text` states, or None if it is not a plan (any object order is accepted)."""
    if not isinstance(text, str):
        return None
    t = text.strip()
    background = "light"
    if t.endswith(DARK_SUFFIX):
        background, t = "dark", t[: -len(DARK_SUFFIX)]
    if t == NOTHING:
        return Plan((), background)
    objects = []
    for item in t.split(SEPARATOR):
        words = item.split(" ")
        if len(words) != 4:
            return None
        colour, shape, row, column = words
        if colour not in COLOURS or shape not in SHAPES or row not in ROWS or column not in COLUMNS:
            return None
        objects.append(PlannedObject(colour, shape, ROWS.index(row), COLUMNS.index(column)))
    return Plan(tuple(objects), background)


def _as_plan(plan: Plan | str | None) -> Plan | None:
    return plan if isinstance(plan, Plan) else parse_plan(plan)


def _cells_relate(a: PlannedObject, b: PlannedObject, relation: str) -> bool:
    """A caption's relation on grid cells: left of = a smaller column, above = a smaller row (strictly)."""
    if relation == "to the left of":
        return a.column < b.column
    if relation == "to the right of":
        return a.column > b.column
    if relation == "above":
        return a.row < b.row
    if relation == "below":
        return a.row > b.row
    raise ValueError(f"unknown relation {relation!r}")


def thought_agrees_with_caption(plan: Plan | str | None, caption: str | Caption) -> bool:
    """Whether the plan (or the thought's text) satisfies the caption: the same background, as many
    objects as the caption's phrases, matched one to one (shape, and colour where given), with the
    caption's relation holding between the matched objects' cells. A thought that is no plan fails;
    a caption outside the grammar is a `CaptionError` (it is the eval's input, not the model's)."""
    p = _as_plan(plan)
    if p is None:
        return False
    cap = parse_caption(caption) if isinstance(caption, str) else caption
    if p.background != cap.background or len(p.objects) != len(cap.objects):
        return False

    def relation_ok(pairing: list[int]) -> bool:
        return cap.relation is None or _cells_relate(p.objects[pairing[0]], p.objects[pairing[1]], cap.relation)

    return _assign(cap.objects, p.objects, relation_ok) is not None


def image_agrees_with_thought(image: Detection | Image.Image | np.ndarray, plan: Plan | str | None) -> bool:
    """Whether the image (or its detection) shows what the plan says: the same background and the
    same multiset of (colour, shape, cell). A thought that is no plan fails."""
    p = _as_plan(plan)
    if p is None:
        return False
    detection = image if isinstance(image, Detection) else detect(image)
    return detection_plan(detection).contents() == p.contents()
