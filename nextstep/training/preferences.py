"""Preference pairs for the DPO stage: making a pair file from a model's own samples, reading one,
and turning pairs into model batches.

A pair file is JSONL, one pair a line:

    {"prompt": "a red circle", "chosen": "p/0_chosen.png", "rejected": "p/0_rejected.png"}
    {"prompt": "make the red circle blue", "source": "p/1_source.png", "chosen": ..., "rejected": ...}

`prompt` is the caption (or, with `source`, the edit instruction); `chosen` is the
preferred image, `rejected` the other; relative paths are relative to the pair
file's folder. An optional `thought` (self-CoT, docs/self-cot.md) is the text both
images were drawn after: their rows read prompt + THOUGHT_OPEN + thought. Other
keys (scores, a category) are allowed and ignored. The chosen and rejected images
of a pair must have the same size: DPO compares them at the same noise. The whole
file is checked when it is opened (every line parses, every image exists and is
readable), and all problems are named at once, so a bad file fails before any
compute.

Which pairs a step trains on is a function of (seed, step) alone: the pairs are
walked in a seeded order, a new order each epoch, `batch_size` pairs per step.
A resumed run therefore needs no data position, and N ranks split each step's
pairs between them.

`make_pairs` writes such a file from a model's own samples: n images per prompt,
scored by a reward (`nextstep.training.rewards`), the best paired against the
worst where their scores differ (`nextstep data preferences` does it for the
shapes world with its checker).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from PIL import Image

from ..data import Collator
from ..io.atomic import atomic_write
from ..io.images import load_rgb, pil_to_pixels
from ..settings import SEED_MODULUS

REQUIRED = ("prompt", "chosen", "rejected")
MAX_LISTED = 10  # problems named in one error; the rest are counted


class PreferenceError(ValueError):
    """A pair file that cannot be trained on; the message names the file, line and problem."""


@dataclass(frozen=True)
class Pair:
    """One preference: for `prompt` (and its `source` image, for an edit), `chosen` over `rejected`."""

    index: int  # the pair's number in the file (0-based), which also keys its random draws
    line: int  # 1-based line of the pair file, for messages
    prompt: str
    chosen: Path
    rejected: Path
    source: Path | None = None
    thought: str | None = None  # both images were drawn after it (self-CoT)


def _image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the image's header (no decoding); ValueError if it is not a readable image."""
    try:
        with Image.open(path) as im:
            return im.size
    except (OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"not a readable image ({e or type(e).__name__})") from None


def read_pairs(path: str | Path) -> list[Pair]:
    """Every pair of the JSONL file `path`, checked (see the module doc); PreferenceError otherwise."""
    path = Path(path)
    if not path.is_file():
        raise PreferenceError(f"preference file {path} does not exist")
    base = path.parent
    pairs: list[Pair] = []
    problems: list[str] = []
    with open(path, encoding="utf-8") as f:
        for number, text in enumerate(f, start=1):
            if not text.strip():
                continue
            where = f"{path}:{number}"
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                problems.append(f"{where}: not valid JSON ({e.msg})")
                continue
            if not isinstance(obj, dict):
                problems.append(f"{where}: expected a JSON object, got {type(obj).__name__}")
                continue
            missing = [k for k in REQUIRED if k not in obj]
            if missing:
                problems.append(f"{where}: missing {missing} (a pair needs {list(REQUIRED)}, and 'source' "
                                "for an edit)")
                continue
            bad = [k for k in (*REQUIRED, "source", "thought")
                   if k in obj and not (isinstance(obj[k], str) and obj[k].strip())]
            if bad:
                problems.append(f"{where}: {bad} must be non-empty strings")
                continue
            files = {k: (base / obj[k]) if not Path(obj[k]).is_absolute() else Path(obj[k])
                     for k in ("chosen", "rejected", "source") if k in obj}
            sizes = {}
            for k, p in files.items():
                if not p.is_file():
                    problems.append(f"{where}: {k} image {p} does not exist")
                    continue
                try:
                    sizes[k] = _image_size(p)
                except ValueError as e:
                    problems.append(f"{where}: {k} image {p} is {e}")
            if "chosen" in sizes and "rejected" in sizes and sizes["chosen"] != sizes["rejected"]:
                (cw, ch), (rw, rh) = sizes["chosen"], sizes["rejected"]
                problems.append(f"{where}: chosen is {cw}x{ch} px but rejected {rw}x{rh} px (a pair is compared "
                                "at the same noise, so both must have one size)")
            if len(sizes) == len(files):
                pairs.append(Pair(len(pairs), number, obj["prompt"], files["chosen"], files["rejected"],
                                  files.get("source"), obj.get("thought")))
    if problems:
        more = f" (and {len(problems) - MAX_LISTED} more)" if len(problems) > MAX_LISTED else ""
        raise PreferenceError(f"preference file {path}: {len(problems)} problem(s): "
                              + "; ".join(problems[:MAX_LISTED]) + more)
    if not pairs:
        raise PreferenceError(f"preference file {path} holds no pairs")
    return pairs


def read_pair_files(paths: list[str | Path]) -> list[Pair]:
    """The pairs of every file in `paths`, in order, as one set: each file's image paths relative to it,
    and `index` (which keys a pair's random draws) counted over the set, so no two pairs share draws."""
    pairs = [pair for path in paths for pair in read_pairs(path)]
    return [replace(pair, index=k) for k, pair in enumerate(pairs)]


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The order pairs are walked in during `epoch`: a seeded shuffle of range(n)."""
    order = list(range(n))
    random.Random(f"dpo-pairs:{seed}:{epoch}").shuffle(order)
    return order


def pairs_for(n: int, seed: int, step: int, batch_size: int, start: int, count: int) -> list[int]:
    """Indices of the pairs at positions start .. start+count-1 of step `step`'s `batch_size` pairs.

    Position p of the endless walk is pair `epoch_order(n, seed, p // n)[p % n]`. A rank
    or micro-batch takes its slice of the step's positions, so the split never changes
    which pairs a step sees.
    """
    if start < 0 or count < 0 or start + count > batch_size:
        raise ValueError(f"positions {start}..{start + count - 1} are outside a batch of {batch_size}")
    orders: dict[int, list[int]] = {}
    out = []
    for p in range(step * batch_size + start, step * batch_size + start + count):
        epoch = p // n
        if epoch not in orders:
            orders[epoch] = epoch_order(n, seed, epoch)
        out.append(orders[epoch][p % n])
    return out


def _pixels(path: Path, what: str, pair: Pair) -> Any:
    try:
        return pil_to_pixels(load_rgb(path))
    except ValueError as e:
        raise PreferenceError(f"pair on line {pair.line}: {what} image {path}: {e}") from None


def pair_batch(pairs: list[Pair], collator: Collator) -> dict[str, Any]:
    """One batch of 2 * len(pairs) rows: the pairs' chosen rows first, then their rejected rows in the same
    order, so row i and row len(pairs) + i hold one pair. Built by `collator` (use one without caption
    dropout: a preference is about the prompt). `batch["pairs"]` holds the pairs' indices."""
    samples = []
    for side in ("chosen", "rejected"):
        for pair in pairs:
            image = _pixels(getattr(pair, side), side, pair)
            sample = {"key": f"{pair.index}:{side}"}
            if pair.thought is not None:
                sample["plan"] = pair.thought  # the collator's name for text between prompt and image
            if pair.source is None:
                sample.update(caption=pair.prompt, pixels=image)
            else:
                sample.update(instruction=pair.prompt, target=image, source=_pixels(pair.source, "source", pair))
            samples.append(sample)
    batch = collator(samples)
    if batch["skipped"]:
        first = batch["skipped"][0].split(":")[0]
        line = next(p.line for p in pairs if str(p.index) == first)
        raise PreferenceError(f"pair on line {line} cannot be made into a model row (image sides must be "
                              f"multiples of {collator.token_pixels} px; see the warning above)")
    batch["pairs"] = [p.index for p in pairs]
    return batch


PAIR_FILE = "pairs.jsonl"
IMAGES = "images"  # the pair file's images, in this subfolder next to it


def make_pairs(pipe: Any, prompts: Sequence[str], seeds: Sequence[int], n: int, settings: Any,
               reward: Callable[..., Sequence[float]], out: Path, sources: Sequence[Image.Image] | None = None,
               extra: Sequence[dict[str, Any]] | None = None, batch_images: int = 64,
               progress: bool = False, truths: Sequence[Image.Image] | None = None) -> dict[str, Any]:
    """Sample n images per prompt with `pipe` (image k of prompt i from seed seeds[i] + k), score them
    with `reward(images, prompts, sources)`, and write a pair (best, worst) for every prompt whose
    scores differ: OUT/images/*.png, then OUT/pairs.jsonl (atomically, last). `extra[i]` is merged
    into prompt i's line. Returns a summary (counts, mean score, share of perfect scores).

    Where `settings` think for the prompts' kind, a pair's two images were drawn after one thought,
    which its line records: the rejected image is the worst of those that share the best image's
    thought (greedy thoughts, `text_temperature=0`, give every image of a caption the same one), and
    a prompt whose best image had an empty thought gives no pair.

    With `truths` (a true image for every prompt, such as the shapes renderer's), the chosen image is
    prompt i's truth and the rejected its worst sample, for every prompt whose worst sample scores below
    1: the model's own failures against what it should have drawn, so prompts where every sample fails
    alike give pairs too (SPIN-Diffusion's self-play pairs, judged by the reward)."""
    from .rewards import checked_scores

    least = 1 if truths is not None else 2  # with truths, one sample is the rejected side
    if n < least:
        raise ValueError(f"a pair needs at least {least} image(s) per prompt, got n={n}")
    if truths is not None and len(truths) != len(prompts):
        raise ValueError(f"{len(truths)} true images for {len(prompts)} prompts")
    thinking = settings.thinks(edit=sources is not None)
    if thinking and truths is not None:
        raise ValueError("true images were not drawn after a thought: make truth pairs without thinking")
    (out / IMAGES).mkdir(parents=True, exist_ok=True)
    lines: dict[int, dict[str, Any]] = {}
    all_scores: list[float] = []

    def save(image: Image.Image, name: str) -> str:
        atomic_write(out / IMAGES / name, lambda tmp: image.save(tmp, format="PNG"))
        return f"{IMAGES}/{name}"

    unwritable = 0  # prompts whose best image had an empty thought
    for i, images, thoughts in pipe.iter_generate(list(prompts), settings, list(seeds), n, sources, batch_images,
                                                  progress):
        source = None if sources is None else sources[i]
        scores = checked_scores(reward(images, [prompts[i]] * n, [source] * n), n, "reward")
        all_scores += scores
        best = max(range(n), key=lambda k: scores[k])  # the first of equals: a function of the seeds
        thought = thoughts[best] if thinking else None
        if thought == "":
            unwritable += 1  # a training row cannot hold an empty thought
            continue
        worst = min((k for k in range(n) if thoughts[k] == thoughts[best]), key=lambda k: scores[k])
        if truths is not None:
            if scores[worst] >= 1.0:
                continue  # every sample is right
            chosen, best_score, best_seed = truths[i], 1.0, None
        elif scores[best] == scores[worst]:
            continue  # nothing to prefer
        else:
            chosen, best_score, best_seed = images[best], scores[best], (seeds[i] + best) % SEED_MODULUS
        line = {"prompt": prompts[i], "chosen": save(chosen, f"{i:06d}_chosen.png"),
                "rejected": save(images[worst], f"{i:06d}_rejected.png")}
        if source is not None:
            line["source"] = save(source, f"{i:06d}_source.png")
        if thought is not None:
            line["thought"] = thought
        lines[i] = {**line, "scores": [best_score, scores[worst]],
                    "seeds": [best_seed, (seeds[i] + worst) % SEED_MODULUS], **(extra[i] if extra else {})}
    text = "".join(json.dumps(lines[i]) + "\n" for i in sorted(lines))
    atomic_write(out / PAIR_FILE, lambda tmp: Path(tmp).write_text(text))
    return {"prompts": len(prompts), "images": len(all_scores), "pairs": len(lines), "empty_thoughts": unwritable,
            "mean_score": sum(all_scores) / len(all_scores),
            "perfect": sum(s == 1.0 for s in all_scores) / len(all_scores), "file": str(out / PAIR_FILE)}
