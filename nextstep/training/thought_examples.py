"""Thought examples by rejection sampling: the thoughts after which a model drew its captions right.

For each caption the model writes n thoughts (at the settings' `text_temperature`; above 0 they
differ), draws an image after each as at inference, and a reward scores the images. The best image of
a caption, if it scores at least `min_score`, becomes a training example: caption, thought and image,
one line of a text-to-image JSONL manifest (`{"file", "caption", "plan", ...}`) that a `kind =
"files"` data source reads (the thought as the row's plan). Trained on with the drawing held (`[train]
hold_images`), the text path learns to write the thoughts its own drawing gets right: rejection-
sampling fine-tuning, STaR's idea applied to a plan before an image (docs/self-cot.md).

A reward that judges the image against the caption alone keeps images that do not show their own
thought ("three circles" after "red circle top left, ..." drawn in orange), and training on them
teaches the drawing that a thought is a loose hint. `keep_agreeing` (`python -m
nextstep.training.thought_examples MANIFEST ...`) keeps the lines whose image shows its thought, or
with `--relabel` replaces a thought by the plan its image shows where that plan fits the caption.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..io.atomic import atomic_write
from ..settings import SEED_MODULUS
from .preferences import IMAGES

EXAMPLES_FILE = "manifest.jsonl"


def make_thought_examples(pipe: Any, prompts: Sequence[str], seeds: Sequence[int], n: int, settings: Any,
                          reward: Callable[..., Sequence[float]], out: Path, min_score: float = 1.0,
                          extra: Sequence[dict[str, Any]] | None = None, batch_images: int = 64,
                          progress: bool = False, agrees: Callable[[Any, str], bool] | None = None
                          ) -> dict[str, Any]:
    """n thoughts and images per caption with `pipe` (image k of caption i from seed seeds[i] + k), scored
    with `reward(images, prompts, sources)`; each caption's best image (the first of equals) scoring at
    least `min_score` is written with its thought: OUT/images/*.png, then OUT/manifest.jsonl (atomically,
    last). With `agrees(image, thought)`, only images that show their thought are candidates. `extra[i]`
    is merged into caption i's line. Returns a summary."""
    from .rewards import checked_scores

    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not settings.thinks(edit=False):
        raise ValueError("thought examples are drawn after thoughts: use settings that think for captions")
    (out / IMAGES).mkdir(parents=True, exist_ok=True)
    lines: dict[int, dict[str, Any]] = {}
    all_scores: list[float] = []
    for i, images, thoughts in pipe.iter_generate(list(prompts), settings, list(seeds), n, None, batch_images,
                                                  progress):
        scores = checked_scores(reward(images, [prompts[i]] * n, [None] * n), n, "reward")
        all_scores += scores
        candidates = [k for k in range(n) if agrees is None or agrees(images[k], thoughts[k])]
        best = max(candidates, key=lambda k: scores[k], default=None)
        if best is None or scores[best] < min_score or not thoughts[best].strip():
            continue
        name = f"{i:06d}.png"
        atomic_write(out / IMAGES / name, lambda tmp, im=images[best]: im.save(tmp, format="PNG"))
        lines[i] = {"file": f"{IMAGES}/{name}", "caption": prompts[i], "plan": thoughts[best],
                    "score": scores[best], "seed": (seeds[i] + best) % SEED_MODULUS, **(extra[i] if extra else {})}
    text = "".join(json.dumps(lines[i]) + "\n" for i in sorted(lines))
    atomic_write(out / EXAMPLES_FILE, lambda tmp: Path(tmp).write_text(text))
    return {"prompts": len(prompts), "images": len(all_scores), "examples": len(lines),
            "mean_score": sum(all_scores) / len(all_scores), "file": str(out / EXAMPLES_FILE)}


def keep_agreeing(manifest: Path, out: Path, relabel: bool = False) -> dict[str, int]:
    """Write to `out` (beside `manifest`, whose image paths are relative to its folder) the lines of
    `manifest` whose image shows its thought (the shapes world's `image_agrees_with_thought`). With
    `relabel`, a line whose image shows another plan that also fits its caption is kept with that
    plan as its thought (hindsight: the thought the image was drawn after is what it shows), and
    only lines whose image shows no such plan are dropped. Returns how many lines were read, kept
    as they were, and relabelled."""
    from PIL import Image

    from ..shapes.detector import detect
    from ..shapes.plan import detection_plan, image_agrees_with_thought, thought_agrees_with_caption

    if out.resolve().parent != manifest.resolve().parent:
        raise ValueError(f"{out} must be in {manifest.parent}: the manifest's image paths are relative to it")
    if out.resolve() == manifest.resolve():
        raise ValueError(f"{out} is the manifest itself: write the kept lines to a new file")
    lines = [line for line in manifest.read_text().splitlines() if line.strip()]
    kept, relabelled = [], 0
    for k, line in enumerate(lines, 1):
        row = json.loads(line)
        if "plan" not in row or "file" not in row or "caption" not in row:
            raise ValueError(f"{manifest}:{k} has no 'file', 'caption' and 'plan': not a thought-examples manifest")
        with Image.open(manifest.parent / row["file"]) as im:
            detection = detect(im.convert("RGB"))
        if image_agrees_with_thought(detection, row["plan"]):
            kept.append(line + "\n")
            continue
        shown = detection_plan(detection)
        if relabel and all(o.colour and o.shape for o in shown.objects) and thought_agrees_with_caption(
                shown, row["caption"]):
            kept.append(json.dumps({**row, "plan": str(shown), "drawn_after": row["plan"]}) + "\n")
            relabelled += 1
    atomic_write(out, lambda tmp: Path(tmp).write_text("".join(kept)))
    return {"read": len(lines), "kept": len(kept) - relabelled, "relabelled": relabelled}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Keep the thought examples whose image shows its thought: for "
                                            "each MANIFEST, write NAME-agrees.jsonl beside it (with "
                                            "--relabel, NAME-relabelled.jsonl).")
    p.add_argument("manifests", type=Path, nargs="+", metavar="MANIFEST", help="a thought-examples manifest")
    p.add_argument("--relabel", action="store_true",
                   help="keep an example whose image shows another plan that fits its caption, with that plan")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    args = p.parse_args(argv)
    for manifest in args.manifests:
        out = manifest.with_name(f"{manifest.stem}-{'relabelled' if args.relabel else 'agrees'}.jsonl")
        if out.exists() and not args.overwrite:
            p.error(f"{out} exists; pass --overwrite to replace it")
        n = keep_agreeing(manifest, out, args.relabel)
        print(f"{out}: of {n['read']} examples, {n['kept']} kept (the image shows its thought)"
              + (f", {n['relabelled']} relabelled with the plan their image shows" if args.relabel else ""),
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
