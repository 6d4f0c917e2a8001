"""GenEval-style benchmarks on the shapes world: generate from a fixed, seeded prompt set and judge
every image with the checker of `nextstep.shapes.checker`.

`run_shapes_benchmark`: N prompts per category for the six categories of
shapes-world.md, drawn by the caption grammar with the benchmark's colour rule
(colours only in `colors` and `color_attr`), all on a light background; n
images per prompt, each judged by `check`. `run_edits_benchmark`: N cases per
edit kind (recolour, add, remove, background), each a rendered source scene and
an instruction as `sample_edit` draws them (1-4 objects, some on a dark
background); n edits per case, judged by `check_edit`. A category's score is
the fraction of its images that pass; the overall score is the mean over
categories.

Prompt (case) i of category c comes from its own RNG, seeded with (seed, c, i),
so the set depends only on the seed (and, for edits, the canvas size), and a
larger set starts with the smaller one. The sets repeat captions (40
single-object prompts are a handful of distinct captions), so each prompt
instance also gets its own generation seed, from (seed, c, i) too: repeats are
new samples, not copies. Image k of an instance is the image of its seed + k,
as everywhere (`NextStepPipeline.generate`), and the report states how many
distinct images each score rests on. With `out`, the report goes to
`out/report.json` and one PNG grid per category to `out/<category>.png`: a row
per prompt (for edits: the source first, grey border), each image framed green
(passed) or red (failed).

With `settings.think` (`think_edits` for edits; self-CoT, docs/self-cot.md) the model writes a thought
before each image; the report records every image's thought and adds, per
category and overall (the mean over categories), the share of images that agree
with their thought (`image_agrees_with_thought`: the detected objects' colours,
shapes and 3x3 cells, and the background, are the thought's) and, for captions,
the share of thoughts that agree with the caption (`thought_agrees_with_caption`).
A thought that is no plan of the shapes world agrees with nothing.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..io.atomic import atomic_write
from ..pipeline import NextStepPipeline
from ..settings import GenerationSettings
from .checker import CheckResult, check, check_edit
from .grammar import parse_caption
from .plan import image_agrees_with_thought, thought_agrees_with_caption
from .renderer import render_image
from .sampling import sample_caption, sample_edit
from .world import CATEGORIES, EDIT_OPS, Scene

PASS, FAIL, NEUTRAL = (40, 190, 70), (220, 30, 30), (150, 150, 150)
BORDER, GAP = 3, 2  # pixels around each image and between framed images
EDIT_KIND_OFFSET = 100  # keeps the edit cases' RNG streams apart from the caption prompts'


SET_SEED = 0  # the default prompt (case) set
GENERATION_STREAM = 200  # keeps the generation seeds' streams apart from the sets' own


def instance_seed(seed: int, category: int, index: int) -> int:
    """The generation seed of prompt instance `index` of category number `category`."""
    return int(np.random.SeedSequence([seed, GENERATION_STREAM + category, index]).generate_state(1)[0])


# ---------------------------------------------------------------------- the fixed sets
def _check_int(name: str, value: Any, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def benchmark_prompts(per_category: int, seed: int) -> dict[str, list[str]]:
    """The fixed prompt set: `per_category` captions for each of the six categories."""
    _check_int("prompts per category", per_category, 1)
    _check_int("seed", seed, 0)  # numpy seeds are non-negative
    return {c: [str(sample_caption(np.random.default_rng([seed, ci, i]), c)) for i in range(per_category)]
            for ci, c in enumerate(CATEGORIES)}


@dataclass(frozen=True)
class EditCase:
    kind: str
    source: Scene
    instruction: str
    target: Scene  # the ground truth; judging needs only source and instruction


def benchmark_edit_cases(per_kind: int, seed: int, size: int) -> dict[str, list[EditCase]]:
    """The fixed edit set: `per_kind` cases for each edit kind on a `size` px canvas. `sample_edit`
    picks the kind itself, so each case redraws from its own RNG until the kind is the one wanted."""
    _check_int("cases per kind", per_kind, 1)
    _check_int("seed", seed, 0)
    cases: dict[str, list[EditCase]] = {}
    for ki, kind in enumerate(EDIT_OPS):
        cases[kind] = []
        for i in range(per_kind):
            rng = np.random.default_rng([seed, EDIT_KIND_OFFSET + ki, i])
            while True:
                source, edit, target = sample_edit(rng, size)
                if edit.op == kind:
                    break
            cases[kind].append(EditCase(kind, source, str(edit), target))
    return cases


# ---------------------------------------------------------------------- the benchmarks
@dataclass
class Instance:
    """One prompt instance: what the model is given, its seed, and how its images are judged."""

    category: str
    prompt: str
    seed: int
    judge: Callable[[Image.Image], CheckResult]
    record: dict[str, Any]  # what the report says of the case
    source: Image.Image | None = None  # edits: the rendered source scene
    caption: str | None = None  # text to image: what a thought is checked against


def _square(settings: GenerationSettings) -> int:
    h, w = settings.hw
    if h != w:
        raise ValueError(f"the shapes world is square, but the size is {w}x{h}: give a square size")
    return h


def _run(pipe: NextStepPipeline, kind: str, instances: list[Instance], n: int, settings: GenerationSettings,
         batch_size: int, out: str | Path | None, model: str | None, progress: bool, t0: float,
         **record: Any) -> dict[str, Any]:
    """Generate n images per instance, judge them, summarise, and write the outputs."""
    _check_int("images per prompt", n, 1)
    _check_int("batch size", batch_size, 1)
    sources = None if instances[0].source is None else [i.source for i in instances]
    done: dict[int, tuple[dict, list]] = {}
    digests: dict[str, set[bytes]] = {}
    for idx, images, thoughts in pipe.iter_generate([i.prompt for i in instances], settings,
                                                    [i.seed for i in instances], n, sources,
                                                    batch_images=batch_size * n, progress=progress):
        inst = instances[idx]
        results = [inst.judge(im) for im in images]
        row = {**inst.record, "seed": inst.seed, "passed": [r.passed for r in results],
               "reasons": [r.reason for r in results], "off_palette": [r.detection.off_palette for r in results]}
        if settings.thinks(edit=sources is not None):
            row.update(_judge_thoughts(inst, results, thoughts))
        framed = ([(inst.source, None)] if inst.source is not None else []) + \
            [(im, r.passed) for im, r in zip(images, results)]
        done[idx] = (row, framed)
        digests.setdefault(inst.category, set()).update(hashlib.sha256(im.tobytes()).digest() for im in images)
    cases: dict[str, list[dict]] = {}
    grids: dict[str, list[list[tuple[Image.Image, bool | None]]]] = {}
    for idx, inst in enumerate(instances):
        cases.setdefault(inst.category, []).append(done[idx][0])
        grids.setdefault(inst.category, []).append(done[idx][1])
    report = _summarise(kind, cases, {**record, "n": n, "batch_size": batch_size, **settings.as_dict()}, model, t0)
    for name, c in report["categories"].items():
        c["distinct_images"] = len(digests[name])
    if out is not None:
        write_outputs(Path(out), report, grids)
    return report


def _judge_thoughts(inst: Instance, results: list[CheckResult], thoughts: list[str]) -> dict[str, list]:
    """What the report records of an instance's thoughts: the thoughts, whether each image shows its
    thought (from the checker's detection), and for a caption whether each thought fits it."""
    record: dict[str, list] = {"thoughts": list(thoughts),
                               "image_agrees_with_thought": [image_agrees_with_thought(r.detection, t)
                                                             for r, t in zip(results, thoughts, strict=True)]}
    if inst.caption is not None:
        record["thought_agrees_with_caption"] = [thought_agrees_with_caption(t, inst.caption) for t in thoughts]
    return record


THOUGHT_CHECKS = ("thought_agrees_with_caption", "image_agrees_with_thought")  # their shares, in the report
THOUGHT_LEGEND = {"thought_agrees_with_caption": "share of thoughts that fit the caption",
                  "image_agrees_with_thought": "share of images that show their thought"}


def _summarise(kind: str, cases: dict[str, list[dict]], settings: dict, model: str | None, t0: float
               ) -> dict[str, Any]:
    categories = {}
    for name, rows in cases.items():
        passed = sum(sum(r["passed"]) for r in rows)
        images = sum(len(r["passed"]) for r in rows)
        off = sum(sum(r["off_palette"]) for r in rows)
        categories[name] = {"prompts": len(rows), "images": images, "passed": passed,
                            "score": passed / images, "off_palette": off / images, "grid": f"{name}.png",
                            "cases": rows}
        for check_name in THOUGHT_CHECKS:
            if rows and check_name in rows[0]:
                categories[name][check_name] = sum(sum(r[check_name]) for r in rows) / images
    overall = sum(c["score"] for c in categories.values()) / len(categories)
    report = {"benchmark": kind, "model": model, "settings": settings, "categories": categories,
              "overall": overall, "seconds": round(time.perf_counter() - t0, 3)}
    for check_name in THOUGHT_CHECKS:  # overall: the mean over categories, as the score
        shares = [c[check_name] for c in categories.values() if check_name in c]
        if shares:
            report[check_name] = sum(shares) / len(shares)
    if kind == "shapes":  # the share of off-palette images among prompts that name no colour
        plain = [r for rows in cases.values() for r in rows
                 if all(o.colour is None for o in parse_caption(r["prompt"]).objects)]
        images = sum(len(r["off_palette"]) for r in plain)
        report["off_palette_without_colour_words"] = sum(sum(r["off_palette"]) for r in plain) / max(images, 1)
    return report


def run_shapes_benchmark(pipe: NextStepPipeline, per_category: int = 40, n: int = 4, seed: int | None = None, *,
                         settings: GenerationSettings | None = None, batch_size: int = 16,
                         out: str | Path | None = None, model: str | None = None,
                         progress: bool = False) -> dict[str, Any]:
    """Text-to-image benchmark (see the module doc). `settings` default to the model's own;
    `model` is only recorded in the report."""
    t0 = time.perf_counter()
    settings = settings or pipe.settings
    seed = SET_SEED if seed is None else seed
    _square(settings)
    prompts = benchmark_prompts(per_category, seed)
    instances = [Instance(c, p, instance_seed(seed, ci, i), lambda im, p=p: check(im, p), {"prompt": p}, caption=p)
                 for ci, c in enumerate(CATEGORIES) for i, p in enumerate(prompts[c])]
    return _run(pipe, "shapes", instances, n, settings, batch_size, out, model, progress, t0,
                per_category=per_category, set_seed=seed)


def run_edits_benchmark(pipe: NextStepPipeline, per_kind: int = 40, n: int = 4, seed: int | None = None, *,
                        settings: GenerationSettings | None = None, batch_size: int = 16,
                        out: str | Path | None = None, model: str | None = None,
                        progress: bool = False) -> dict[str, Any]:
    """Editing benchmark (see the module doc); categories are the four edit kinds."""
    t0 = time.perf_counter()
    settings = settings or pipe.settings
    seed = SET_SEED if seed is None else seed
    all_cases = benchmark_edit_cases(per_kind, seed, _square(settings))
    instances = []
    for ki, kind in enumerate(EDIT_OPS):
        for i, case in enumerate(all_cases[kind]):
            source = render_image(case.source)
            instances.append(Instance(
                kind, case.instruction, instance_seed(seed, EDIT_KIND_OFFSET + ki, i),
                lambda im, src=source, ins=case.instruction: check_edit(src, im, ins),
                {"instruction": case.instruction, "source": case.source.labels()}, source))
    return _run(pipe, "edits", instances, n, settings, batch_size, out, model, progress, t0,
                per_kind=per_kind, set_seed=seed)


# ---------------------------------------------------------------------- outputs
def judged_grid(rows: Sequence[Sequence[tuple[Image.Image, bool | None]]]) -> Image.Image:
    """Images in rows, each framed green (True), red (False) or grey (None: not judged)."""
    cell_w = max(im.width for row in rows for im, _ in row) + 2 * BORDER
    cell_h = max(im.height for row in rows for im, _ in row) + 2 * BORDER
    cols = max(len(row) for row in rows)
    grid = Image.new("RGB", (cols * cell_w + (cols - 1) * GAP, len(rows) * cell_h + (len(rows) - 1) * GAP),
                     (255, 255, 255))
    for r, row in enumerate(rows):
        for c, (im, passed) in enumerate(row):
            x, y = c * (cell_w + GAP), r * (cell_h + GAP)
            colour = NEUTRAL if passed is None else PASS if passed else FAIL
            grid.paste(colour, (x, y, x + im.width + 2 * BORDER, y + im.height + 2 * BORDER))
            grid.paste(im.convert("RGB"), (x + BORDER, y + BORDER))
    return grid


def write_outputs(out: Path, report: dict[str, Any],
                  grids: dict[str, list[list[tuple[Image.Image, bool | None]]]]) -> None:
    """`out/<category>.png` for every category, then `out/report.json` (last: its presence means done)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"output folder {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in grids.items():
        grid = judged_grid(rows)
        atomic_write(out / f"{name}.png", lambda tmp, g=grid: g.save(tmp, format="PNG"))
    text = json.dumps(report, indent=2) + "\n"
    atomic_write(out / "report.json", lambda tmp: Path(tmp).write_text(text))


def format_table(report: dict[str, Any]) -> str:
    """The per-category scores as a plain-text table (with thinking, also the thought checks' shares)."""
    width = max(len("category"), *(len(c) for c in report["categories"]))
    thought = [(name, header) for name, header in zip(THOUGHT_CHECKS, ("thought~caption", "image~thought"))
               if name in report]  # the thought checks the report has, and their columns' headers

    def shares(c: dict[str, Any]) -> str:
        return "".join(f"  {c[name]:>{len(header)}.3f}" for name, header in thought)

    lines = [f"{'category':<{width}}  prompts  images  distinct  passed  score"
             + "".join(f"  {header}" for _, header in thought)]
    for name, c in report["categories"].items():
        lines.append(f"{name:<{width}}  {c['prompts']:>7}  {c['images']:>6}  {c.get('distinct_images', ''):>8}  "
                     f"{c['passed']:>6}  {c['score']:.3f}" + shares(c))
    lines.append(f"{'overall':<{width}}  {'':>7}  {'':>6}  {'':>8}  {'':>6}  {report['overall']:.3f}"
                 + shares(report))
    if thought:
        lines.append("; ".join(f"{header}: {THOUGHT_LEGEND[name]}" for name, header in thought))
    if "off_palette_without_colour_words" in report:
        lines.append(f"off-palette images, prompts without colour words: {report['off_palette_without_colour_words']:.3f}")
    return "\n".join(lines)
