"""Package a trained model for shipping: the official layout, generation defaults, a model card.

`python -m nextstep.training.ship EXPORT DEST --defaults D.json --card CARD.md [--vae DIR] [--dtype bfloat16]`
copies a finished run's export (model, tokenizer, VAE) to DEST, its
floating-point tensors stored in `--dtype` (float32 keeps the trained weights
exactly; bfloat16 halves the bytes, and the pipeline loads either in its own
dtype), and writes `generation_defaults.json` (what the command line and
`pipe(...)` use when not told otherwise) and `MODEL_CARD.md` (`--card` may be
DEST's own card: it is read before anything is written, so reshipping a model
keeps the card it ships with). `--vae` ships
another VAE instead of the export's: one whose decoder was fine-tuned with
`freeze_encoder` (same encoder, same latent scaling), which the model fits as
it fits its own; any other VAE is refused. `--blend OTHER W` ships the weighted
average (1 - W) * EXPORT + W * OTHER of two runs of the same model (a "model soup":
say, a stage's export and the one before it), which can generalise better than
either; OTHER must have the same architecture, tokenizer and latent space.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch

from ..io import load_model, save_model
from ..settings import read_generation_defaults
from ..text import TextTokenizer
from ..vae import AutoencoderKL
from .blend import blend_into, check_same_latents


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def ship(export: Path, dest: Path, defaults: dict, card: str, dtype: torch.dtype = torch.float32,
         vae_dir: Path | None = None, blend: tuple[Path, float] | None = None) -> int:
    """Write the shipped model to `dest` (replaced as a whole); returns its size in bytes."""
    # Everything is loaded and checked in float32 (what the exports store), then cast once.
    model = load_model(export, torch.device("cpu"), torch.float32)
    family = model.config.family
    tokenizer = TextTokenizer.from_pretrained(export)
    own_vae = AutoencoderKL.from_pretrained(export / (model.config.vae_name_or_path or "vae"), family=family)
    if blend:
        blend_into(model, tokenizer, own_vae, *blend)
    vae = own_vae
    if vae_dir is not None:
        vae = AutoencoderKL.from_pretrained(vae_dir, family=family)
        check_same_latents(own_vae, vae)
    model, vae = model.to(dtype), vae.to(dtype)
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Build next to the destination and swap it in, so an interrupted ship never leaves half a model.
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; this is a model for everyone
    try:
        save_model(model, tmp, config_updates={"vae_name_or_path": "vae"})
        tokenizer.save_pretrained(tmp)
        vae.save_pretrained(tmp / "vae")
        (tmp / "generation_defaults.json").write_text(json.dumps(defaults, indent=2) + "\n")
        (tmp / "MODEL_CARD.md").write_text(card)
        read_generation_defaults(tmp)  # refuse to ship defaults the pipeline would not load
        old = dest.with_name(f".{dest.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if dest.exists():
            dest.rename(old)
        tmp.rename(dest)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder_bytes(dest)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("export", type=Path, help="a finished run's export folder")
    p.add_argument("dest", type=Path, help="where the shipped model goes (e.g. nextstep/assets/shapes)")
    p.add_argument("--defaults", type=Path, required=True, help="generation_defaults.json to ship")
    p.add_argument("--card", type=Path, required=True,
                   help="MODEL_CARD.md to ship (DEST/MODEL_CARD.md, the card already shipped, is fine)")
    p.add_argument("--vae", type=Path, help="ship this VAE (the same encoder, a fine-tuned decoder) instead")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="dtype of the stored weights")
    p.add_argument("--blend", nargs=2, metavar=("OTHER", "W"),
                   help="ship (1 - W) * EXPORT + W * OTHER, OTHER another export of the same model")
    args = p.parse_args(argv)
    blend = None
    if args.blend:
        try:
            blend = (Path(args.blend[0]), float(args.blend[1]))
        except ValueError:
            p.error(f"--blend weight must be a number, got {args.blend[1]!r}")
    try:
        # Both files are read before DEST is replaced: either may be DEST's own.
        defaults, card = json.loads(args.defaults.read_text()), args.card.read_text()
        size = ship(args.export, args.dest, defaults, card, getattr(torch, args.dtype), args.vae, blend)
    except ValueError as e:  # models or VAEs that do not go together: one line, nothing written
        p.error(str(e))
    print(f"shipped {args.export} -> {args.dest}: {size / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
