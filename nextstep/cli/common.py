"""What the image-making commands (`generate`, `edit`, `eval`) share: the model options, the
generation-settings flags, reading JSONL prompt files, and writing PNGs and contact sheets.

Everything the user gave is checked before the model runs, and every file is
written atomically, so bad input leaves no output behind.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from ..io.atomic import atomic_write
from ..quantize import MODES as QUANTIZE_MODES
from ..sampling.flow import SAMPLERS, STEP_SCHEDULES
from ..settings import CFG_SCHEDULES, DEFAULT_SEED, SEED_MODULUS, GenerationSettings, parse_size
from ..text import SOURCE_IMAGE_PLACES

SHEET_GAP = 4  # grey pixels between the images of a contact sheet
SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # ids become file names


def size_arg(text: str) -> tuple[int, int]:
    """--size: "S" or "WIDTHxHEIGHT" -> (height, width); a non-square size says how it was read."""
    try:
        h, w = parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if h != w:  # earlier versions read HEIGHTxWIDTH: say which way round this is
        print(f"note: --size {text} is {w} px wide and {h} px high (WIDTHxHEIGHT, as in the API)", file=sys.stderr)
    return h, w


def command_group(sub: argparse._SubParsersAction, name: str, help: str, description: str, dest: str,
                  metavar: str) -> argparse._SubParsersAction:
    """A command whose first argument picks a subcommand (`nextstep eval shapes`, `nextstep data shapes`)."""
    parser = sub.add_parser(name, help=help, description=description)
    return parser.add_subparsers(dest=dest, required=True, metavar=metavar)


# ---------------------------------------------------------------------- model and settings
def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, metavar="DIR_OR_HUB_ID",
                   help="model folder (official layout) or Hugging Face Hub id such as org/name "
                        "(default: the shipped shapes-world model)")
    add_hub_args(p)
    p.add_argument("--vae", type=Path, default=None, metavar="DIR",
                   help="VAE folder or Hub id (default: from the model's config)")
    p.add_argument("--device", default=None, help="e.g. cpu, cuda (default: CUDA if present)")
    p.add_argument("--dtype", default=None,
                   help="float32, bfloat16 or bf16-mixed (fp32 weights, bf16 matmuls); "
                        "default: the model's choice for CPUs, else by device")
    add_quantize_arg(p)
    add_compile_arg(p, "default: off, so a one-shot command pays no warm-up")


def add_compile_arg(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="run the decode step and the flow head compiled (CUDA graphs on a GPU: much faster per "
                        f"token after a warm-up; on the CPU a minutes-long warm-up for little gain); {default}")


def add_quantize_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quantize", default=None, choices=QUANTIZE_MODES,
                   help="store the decoder's linear weights quantized (on GPUs through torchao, pip install "
                        "'nextstep[quant]'): int8 anywhere (on the CPU without torchao), int4 on CUDA with bfloat16, fp8 on GPUs with compute capability >= 8.9 "
                        "(default: none)")


def add_hub_args(p: argparse.ArgumentParser) -> None:
    """--revision and --strict-config: how a model named by Hub id, and its config, are read."""
    p.add_argument("--revision", default=None,
                   help="with a Hub id: branch, tag or commit (default: main); HF_HUB_OFFLINE=1 reads only the "
                        "local Hub cache")
    p.add_argument("--strict-config", action="store_true",
                   help="refuse config.json fields nextstep does not know (default: warn and go on)")


def hub_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The from_pretrained keywords of add_hub_args' flags."""
    return {"revision": args.revision, "strict_config": args.strict_config}


# (flag, GenerationSettings field, argparse keywords, help); every default is the model's.
SETTING_FLAGS: list[tuple[str, str, dict[str, Any], str]] = [
    ("--size", "hw", {"type": size_arg}, "WIDTHxHEIGHT or S in pixels, multiples of the model's token size"),
    ("--cfg", "cfg", {"type": float}, "text guidance scale, 1 = none"),
    ("--cfg-img", "cfg_img", {"type": float}, "image guidance scale, 1 = none"),
    ("--cfg-schedule", "cfg_schedule", {"choices": CFG_SCHEDULES}, "guidance over the tokens"),
    ("--steps", "num_sampling_steps", {"type": int}, "flow sampling steps per token"),
    ("--shift", "timesteps_shift", {"type": float}, "timesteps shift (> 1: more steps near the noise)"),
    ("--step-schedule", "step_schedule", {"choices": STEP_SCHEDULES},
     "flow steps per token: fixed (official) or a preset of fewer, with the integrator it names (faster)"),
    ("--sampler", "sampler", {"choices": SAMPLERS}, "flow sampler"),
    ("--noise-level", "noise_level", {"type": float}, "noise of the sde and cps samplers, in [0, 1]"),
    ("--use-norm", "use_norm", {"action": argparse.BooleanOptionalAction}, "layer-norm each sampled token"),
    ("--context-noise-std", "context_noise_std", {"type": float},
     "noise on each token where the decoder reads it back (models trained with context noise)"),
    ("--source-image", "source_image", {"choices": SOURCE_IMAGE_PLACES},
     "where the instruction sees the source image"),
    ("--negative-prompt", "negative_prompt", {}, "text of the unconditional rows"),
    ("--positive-prompt", "positive_prompt", {}, "text appended to every caption"),
]
EDIT_ONLY = ("cfg_img", "source_image")  # text to image has no source image
# Self-CoT (docs/self-cot.md): write a thought, then draw the image from caption + thought.
THINK_FLAGS: list[tuple[str, str, dict[str, Any], str]] = [
    ("--think", "think", {"action": argparse.BooleanOptionalAction},
     "write a thought with the language head first, then draw from caption + thought; each thought is "
     "printed and saved next to its PNG as <name>.txt"),
    ("--thought-max-tokens", "thought_max_tokens", {"type": int}, "tokens a thought may have at most"),
    ("--text-temperature", "text_temperature", {"type": float}, "thought sampling temperature, 0 = greedy"),
    ("--text-top-k", "text_top_k", {"type": int}, "thought tokens from the k most likely only, 0 = all"),
    ("--text-top-p", "text_top_p", {"type": float}, "thought tokens from the top-p probability mass, 1 = all"),
]


def add_settings_args(p: argparse.ArgumentParser, edit: bool) -> None:
    """A flag for every generation setting (for text to image, all but the source image's)."""
    g = p.add_argument_group("generation settings (default: the model's own, from its generation_defaults.json)")
    for flag, field, kwargs, text in SETTING_FLAGS:
        if edit or field not in EDIT_ONLY:
            g.add_argument(flag, dest=field, default=None, help=text, **kwargs)


def add_think_args(p: argparse.ArgumentParser, edit: bool) -> None:
    """The self-CoT flags (`--think` and how thoughts are sampled); an edit command's `--think` is
    the `think_edits` setting."""
    g = p.add_argument_group("thinking (default: the model's own, from its generation_defaults.json)")
    for flag, field, kwargs, text in THINK_FLAGS:
        field = "think_edits" if edit and field == "think" else field
        g.add_argument(flag, dest=field, default=None, help=text, **kwargs)


def settings_from_args(pipe: Any, args: argparse.Namespace) -> GenerationSettings:
    fields = [field for _, field, _, _ in SETTING_FLAGS + THINK_FLAGS] + ["think_edits"]
    given = {field: getattr(args, field, None) for field in fields}
    return pipe.settings.with_overrides(**given)


def add_seed_arg(p: argparse.ArgumentParser, default: int | None = DEFAULT_SEED, text: str = "") -> None:
    p.add_argument("--seed", type=int, default=default,
                   help=text or f"image k of a prompt is the image of seed + k (default {default}); a --prompts "
                                "line may carry its own \"seed\"; lines with the same caption and seed give the "
                                "same images")


def check_seed(seed: Any, where: str = "--seed") -> int:
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < SEED_MODULUS:
        raise ValueError(f"{where} must be an integer between 0 and {SEED_MODULUS - 1}, got {seed!r}")
    return seed


def load_pipeline(args: argparse.Namespace):
    from ..pipeline import NextStepPipeline  # the model code loads only when a command runs

    return NextStepPipeline.from_pretrained(args.model, args.vae, device=args.device, dtype=args.dtype,
                                            quantize=args.quantize, compile=bool(getattr(args, "compile", False)),
                                            **hub_kwargs(args))


def model_label(args: argparse.Namespace) -> str:
    from ..pipeline import SHIPPED_MODEL

    return str(args.model or SHIPPED_MODEL)


def check_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")


def check_size(pipe: Any, hw: tuple[int, int]) -> None:
    """Refuse a size the model cannot make before any work starts."""
    f = pipe.down_factor
    if min(hw) < f or hw[0] % f or hw[1] % f:
        raise ValueError(f"size {hw[1]}x{hw[0]}: this model makes images whose sides are multiples of {f} px "
                         f"(its default is {pipe.default_size[1]}x{pipe.default_size[0]})")


# ---------------------------------------------------------------------- single run or --prompts
def add_batch_args(p: argparse.ArgumentParser, fields: str) -> None:
    p.add_argument("-o", "--output", type=Path, default=None,
                   help="output PNG (default out.png; with -n > 1: OUT_0.png, OUT_1.png, ... and the contact "
                        "sheet OUT_sheet.png); its folder must exist")
    p.add_argument("--prompts", type=Path, default=None, metavar="FILE.jsonl",
                   help=f"batch mode: one JSON object per line with {fields}, and optionally \"seed\"")
    p.add_argument("--out-dir", type=Path, default=None, metavar="DIR",
                   help="batch mode output folder (created if missing): DIR/<id>_<k>.png, k from 0, and with "
                        "-n > 1 DIR/<id>_sheet.png")
    p.add_argument("-n", "--num-images", type=int, default=1, help="images per prompt (default 1)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per model call (default 8)")


def check_mode(args: argparse.Namespace, single: Any, what: str) -> bool:
    """Whether this is a single run (vs --prompts), after checking the options fit the mode."""
    if (single is None) == (args.prompts is None):
        raise ValueError(f"give one {what} or --prompts FILE.jsonl (not both)")
    check_positive(**{"-n": args.num_images, "--batch-size": args.batch_size})
    check_seed(args.seed)
    if single is not None:
        if args.out_dir is not None:
            raise ValueError("--out-dir goes with --prompts; for one result use -o")
        folder = (args.output or Path("out.png")).parent
        if not folder.is_dir():
            raise FileNotFoundError(f"output folder {folder} does not exist" if not folder.exists()
                                    else f"output folder {folder} is not a folder")
        return True
    if args.output is not None:
        raise ValueError("-o goes with a single run; with --prompts use --out-dir")
    if args.out_dir is None:
        raise ValueError("--prompts needs --out-dir DIR")
    if args.out_dir.exists() and not args.out_dir.is_dir():
        raise ValueError(f"--out-dir {args.out_dir} exists and is not a folder")
    return False


def read_jsonl(path: Path, fields: Sequence[str], default_seed: int) -> list[dict[str, Any]]:
    """The rows of a JSONL prompt file; each needs `fields`, an "id" usable as a file name (unique)
    and non-empty text in every other field, and may carry a "seed". Blank lines are skipped;
    errors name the line."""
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {path} does not exist")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text") from None
    rows: list[dict[str, Any]] = []
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
        out: dict[str, Any] = {"id": rid, "seed": check_seed(row.get("seed", default_seed), f"{where}: seed")}
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


# ---------------------------------------------------------------------- writing
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


def output_paths(args: argparse.Namespace, single: bool, rid: str) -> tuple[list[Path], Path]:
    """Single run: OUT itself for one image, else OUT_0.png, OUT_1.png, ... and OUT_sheet.png.
    Batch mode: DIR/<id>_<k>.png and DIR/<id>_sheet.png."""
    n = args.num_images
    if not single:
        return [args.out_dir / f"{rid}_{k}.png" for k in range(n)], args.out_dir / f"{rid}_sheet.png"
    output = args.output or Path("out.png")
    suffix = output.suffix or ".png"
    sheet = output.with_name(f"{output.stem}_sheet{suffix}")
    if n == 1:
        return [output], sheet
    return [output.with_name(f"{output.stem}_{k}{suffix}") for k in range(n)], sheet


def write_results(images: Sequence[Image.Image], paths: Sequence[Path], sheet: Path | None,
                  thoughts: Sequence[str] | None = None) -> None:
    """Write each image to its path, and with several images also the contact sheet. With
    `thoughts`, each image's thought is printed and written next to it (OUT.png -> OUT.txt)."""
    for k, (image, path) in enumerate(zip(images, paths)):
        save_png(path, image)
        print(path)
        if thoughts is not None:
            text = thoughts[k] + "\n"
            atomic_write(path.with_suffix(".txt"), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
            print(f"  thought: {thoughts[k]}")
    if sheet is not None and len(images) > 1:
        save_png(sheet, contact_sheet(images))
        print(sheet)


def generate_and_write(pipe: Any, args: argparse.Namespace, single: bool, rows: list[dict[str, Any]],
                       prompts: list[str], settings: GenerationSettings,
                       sources: list[Image.Image] | None = None) -> int:
    """Generate -n images per row (image k of a row: the row's seed + k) and write each row's
    files as soon as its images are done."""
    if not single:
        args.out_dir.mkdir(parents=True, exist_ok=True)
    n = args.num_images
    thinks = settings.thinks(edit=sources is not None)
    for i, images, thoughts in pipe.iter_generate(prompts, settings, [r["seed"] for r in rows], n, sources,
                                                  batch_images=args.batch_size * n, progress=True):
        write_results(images, *output_paths(args, single, rows[i]["id"]), thoughts if thinks else None)
    return 0
