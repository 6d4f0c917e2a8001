"""Drawing from the shapes world: captions of a benchmark category, scenes that a caption
describes exactly, and edits (source scene, instruction, target scene).

Every function draws from the `numpy` generator it is given and from nothing
else, so a sample is a pure function of the generator's seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from ..data.buckets import TOKEN_PIXELS
from .grammar import Caption, Edit, Phrase
from .world import (
    CATEGORIES,
    COLOURS,
    EDIT_OPS,
    MAX_OBJECTS,
    RELATIONS,
    SHAPES,
    Scene,
    SceneObject,
    boxes_apart,
    check_size,
    gap_px,
    margin_px,
    relation_holds,
)


def pick(rng: np.random.Generator, seq: Sequence) -> Any:
    """One element of `seq`, uniformly (one `integers` draw)."""
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
        return pick(rng, list(COLOURS)) if give else None

    background = "dark" if rng.random() < dark_prob else "light"
    if category in ("single_object", "colors"):
        return Caption("single", (Phrase(pick(rng, SHAPES), colour()),), None, background)
    if category == "counting":
        n = int(rng.integers(2, MAX_OBJECTS + 1))
        return Caption("count", (Phrase(pick(rng, SHAPES), colour()),) * n, None, background)
    a, b = (str(s) for s in rng.permutation(SHAPES)[:2])  # two different shapes
    pa, pb = Phrase(a, colour()), Phrase(b, colour())
    if category == "position":
        return Caption("relation", (pa, pb), pick(rng, RELATIONS), background)
    return Caption("and", (pa, pb), None, background)


def scene_for_caption(rng: np.random.Generator, caption: Caption, size: int, tries: int = 1000) -> Scene:
    """A scene that `caption` describes exactly; free colours are drawn at random."""
    check_size(size)
    for _ in range(tries):
        specs = [(p.shape, p.colour or pick(rng, list(COLOURS))) for p in caption.objects]
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


def raster_key(obj: SceneObject) -> tuple[int, int, int, int]:
    """Where the image tokens, read row by row, first reach `obj`: its first token, then its first pixel."""
    x0, y0 = obj.bbox[:2]
    return y0 // TOKEN_PIXELS, x0 // TOKEN_PIXELS, y0, x0


def in_raster_order(caption: Caption, scene: Scene) -> Caption:
    """`caption` with an "and" caption's two phrases in the order the image's tokens reach their
    objects (scene.objects[i] is phrase i's, as `scene_for_caption` places them); other captions as
    they are. Either order describes the scene; with this one, the first object the decoder draws is
    the first one named, so its shape and colour are fixed by the caption instead of left to the
    flow head's sample of a token that could start either object."""
    if caption.form != "and" or raster_key(scene.objects[0]) <= raster_key(scene.objects[1]):
        return caption
    return replace(caption, objects=caption.objects[::-1])


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
        shape, colour = pick(rng, SHAPES), pick(rng, list(COLOURS))
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
            edit = Edit("recolour", phrase, colour=pick(rng, [c for c in COLOURS if c != objs[i].colour]))
        return edit, apply_edit(source, edit)
    return None


def sample_edit(rng: np.random.Generator, size: int, dark_prob: float = 0.3) -> tuple[Scene, Edit, Scene]:
    """(source scene, instruction, target scene) with one of the four edit kinds, chosen uniformly
    among those that fit the source."""
    check_size(size)
    while True:
        n = int(rng.integers(1, MAX_OBJECTS + 1))
        specs = [(pick(rng, SHAPES), pick(rng, list(COLOURS))) for _ in range(n)]
        objs = place_objects(rng, size, specs)
        if objs is None:
            continue
        source = Scene(size, "dark" if rng.random() < dark_prob else "light", tuple(objs))
        for op in rng.permutation(EDIT_OPS):
            result = _try_edit(rng, source, str(op))
            if result is not None:
                return source, result[0], result[1]
