"""`nextstep edit`: edit images by an instruction, for one image or a JSONL file of them.

The source image is resized to the output size (--size, default the model's
own) when it differs, since the model edits at the size it makes; the aspect
ratio is not kept. The instruction gets `<image>` in front unless it places
the source image itself.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from .generate import (
    add_batch_args,
    add_model_args,
    add_sampling_args,
    batch_paths,
    check_mode,
    check_positive,
    check_size,
    load_pipeline,
    parse_size,
    read_jsonl,
    single_paths,
    write_results,
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "edit", help="edit images by an instruction",
        description="Edit an image by an instruction, or every line of a JSONL file, and write PNGs. The source "
                    "is resized to the output size when it differs. Unset --cfg, --cfg-img, --steps and --size "
                    "come from the model's generation defaults.")
    p.add_argument("instruction", nargs="?", default=None, help='e.g. "make the circle blue" (or use --prompts)')
    p.add_argument("--image", type=Path, default=None, metavar="IN.png", help="the source image")
    add_batch_args(p, '{"id", "image", "instruction"} (image paths relative to FILE)')
    add_model_args(p)
    add_sampling_args(p)
    p.add_argument("--cfg-img", type=float, default=None,
                   help="image guidance scale, 1 = none (default: the model's)")
    p.add_argument("--size", type=parse_size, default=None,
                   help="output HxW or S in pixels, multiples of 16 (default: the model's)")
    p.set_defaults(run=run)


def read_source(path: Path, hw: tuple[int, int]) -> Image.Image:
    """The source image as RGB, resized to (height, width) `hw` if it is not that size."""
    if not path.is_file():
        raise FileNotFoundError(f"input image {path} does not exist")
    try:
        with Image.open(path) as im:
            image = im.convert("RGB")
    except UnidentifiedImageError:
        raise ValueError(f"cannot read input image {path}: not an image format PIL knows") from None
    except (OSError, SyntaxError, ValueError) as e:  # PIL reports damaged files in all three
        raise ValueError(f"cannot read input image {path}: {e}") from None
    if image.size != (hw[1], hw[0]):
        image = image.resize((hw[1], hw[0]), Image.Resampling.BICUBIC)
    return image


def run(args: argparse.Namespace) -> int:
    from ..shapes.benchmark import generate_batches, generation_settings

    single = check_mode(args, args.instruction, "INSTRUCTION")
    check_positive(**{"-n": args.num_images, "--batch-size": args.batch_size})
    if single:
        if args.image is None:
            raise ValueError("give the source image with --image IN.png")
        if not args.instruction.strip():
            raise ValueError("the instruction is empty")
        rows = [{"id": "", "image": str(args.image), "instruction": args.instruction}]
        base = Path()
    else:
        if args.image is not None:
            raise ValueError("--image goes with a single instruction; with --prompts each line names its image")
        rows = read_jsonl(args.prompts, ("id", "image", "instruction"))
        base = args.prompts.parent
    pipe = load_pipeline(args)
    settings = generation_settings(pipe, cfg=args.cfg, cfg_img=args.cfg_img, steps=args.steps)
    settings["hw"] = args.size or settings["hw"]
    check_size(pipe, settings["hw"])
    # Read every source before generating anything, so a bad one costs no work and leaves no files.
    sources = [read_source(base / r["image"], settings["hw"]) for r in rows]
    captions = [pipe.edit_prompt(r["instruction"]) for r in rows]
    n, output = args.num_images, args.output or Path("out.png")
    for start, groups in generate_batches(pipe, captions, sources, n, args.batch_size, args.seed, progress=True,
                                          negative_prompt=args.negative_prompt, **settings):
        for row, images in zip(rows[start:], groups):
            paths, sheet = single_paths(output, n) if single else batch_paths(args.out_dir, row["id"], n)
            write_results(images, paths, sheet)
    return 0
