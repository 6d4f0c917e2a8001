"""`nextstep generate`: text to image, for one prompt or a JSONL file of them."""

from __future__ import annotations

import argparse

from .common import (add_batch_args, add_model_args, add_seed_arg, add_settings_args, add_think_args, check_mode,
                     check_size, generate_and_write, load_pipeline, read_jsonl, settings_from_args)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate", help="generate images from text prompts",
        description="Generate images from a text prompt, or from a JSONL file of prompts, and write PNGs. "
                    "Unset generation settings come from the model's generation defaults.")
    p.add_argument("prompt", nargs="?", default=None, help="the caption (or use --prompts)")
    add_batch_args(p, '{"id", "caption"}')
    add_seed_arg(p)
    add_model_args(p)
    add_settings_args(p, edit=False)
    add_think_args(p, edit=False)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    single = check_mode(args, args.prompt, "PROMPT")
    if single:
        if not args.prompt.strip():
            raise ValueError("the prompt is empty")
        rows = [{"id": "", "caption": args.prompt, "seed": args.seed}]
    else:
        rows = read_jsonl(args.prompts, ("id", "caption"), args.seed)
    pipe = load_pipeline(args)
    settings = settings_from_args(pipe, args)
    check_size(pipe, settings.hw)
    return generate_and_write(pipe, args, single, rows, [r["caption"] for r in rows], settings)
