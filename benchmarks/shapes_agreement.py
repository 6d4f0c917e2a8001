"""Renderer vs checker agreement on the shapes world, per benchmark category.

For each category and canvas size, N seeded samples (benchmark colour rules, a
quarter on dark backgrounds) are rendered and checked three ways:
  clean     the render as is: must pass (target 100%)
  noisy     Gaussian noise (std 5), Gaussian blur (radius 0.6), then JPEG at quality 75: must pass (>= 99%)
  corrupt   a render of a scene the caption does not describe (one random corruption: background,
            missing/extra object, shape, named colour, swapped colours, mirrored relation): must FAIL (>= 99%)
An "edits" row does the same for (source, instruction, target) triplets with
`check_edit` (corruptions: target unchanged, an untouched object moved, an
extra object, the wrong background).

    python benchmarks/shapes_agreement.py [--num 2000] [--sizes 64 128] [--workers 2]
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from nextstep.shapes import CATEGORIES, check, check_edit, render_image, sample_edit, sample_scene
from nextstep.shapes.corrupt import corrupt, corrupt_edit, degrade


def run_chunk(size: int, category: str, start: int, stop: int) -> Counter:
    counts: Counter = Counter()
    for k in range(start, stop):
        rng = np.random.default_rng([2024, size, (CATEGORIES + ("edits",)).index(category), k])
        if category == "edits":
            src, edit, tgt = sample_edit(rng, size)
            s, t = render_image(src), render_image(tgt)
            counts["clean"] += check_edit(s, t, str(edit)).passed
            counts["noisy"] += check_edit(degrade(s, rng), degrade(t, rng), str(edit)).passed
            bad, _ = corrupt_edit(rng, src, edit, tgt)
            counts["corrupt_fail"] += not check_edit(s, render_image(bad), str(edit)).passed
        else:
            scene, caption = sample_scene(rng, size, category, None, dark_prob=0.25)
            image = render_image(scene)
            counts["clean"] += check(image, str(caption)).passed
            counts["noisy"] += check(degrade(image, rng), str(caption)).passed
            bad, _ = corrupt(rng, scene, caption)
            counts["corrupt_fail"] += not check(render_image(bad), str(caption)).passed
        counts["n"] += 1
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num", type=int, default=2000, help="samples per category and size")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    rows = CATEGORIES + ("edits",)
    chunk = 250
    jobs = [(s, c, a, min(a + chunk, args.num)) for s in args.sizes for c in rows for a in range(0, args.num, chunk)]
    t0 = time.perf_counter()
    totals: dict[tuple[int, str], Counter] = {}
    with ProcessPoolExecutor(args.workers) as pool:
        for job, counts in zip(jobs, pool.map(run_chunk, *zip(*jobs))):
            totals.setdefault(job[:2], Counter()).update(counts)
    elapsed = time.perf_counter() - t0

    print(f"shapes world: renderer vs checker, {args.num} seeded samples per category and size "
          f"({elapsed:.0f} s, {args.workers} processes)\n")
    header = f"| {'category':<14}| " + " | ".join(f"S={s} clean | S={s} noisy | S={s} corrupt fails"
                                                  for s in args.sizes) + " |"
    print(header)
    print("|" + "---|" * (1 + 3 * len(args.sizes)))
    worst = Counter({"clean": 1.0, "noisy": 1.0, "corrupt_fail": 1.0})
    for row in rows:
        cells = []
        for s in args.sizes:
            c = totals[(s, row)]
            for key in ("clean", "noisy", "corrupt_fail"):
                rate = c[key] / c["n"]
                if row != "edits":
                    worst[key] = min(worst[key], rate)
                cells.append(f"{100 * rate:.2f}%")
        print(f"| {row:<14}| " + " | ".join(cells) + " |")
    print(f"\nworst category: clean {100 * worst['clean']:.2f}% (target 100%), noisy {100 * worst['noisy']:.2f}% "
          f"(target >= 99%), corrupted failing {100 * worst['corrupt_fail']:.2f}% (target >= 99%)")


if __name__ == "__main__":
    main()
