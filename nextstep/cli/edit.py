"""`nextstep edit`: edit images by an instruction, for one image or a JSONL file of them.

The source image is resized to the output size (--size, default the model's
own) when it differs, since the model edits at the size it makes; the aspect
ratio is not kept. The instruction is plain text; the source image goes where
the model was trained to see it (`--source-image`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image

from ..io.images import load_rgb
from .common import (add_batch_args, add_model_args, add_seed_arg, add_settings_args, add_think_args, check_mode,
                     check_size, generate_and_write, load_pipeline, read_jsonl, settings_from_args)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "edit", help="edit images by an instruction",
        description="Edit an image by an instruction, or every line of a JSONL file, and write PNGs. The source "
                    "is resized to the output size when it differs. Unset generation settings come from the "
                    "model's generation defaults.")
    p.add_argument("instruction", nargs="?", default=None, help='e.g. "make the circle blue" (or use --prompts)')
    p.add_argument("--image", type=Path, default=None, metavar="IN.png", help="the source image")
    add_batch_args(p, '{"id", "image", "instruction"} (image paths relative to FILE)')
    add_seed_arg(p)
    add_model_args(p)
    add_settings_args(p, edit=True)
    add_think_args(p, edit=True)
    p.set_defaults(run=run)


def read_source(path: Path, hw: tuple[int, int]) -> Image.Image:
    """The source image as RGB, resized to (height, width) `hw` if it is not that size."""
    if not path.is_file():
        raise FileNotFoundError(f"input image {path} does not exist")
    try:
        image = load_rgb(path)
    except ValueError as e:
        raise ValueError(f"cannot read input image {path}: {e}") from None
    if image.size != (hw[1], hw[0]):
        image = image.resize((hw[1], hw[0]), Image.Resampling.BICUBIC)
    return image


def run(args: argparse.Namespace) -> int:
    single = check_mode(args, args.instruction, "INSTRUCTION")
    if single:
        if args.image is None:
            raise ValueError("give the source image with --image IN.png")
        if not args.instruction.strip():
            raise ValueError("the instruction is empty")
        rows = [{"id": "", "image": str(args.image), "instruction": args.instruction, "seed": args.seed}]
        base = Path()
    else:
        if args.image is not None:
            raise ValueError("--image goes with a single instruction; with --prompts each line names its image")
        rows = read_jsonl(args.prompts, ("id", "image", "instruction"), args.seed)
        base = args.prompts.parent
    pipe = load_pipeline(args)
    settings = settings_from_args(pipe, args)
    check_size(pipe, settings.hw)
    # Read every source before generating anything, so a bad one costs no work and leaves no files.
    sources = [read_source(base / r["image"], settings.hw) for r in rows]
    return generate_and_write(pipe, args, single, rows, [r["instruction"] for r in rows], settings, sources)
