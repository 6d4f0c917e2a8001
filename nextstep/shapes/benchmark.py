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
larger set starts with the smaller one. Generation is batched: `batch_size`
prompts with all their n images per `generate_image` call, call b seeded with
seed + b. With `out`, the report goes to `out/report.json` and one PNG grid per
category to `out/<category>.png`: a row per prompt (for edits: the source
first, grey border), each image framed green (passed) or red (failed).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from ..io.atomic import atomic_write
from ..pipeline import FAMILIES, NextStepPipeline
from .checker import check, check_edit
from .renderer import render_image
from .sampling import sample_caption, sample_edit
from .world import CATEGORIES, EDIT_OPS, Scene

PASS, FAIL, NEUTRAL = (40, 190, 70), (220, 30, 30), (150, 150, 150)
BORDER, GAP = 3, 2  # pixels around each image and between framed images
EDIT_KIND_OFFSET = 100  # keeps the edit cases' RNG streams apart from the caption prompts'


# ---------------------------------------------------------------------- batched generation
def generate_batches(pipe: NextStepPipeline, captions: Sequence[str], images: Sequence[Image.Image] | None,
                     n: int, batch_size: int, seed: int, progress: bool = False, **settings: Any
                     ) -> Iterator[tuple[int, list[list[Image.Image]]]]:
    """Generate n images per caption, `batch_size` captions per `generate_image` call (call b uses
    seed + b). Yields (index of the batch's first caption, its images grouped per caption). The
    progress bar counts images, or, when one call does it all, image tokens."""
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    one_call = len(captions) <= batch_size
    bar = tqdm(total=len(captions) * n, unit="image", disable=None if progress and not one_call else True)
    with bar:
        for b, start in enumerate(range(0, len(captions), batch_size)):
            chunk = list(captions[start:start + batch_size])
            sources = None if images is None else list(images[start:start + batch_size])
            out = pipe.generate_image(chunk, sources, n, seed=seed + b, progress=progress and one_call, **settings)
            bar.update(len(out))
            yield start, [out[i * n:(i + 1) * n] for i in range(len(chunk))]


def generation_settings(pipe: NextStepPipeline, size: int | None = None, cfg: float | None = None,
                        cfg_img: float | None = None, steps: int | None = None) -> dict[str, Any]:
    """`generate_image` keyword arguments: the model's generation defaults with these overrides."""
    d = pipe.generation_defaults
    h, w = pipe.default_size if size is None else (size, size)
    return {"hw": (h, w), "cfg": d["cfg"] if cfg is None else cfg,
            "cfg_img": d["cfg_img"] if cfg_img is None else cfg_img,
            "num_sampling_steps": d["num_sampling_steps"] if steps is None else steps,
            "timesteps_shift": d["timesteps_shift"], "cfg_schedule": d["cfg_schedule"],
            "use_norm": d["use_norm"], "sde_type": d["sampler"], "context_noise": d["context_noise"]}


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
def _square_size(pipe: NextStepPipeline, size: int | None) -> int:
    if size is not None:
        return size
    h, w = pipe.default_size
    if h != w:
        raise ValueError(f"the shapes world is square, but the model's default size is {h}x{w}: give a size")
    return h


def _settings_record(pipe: NextStepPipeline, settings: dict[str, Any], **extra: Any) -> dict[str, Any]:
    s = {**extra, **settings, "hw": list(settings["hw"])}
    s["sde_type"] = s["sde_type"] or FAMILIES[pipe.model.config.family].default_sampler
    return s


def _summarise(kind: str, cases: dict[str, list[dict]], settings: dict, model: str | None, t0: float
               ) -> dict[str, Any]:
    categories = {}
    for name, rows in cases.items():
        passed = sum(sum(r["passed"]) for r in rows)
        images = sum(len(r["passed"]) for r in rows)
        categories[name] = {"prompts": len(rows), "images": images, "passed": passed,
                            "score": passed / images, "grid": f"{name}.png", "cases": rows}
    overall = sum(c["score"] for c in categories.values()) / len(categories)
    return {"benchmark": kind, "model": model, "settings": settings, "categories": categories,
            "overall": overall, "seconds": round(time.perf_counter() - t0, 3)}


def run_shapes_benchmark(pipe: NextStepPipeline, per_category: int = 40, n: int = 4, seed: int = 0, *,
                         cfg: float | None = None, steps: int | None = None, size: int | None = None,
                         batch_size: int = 16, out: str | Path | None = None, model: str | None = None,
                         progress: bool = False) -> dict[str, Any]:
    """Text-to-image benchmark (see the module doc). Unset settings come from the model's
    generation defaults; `model` is only recorded in the report."""
    t0 = time.perf_counter()
    _check_int("images per prompt", n, 1)
    size = _square_size(pipe, size)
    settings = generation_settings(pipe, size, cfg, 1.0, steps)
    prompts = benchmark_prompts(per_category, seed)
    flat = [(c, p) for c in CATEGORIES for p in prompts[c]]
    cases: dict[str, list[dict]] = {c: [] for c in CATEGORIES}
    grids: dict[str, list[list[tuple[Image.Image, bool | None]]]] = {c: [] for c in CATEGORIES}
    for start, groups in generate_batches(pipe, [p for _, p in flat], None, n, batch_size, seed, progress,
                                          **settings):
        for (category, prompt), images in zip(flat[start:], groups):
            results = [check(im, prompt) for im in images]
            cases[category].append({"prompt": prompt, "passed": [r.passed for r in results],
                                    "reasons": [r.reason for r in results]})
            grids[category].append([(im, r.passed) for im, r in zip(images, results)])
    record = _settings_record(pipe, settings, per_category=per_category, n=n, seed=seed, batch_size=batch_size)
    report = _summarise("shapes", cases, record, model, t0)
    if out is not None:
        write_outputs(Path(out), report, grids)
    return report


def run_edits_benchmark(pipe: NextStepPipeline, per_kind: int = 40, n: int = 4, seed: int = 0, *,
                        cfg: float | None = None, cfg_img: float | None = None, steps: int | None = None,
                        size: int | None = None, batch_size: int = 16, out: str | Path | None = None,
                        model: str | None = None, progress: bool = False) -> dict[str, Any]:
    """Editing benchmark (see the module doc); categories are the four edit kinds."""
    t0 = time.perf_counter()
    _check_int("images per case", n, 1)
    size = _square_size(pipe, size)
    settings = generation_settings(pipe, size, cfg, cfg_img, steps)
    all_cases = benchmark_edit_cases(per_kind, seed, size)
    flat = [case for kind in EDIT_OPS for case in all_cases[kind]]
    sources = [render_image(case.source) for case in flat]
    captions = [pipe.edit_prompt(case.instruction) for case in flat]
    cases: dict[str, list[dict]] = {k: [] for k in EDIT_OPS}
    grids: dict[str, list[list[tuple[Image.Image, bool | None]]]] = {k: [] for k in EDIT_OPS}
    for start, groups in generate_batches(pipe, captions, sources, n, batch_size, seed, progress, **settings):
        for case, source, images in zip(flat[start:], sources[start:], groups):
            results = [check_edit(source, im, case.instruction) for im in images]
            cases[case.kind].append({"instruction": case.instruction, "source": case.source.labels(),
                                     "passed": [r.passed for r in results],
                                     "reasons": [r.reason for r in results]})
            grids[case.kind].append([(source, None)] + [(im, r.passed) for im, r in zip(images, results)])
    record = _settings_record(pipe, settings, per_kind=per_kind, n=n, seed=seed, batch_size=batch_size)
    report = _summarise("edits", cases, record, model, t0)
    if out is not None:
        write_outputs(Path(out), report, grids)
    return report


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
    """The per-category scores as a plain-text table."""
    width = max(len("category"), *(len(c) for c in report["categories"]))
    lines = [f"{'category':<{width}}  prompts  images  passed  score"]
    for name, c in report["categories"].items():
        lines.append(f"{name:<{width}}  {c['prompts']:>7}  {c['images']:>6}  {c['passed']:>6}  {c['score']:.3f}")
    lines.append(f"{'overall':<{width}}  {'':>7}  {'':>6}  {'':>6}  {report['overall']:.3f}")
    return "\n".join(lines)
