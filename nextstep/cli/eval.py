"""`nextstep eval shapes|edits`: the shapes-world benchmarks (logic in `nextstep.shapes.benchmark`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import (add_model_args, add_seed_arg, add_settings_args, add_think_args, check_positive, command_group,
                     load_pipeline, model_label, settings_from_args)


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
    add_think_args(p, edit)  # --think: the report adds each image's thought and how well thoughts are followed


def register(sub: argparse._SubParsersAction) -> None:
    bench = command_group(sub, "eval", "benchmark a model on the shapes world",
                          "GenEval-style benchmarks on the shapes world (see shapes-world.md).", "benchmark",
                          "BENCHMARK")
    s = bench.add_parser(
        "shapes", help="text to image: six categories, judged by the shapes checker",
        description="Generate n images for each prompt of a fixed, seeded prompt set (N per category: "
                    "single_object, two_object, counting, colors, position, color_attr), judge each image with "
                    "the shapes checker, print the pass rate per category and overall (the mean over "
                    "categories), and write OUT/report.json and OUT/<category>.png. With --think the model writes a "
                    "thought before each image; the report records the thoughts and the table adds the share of "
                    "thoughts that fit their caption and of images that show their thought.")
    s.add_argument("--per-category", type=int, default=40, metavar="N", help="prompts per category (default 40)")
    _common(s, "eval/shapes", "prompt", edit=False)
    s.set_defaults(run=run)
    e = bench.add_parser(
        "edits", help="editing: four edit kinds, judged by the shapes checker",
        description="Edit a fixed, seeded set of rendered scenes (N cases per kind: recolour, add, remove, "
                    "background) n times each, judge each edit with the shapes checker, print the pass rate per "
                    "kind and overall (the mean over kinds), and write OUT/report.json and OUT/<kind>.png "
                    "(each row: the source, then its edits). With --think the report records each edit's "
                    "thought and the table adds the share of edits that show their thought.")
    e.add_argument("--per-kind", "--per-category", dest="per_kind", type=int, default=40, metavar="N",
                   help="cases per edit kind (default 40)")
    _common(e, "eval/edits", "case", edit=True)
    e.set_defaults(run=run)


def _check(args: argparse.Namespace, count: int) -> None:
    check_positive(**{"N": count, "-n": args.num_images, "--batch-size": args.batch_size})
    if args.seed is not None and args.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {args.seed}")
    if args.out.exists() and not args.out.is_dir():
        raise ValueError(f"--out {args.out} exists and is not a folder")


def run(args: argparse.Namespace) -> int:
    from ..shapes.benchmark import format_table, run_edits_benchmark, run_shapes_benchmark

    shapes = args.benchmark == "shapes"
    count = args.per_category if shapes else args.per_kind
    _check(args, count)
    pipe = load_pipeline(args)
    benchmark = run_shapes_benchmark if shapes else run_edits_benchmark
    report = benchmark(pipe, count, args.num_images, args.seed, settings=settings_from_args(pipe, args),
                       batch_size=args.batch_size, out=args.out, model=model_label(args), progress=True)
    print(format_table(report))
    print(f"{report['seconds']:.1f} s; report: {args.out / 'report.json'}")
    return 0
