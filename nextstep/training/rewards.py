"""Rewards for GRPO: a callable `reward(images, prompts, sources) -> scores in [0, 1]`, one per image.

`images` are the sampled PIL images, `prompts` their captions (or edit
instructions), `sources` the source image of each edit (None for text to
image). Built in: "shapes", the shapes-world checker with partial credit.
Any other reward is named "module:function" in `[grpo] reward` and imported
from the Python path (see docs/post-training.md): e.g. a PickScore-like model
or an OCR check, loaded once when the stage starts.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence

from PIL import Image

from ..shapes.checker import check, check_edit
from ..shapes.detector import detect
from ..shapes.grammar import parse_caption
from ..shapes.world import relation_holds

Reward = Callable[[Sequence[Image.Image], Sequence[str], Sequence[Image.Image | None]], Sequence[float]]


def caption_score(image: Image.Image, caption: str) -> float:
    """The fraction of the caption's checks that hold: 1.0 exactly when `check` passes.

    Checks: the background; no object outside the known shapes and palette; the
    object count; each object phrase matched by its own detected object (the most
    phrases any one-to-one matching satisfies); the relation, for captions with one.
    """
    if check(image, caption).passed:
        return 1.0
    cap, det = parse_caption(caption), detect(image)
    phrases = list(cap.objects)
    held = [det.background == cap.background,
            all(o.shape is not None and o.colour is not None for o in det.objects),
            len(det.objects) == len(phrases)]
    matching = _largest_matching(phrases, det.objects)
    held += [i < len(matching) for i in range(len(phrases))]  # how many phrases found their object
    if cap.relation is not None:
        both = 0 in matching and 1 in matching
        held.append(both and relation_holds(det.objects[matching[0]].centre, det.objects[matching[1]].centre,
                                            cap.relation, det.size))
    score = sum(held) / len(held)
    # Never a full score without a pass (the one-to-one matching above ignores the relation).
    return min(score, (len(held) - 1) / len(held))


def _largest_matching(phrases: list, objects: Sequence) -> dict[int, int]:
    """phrase -> object of a largest one-to-one matching of phrases to objects that fit them.

    Augmenting paths (Kuhn's algorithm); phrases are at most a handful, so this is instant.
    """
    owner: dict[int, int] = {}  # object -> phrase

    def augment(i: int, seen: set[int]) -> bool:
        for j, o in enumerate(objects):
            if j in seen or not phrases[i].matches(o.shape, o.colour):
                continue
            seen.add(j)
            if j not in owner or augment(owner[j], seen):
                owner[j] = i
                return True
        return False

    for i in range(len(phrases)):
        augment(i, set())
    return {i: j for j, i in owner.items()}


def shapes_reward(images: Sequence[Image.Image], prompts: Sequence[str],
                  sources: Sequence[Image.Image | None]) -> list[float]:
    """The shapes world's checker: partial credit for captions, pass (1) or fail (0) for edits."""
    return [float(check_edit(src, im, p).passed) if src is not None else caption_score(im, p)
            for im, p, src in zip(images, prompts, sources, strict=True)]


BUILT_IN: dict[str, Reward] = {"shapes": shapes_reward}


def load_reward(name: str) -> Reward:
    """A built-in reward by name, or `module:function` imported from the Python path."""
    if name in BUILT_IN:
        return BUILT_IN[name]
    module_name, sep, attr = name.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"reward {name!r}: use one of {sorted(BUILT_IN)} or 'module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"reward {name!r}: cannot import {module_name!r} ({e})") from e
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"reward {name!r}: {module_name} has no callable {attr!r}")
    return fn


def checked_scores(scores: Sequence[float], n: int, name: str) -> list[float]:
    """A reward's output, checked: n finite numbers in [0, 1]."""
    scores = [float(s) for s in scores]
    if len(scores) != n:
        raise ValueError(f"reward {name!r} returned {len(scores)} scores for {n} images")
    bad = [s for s in scores if not 0 <= s <= 1]
    if bad:
        raise ValueError(f"reward {name!r} returned scores outside [0, 1]: {bad[:5]}")
    return scores
