"""`nextstep generate "PROMPT"`: text to image."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..io.atomic import atomic_write
from ..sampling.flow import SAMPLERS


def parse_size(text: str) -> tuple[int, int]:
    """"256" or "256x384" (height x width) -> (h, w)."""
    parts = text.lower().split("x")
    try:
        sizes = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 256 or 256x384, got {text!r}") from None
    if len(sizes) == 1:
        sizes *= 2
    if len(sizes) != 2:
        raise argparse.ArgumentTypeError(f"size must look like 256 or 256x384, got {text!r}")
    return sizes[0], sizes[1]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate images from a text prompt",
                       description="Generate images from a text prompt and write them as PNG.")
    p.add_argument("prompt", help="the caption")
    p.add_argument("-o", "--output", type=Path, default=Path("out.png"),
                   help="output PNG (with -n > 1: OUT_0.png, OUT_1.png, ...)")
    p.add_argument("--model", type=Path, required=True, help="model folder (official Hugging Face layout)")
    p.add_argument("--vae", type=Path, default=None, help="VAE folder (default: from the model's config)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--cfg", type=float, default=7.5, help="text guidance scale (1 = none)")
    p.add_argument("--steps", type=int, default=28, help="flow sampling steps per token")
    p.add_argument("--shift", type=float, default=1.0, help="timesteps shift")
    p.add_argument("--size", type=parse_size, default=(256, 256), help="HxW in pixels, multiples of 16")
    p.add_argument("-n", "--num-images", type=int, default=1)
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--positive-prompt", default=None)
    p.add_argument("--sampler", default=None, choices=SAMPLERS,
                   help="flow sampler (default: the checkpoint family's own)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.set_defaults(run=run)


def output_paths(output: Path, n: int) -> list[Path]:
    if n == 1:
        return [output]
    return [output.with_name(f"{output.stem}_{k}{output.suffix or '.png'}") for k in range(n)]


def run(args: argparse.Namespace) -> int:
    from ..pipeline import NextStepPipeline  # import torch only when a command runs

    if not args.prompt.strip():
        raise ValueError("the prompt is empty")
    if not args.output.parent.is_dir():
        raise FileNotFoundError(f"output folder {args.output.parent} does not exist")
    pipe = NextStepPipeline.from_pretrained(args.model, args.vae, device=args.device, dtype=args.dtype)
    images = pipe.generate_image(
        args.prompt, num_images_per_caption=args.num_images, positive_prompt=args.positive_prompt,
        negative_prompt=args.negative_prompt, hw=args.size, cfg=args.cfg, num_sampling_steps=args.steps,
        timesteps_shift=args.shift, seed=args.seed, sde_type=args.sampler, progress=True)
    for image, path in zip(images, output_paths(args.output, len(images))):
        atomic_write(path, lambda tmp, im=image: im.save(tmp, format="PNG"))
        print(path)
    return 0
