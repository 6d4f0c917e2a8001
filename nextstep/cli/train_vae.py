"""`nextstep train-vae CONFIG.toml [--resume]`: train the image tokenizer."""

from __future__ import annotations

import argparse
from pathlib import Path

DESCRIPTION = """\
Train the VAE image tokenizer (reconstruction + KL losses with NextStep-1's latent
noise regularisation), then measure the latent normalisation (shift_factor,
scaling_factor) and the reconstruction PSNR on held-out images.

The run folder (out_dir in the config) receives metrics.jsonl (one line per step),
checkpoints/ (the last train.keep_last), report.json and export/, a VAE folder that
AutoencoderKL.from_pretrained loads. The keys shared with `nextstep train` (out_dir,
[optim], data.batch_size, [train]) mean the same there; see recipes/shapes/vae.toml."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train-vae", help="train the VAE image tokenizer",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", type=Path, help="training config (TOML), e.g. recipes/shapes/vae.toml")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in out_dir from its newest checkpoint (start afresh if it has none)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    # Imported here so that `nextstep --help` does not import torch.
    from ..training.vae import train_vae
    from ..training.vae_config import VAETrainConfig

    config = VAETrainConfig.from_file(args.config)
    export = train_vae(config, resume=args.resume, progress=not args.no_progress)
    print(export)
    return 0
