"""`nextstep generate`: text to image, for one prompt or a JSONL file of them.

Also holds what the image-making commands (`generate`, `edit`, `eval`) share:
the model options, loading, reading JSONL prompt files, and writing PNGs and
contact sheets. Everything the user gave is checked before the model runs, and
every file is written atomically, so bad input leaves no output behind.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from ..io.atomic import atomic_write
from ..sampling.flow import SAMPLERS

SHEET_GAP = 4  # grey pixels between the images of a contact sheet
SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # ids become file names


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


# ---------------------------------------------------------------------- shared by the commands
def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, default=None, metavar="DIR",
                   help="model folder (official layout; default: the shipped shapes-world model)")
    p.add_argument("--vae", type=Path, default=None, metavar="DIR",
                   help="VAE folder (default: from the model's config)")
    p.add_argument("--device", default=None, help="e.g. cpu, cuda (default: CUDA if present)")
    p.add_argument("--dtype", default=None,
                   help="float32, bfloat16 or bf16-mixed (fp32 weights, bf16 matmuls); "
                        "default: the model's choice for CPUs, else by device")


def load_pipeline(args: argparse.Namespace):
    from ..pipeline import NextStepPipeline  # import torch only when a command runs

    return NextStepPipeline.from_pretrained(args.model, args.vae, device=args.device, dtype=args.dtype)


def model_label(args: argparse.Namespace) -> str:
    from ..pipeline import SHIPPED_MODEL

    return str(args.model or SHIPPED_MODEL)


def check_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")


def check_folder(folder: Path, what: str = "output folder") -> None:
    if not folder.is_dir():
        raise FileNotFoundError(f"{what} {folder} does not exist" if not folder.exists()
                                else f"{what} {folder} is not a folder")


def check_size(pipe: Any, hw: tuple[int, int]) -> None:
    """Refuse a size the model cannot make before any work starts."""
    f = pipe.down_factor
    if min(hw) < f or hw[0] % f or hw[1] % f:
        raise ValueError(f"size {hw[0]}x{hw[1]}: this model makes images whose sides are multiples of {f} px "
                         f"(its default is {pipe.default_size[0]}x{pipe.default_size[1]})")


def read_jsonl(path: Path, fields: Sequence[str]) -> list[dict[str, str]]:
    """The rows of a JSONL prompt file; each needs `fields`, an "id" usable as a file name (unique)
    and non-empty text in every other field. Blank lines are skipped; errors name the line."""
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {path} does not exist")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text") from None
    rows: list[dict[str, str]] = []
    first_line: dict[str, int] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise TypeError(f"{where}: expected a JSON object with {', '.join(fields)}")
        missing = [f for f in fields if f not in row]
        if missing:
            raise ValueError(f"{where}: missing {', '.join(repr(m) for m in missing)}")
        rid = row["id"]
        if isinstance(rid, int) and not isinstance(rid, bool):
            rid = str(rid)
        if not isinstance(rid, str) or not SAFE_ID.fullmatch(rid):
            raise ValueError(f"{where}: id {row['id']!r} must be letters, digits, '.', '_' or '-' "
                             f"(it names the output files)")
        if rid in first_line:
            raise ValueError(f"{where}: id {rid!r} is already used on line {first_line[rid]}")
        first_line[rid] = number
        out = {"id": rid}
        for f in fields:
            if f == "id":
                continue
            if not isinstance(row[f], str) or not row[f].strip():
                raise ValueError(f"{where}: {f!r} must be a non-empty string")
            out[f] = row[f]
        rows.append(out)
    if not rows:
        raise ValueError(f"{path}: no prompts in the file")
    return rows


def contact_sheet(images: Sequence[Image.Image]) -> Image.Image:
    """The images side by side, `SHEET_GAP` grey pixels apart (grey shows on light and dark images)."""
    width = sum(im.width for im in images) + SHEET_GAP * (len(images) - 1)
    sheet = Image.new("RGB", (width, max(im.height for im in images)), (128, 128, 128))
    x = 0
    for im in images:
        sheet.paste(im.convert("RGB"), (x, 0))
        x += im.width + SHEET_GAP
    return sheet


def save_png(path: Path, image: Image.Image) -> None:
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def write_results(images: Sequence[Image.Image], paths: Sequence[Path], sheet: Path | None) -> None:
    """Write each image to its path, and with several images also the contact sheet."""
    for image, path in zip(images, paths):
        save_png(path, image)
        print(path)
    if sheet is not None and len(images) > 1:
        save_png(sheet, contact_sheet(images))
        print(sheet)


def batch_paths(out_dir: Path, rid: str, n: int) -> tuple[list[Path], Path]:
    """`DIR/<id>_<k>.png` for k = 0..n-1, and the contact sheet `DIR/<id>_sheet.png`."""
    return [out_dir / f"{rid}_{k}.png" for k in range(n)], out_dir / f"{rid}_sheet.png"


def single_paths(output: Path, n: int) -> tuple[list[Path], Path]:
    """OUT itself for one image, else OUT_0.png, OUT_1.png, ...; the sheet is OUT_sheet.png."""
    suffix = output.suffix or ".png"
    sheet = output.with_name(f"{output.stem}_sheet{suffix}")
    if n == 1:
        return [output], sheet
    return [output.with_name(f"{output.stem}_{k}{suffix}") for k in range(n)], sheet


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=42, help="random seed (default 42); in batches, batch b uses "
                   "seed + b")
    p.add_argument("--cfg", type=float, default=None, help="text guidance scale, 1 = none (default: the model's)")
    p.add_argument("--steps", type=int, default=None, help="flow sampling steps per token (default: the model's)")
    p.add_argument("-n", "--num-images", type=int, default=1, help="images per prompt (default 1)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per model call in --prompts mode "
                   "(default 8)")
    p.add_argument("--negative-prompt", default=None)


def add_batch_args(p: argparse.ArgumentParser, fields: str) -> None:
    p.add_argument("-o", "--output", type=Path, default=None,
                   help="output PNG (default out.png; with -n > 1: OUT_0.png, OUT_1.png, ... and the contact "
                        "sheet OUT_sheet.png)")
    p.add_argument("--prompts", type=Path, default=None, metavar="FILE.jsonl",
                   help=f"batch mode: one JSON object per line with {fields}")
    p.add_argument("--out-dir", type=Path, default=None, metavar="DIR",
                   help="batch mode output folder (must exist): DIR/<id>_<k>.png, k from 0, and with -n > 1 "
                        "DIR/<id>_sheet.png")


def check_mode(args: argparse.Namespace, single: Any, what: str) -> bool:
    """Whether this is a single run (vs --prompts), after checking the options fit the mode."""
    if (single is None) == (args.prompts is None):
        raise ValueError(f"give one {what} or --prompts FILE.jsonl (not both)")
    if single is not None:
        if args.out_dir is not None:
            raise ValueError("--out-dir goes with --prompts; for one result use -o")
        check_folder((args.output or Path("out.png")).parent)
        return True
    if args.output is not None:
        raise ValueError("-o goes with a single run; with --prompts use --out-dir")
    if args.out_dir is None:
        raise ValueError("--prompts needs --out-dir DIR")
    check_folder(args.out_dir)
    return False


# ---------------------------------------------------------------------- the command
def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate", help="generate images from text prompts",
        description="Generate images from a text prompt, or from a JSONL file of prompts, and write PNGs. "
                    "Unset --cfg, --steps and --size come from the model's generation defaults.")
    p.add_argument("prompt", nargs="?", default=None, help="the caption (or use --prompts)")
    add_batch_args(p, '{"id", "caption"}')
    add_model_args(p)
    add_sampling_args(p)
    p.add_argument("--shift", type=float, default=None, help="timesteps shift (default: the model's)")
    p.add_argument("--size", type=parse_size, default=None,
                   help="HxW or S in pixels, multiples of 16 (default: the model's)")
    p.add_argument("--positive-prompt", default=None)
    p.add_argument("--sampler", default=None, choices=SAMPLERS,
                   help="flow sampler (default: the model's, else the checkpoint family's own)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..shapes.benchmark import generate_batches, generation_settings

    single = check_mode(args, args.prompt, "PROMPT")
    check_positive(**{"-n": args.num_images, "--batch-size": args.batch_size})
    if single:
        if not args.prompt.strip():
            raise ValueError("the prompt is empty")
        rows = [{"id": "", "caption": args.prompt}]
    else:
        rows = read_jsonl(args.prompts, ("id", "caption"))
    pipe = load_pipeline(args)
    settings = generation_settings(pipe, cfg=args.cfg, cfg_img=1.0, steps=args.steps)
    settings["hw"] = args.size or settings["hw"]
    check_size(pipe, settings["hw"])
    if args.shift is not None:
        settings["timesteps_shift"] = args.shift
    if args.sampler is not None:
        settings["sde_type"] = args.sampler
    n, output = args.num_images, args.output or Path("out.png")
    for start, groups in generate_batches(pipe, [r["caption"] for r in rows], None, n, args.batch_size,
                                          args.seed, progress=True, negative_prompt=args.negative_prompt,
                                          positive_prompt=args.positive_prompt, **settings):
        for row, images in zip(rows[start:], groups):
            paths, sheet = single_paths(output, n) if single else batch_paths(args.out_dir, row["id"], n)
            write_results(images, paths, sheet)
    return 0
