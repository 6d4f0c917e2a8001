"""`nextstep eval shapes|edits`: the shapes-world benchmarks (logic in `nextstep.shapes.benchmark`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import add_model_args, add_seed_arg, add_settings_args, check_positive, load_pipeline, model_label
from .common import settings_from_args


def _common(p: argparse.ArgumentParser, out: str, unit: str, edit: bool) -> None:
    add_model_args(p)
    p.add_argument("-n", "--num-images", type=int, default=4, help=f"images per {unit} (default 4)")
    p.add_argument("--out", type=Path, default=Path(out),
                   help=f"report folder, created if missing (default {out}): report.json and one grid per "
                        "category, each image framed green (passed) or red (failed)")
    add_seed_arg(p, None, f"seed of the fixed {unit} set; each {unit} also gets its own generation seed "
                          f"from it (default: the benchmark's standard set)")
    p.add_argument("--batch-size", type=int, default=16, help=f"{unit}s per model call (default 16)")
    add_settings_args(p, edit=edit)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="benchmark a model on the shapes world",
                       description="GenEval-style benchmarks on the shapes world (see shapes-world.md).")
    bench = p.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    s = bench.add_parser(
        "shapes", help="text to image: six categories, judged by the shapes checker",
        description="Generate n images for each prompt of a fixed, seeded prompt set (N per category: "
                    "single_object, two_object, counting, colors, position, color_attr), judge each image with "
                    "the shapes checker, print the pass rate per category and overall (the mean over "
                    "categories), and write OUT/report.json and OUT/<category>.png.")
    s.add_argument("--per-category", type=int, default=40, metavar="N", help="prompts per category (default 40)")
    _common(s, "eval/shapes", "prompt", edit=False)
    s.set_defaults(run=run_shapes)
    e = bench.add_parser(
        "edits", help="editing: four edit kinds, judged by the shapes checker",
        description="Edit a fixed, seeded set of rendered scenes (N cases per kind: recolour, add, remove, "
                    "background) n times each, judge each edit with the shapes checker, print the pass rate per "
                    "kind and overall (the mean over kinds), and write OUT/report.json and OUT/<kind>.png "
                    "(each row: the source, then its edits).")
    e.add_argument("--per-kind", "--per-category", dest="per_kind", type=int, default=40, metavar="N",
                   help="cases per edit kind (default 40)")
    _common(e, "eval/edits", "case", edit=True)
    e.set_defaults(run=run_edits)


def _check(args: argparse.Namespace, count: int) -> None:
    check_positive(**{"N": count, "-n": args.num_images, "--batch-size": args.batch_size})
    if args.seed is not None and args.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {args.seed}")
    if args.out.exists() and not args.out.is_dir():
        raise ValueError(f"--out {args.out} exists and is not a folder")


def _finish(report: dict, out: Path) -> int:
    from ..shapes.benchmark import format_table

    print(format_table(report))
    print(f"{report['seconds']:.1f} s; report: {out / 'report.json'}")
    return 0


def run_shapes(args: argparse.Namespace) -> int:
    from ..shapes.benchmark import run_shapes_benchmark

    _check(args, args.per_category)
    pipe = load_pipeline(args)
    report = run_shapes_benchmark(pipe, args.per_category, args.num_images, args.seed,
                                  settings=settings_from_args(pipe, args), batch_size=args.batch_size, out=args.out,
                                  model=model_label(args), progress=True)
    return _finish(report, args.out)


def run_edits(args: argparse.Namespace) -> int:
    from ..shapes.benchmark import run_edits_benchmark

    _check(args, args.per_kind)
    pipe = load_pipeline(args)
    report = run_edits_benchmark(pipe, args.per_kind, args.num_images, args.seed,
                                 settings=settings_from_args(pipe, args), batch_size=args.batch_size, out=args.out,
                                 model=model_label(args), progress=True)
    return _finish(report, args.out)
