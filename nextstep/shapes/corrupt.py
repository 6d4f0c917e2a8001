"""Test tooling for the checker: damaged renders and scenes that a caption or edit does NOT describe.

`degrade` adds mild real-world damage (noise, blur, JPEG); `corrupt` and
`corrupt_edit` make wrong scenes on purpose, so that tests and
`benchmarks/shapes_agreement.py` can measure how often the checker rejects them.
"""

from __future__ import annotations

import io
from dataclasses import replace

import numpy as np
from PIL import Image, ImageFilter

from .grammar import Caption, Edit
from .sampling import place_objects
from .world import COLOURS, MAX_OBJECTS, SHAPES, Scene, SceneObject, boxes_apart, gap_px, margin_px


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
