"""The shapes-world checker: judge an image against a caption, or a source and target image
against an edit instruction, from what `detector.detect` finds.

Judging follows the spec: the image passes when the detected background is the
caption's, every object is a known shape in a palette colour, and the objects
can be matched one-to-one to the caption's phrases (shape, and colour where
given) with the relation holding. An edit passes when its object phrase picks
out exactly one source object and the target holds exactly the source's objects
with that one change, every other object within `tolerance` pixels of its
source box.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .detector import Detected, Detection, detect
from .grammar import Caption, Edit, Phrase, parse_caption, parse_instruction
from .world import relation_holds


@dataclass(frozen=True)
class CheckResult:
    passed: bool
    reason: str  # "ok", or what is wrong
    detection: Detection

    def __bool__(self) -> bool:
        return self.passed


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
