"""Which of a two-object caption's objects does the model draw first, and does it matter?

    python research/raster_order.py --model DIR [--prompts N] [--seed S]

The image tokens are drawn row by row. For "a red circle and a blue square" the first token that
starts an object could start either one, and the caption does not say which: the flow head's sample
of that token decides the shape, and the colour should follow. A model that has not bound each colour
to its shape draws the first object with either colour (or one between them). Training captions that
name first the object the tokens reach first (`raster_order = true`; two trials in
docs/shapes-model-notes.md) make that choice the caption's.

For N captions of the `two_object` and `color_attr` categories (the training stream's seeds, never
the benchmark's), one image each at the model's defaults: the share of images with two objects whose
first object in raster order (`nextstep.shapes.sampling.raster_key`) has the first-named shape, and
the checker's pass rate on those images and on the others.

Measured (256 captions, seed 1000, AMD EPYC, 2026-12-03): v14 (stage 21) drew the first-named object
first in 52% of its two-object images, and those passed 0.504 against 0.353 for the others (0.418
overall); the first trial (v14 + 1000 supervised steps with raster-ordered captions) 71%, passing 0.386
against 0.296 (0.348 overall: the supervised steps also undid part of the DPO rounds).
"""

from __future__ import annotations

import argparse

from nextstep.pipeline import NextStepPipeline
from nextstep.shapes import check, detect, parse_caption
from nextstep.shapes.dataset import ShapesConfig, make_sample
from nextstep.shapes.sampling import raster_key
from nextstep.shapes.world import SceneObject


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--seed", type=int, default=1000)
    args = ap.parse_args()
    pipe = NextStepPipeline.from_pretrained(args.model)
    world = ShapesConfig(size=64, seed=args.seed, colour_prob=None, dark_prob=0.3,
                         categories=("two_object", "color_attr"))
    captions = [make_sample(world, i).caption for i in range(args.prompts)]
    images = [group[0] for group in pipe.generate(captions, pipe.settings, seeds=list(range(len(captions))))]
    passed = {True: [], False: []}  # first-drawn object has the first-named shape -> pass or not
    for caption, image in zip(captions, images):
        objects = [o for o in detect(image).objects if o.shape and o.bbox]
        if len(objects) != 2:
            continue
        first = min(objects, key=lambda o: raster_key(SceneObject(o.shape, o.colour or "", tuple(o.bbox))))
        passed[first.shape == parse_caption(caption).objects[0].shape].append(check(image, caption).passed)
    two = len(passed[True]) + len(passed[False])
    print(f"{args.model}: {two} of {len(captions)} images with two objects; first-named drawn first in "
          f"{len(passed[True]) / max(two, 1):.1%}")
    for key, name in ((True, "first-named first"), (False, "other order")):
        print(f"  {name}: {len(passed[key])} images, passed {sum(passed[key]) / max(len(passed[key]), 1):.3f}")


if __name__ == "__main__":
    main()
