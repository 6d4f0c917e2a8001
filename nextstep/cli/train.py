"""`nextstep train CONFIG [--resume]`: one training stage, or every stage of a recipe folder in order."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train NextStep (one stage, or a whole recipe)",
                       description="Train one stage from a TOML config, or, given a recipe folder, every "
                                   "numbered stage file in it (in number order) that has not finished yet. Under "
                                   "torchrun the model is sharded across ranks with FSDP2.")
    p.add_argument("config", type=Path, help="a stage's .toml file, or a recipe folder of them")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint of the run")
    p.set_defaults(run=run)


def stage_number(path: Path) -> int:
    """The leading number of a stage file's name ("10-dpo.toml" -> 10), so stage 10 runs after 9."""
    digits = path.stem[:len(path.stem) - len(path.stem.lstrip("0123456789"))]
    return int(digits)


def stage_files(path: Path) -> list[Path]:
    if path.is_dir():
        numbered = [p for p in path.glob("*.toml") if p.stem[:1].isdigit()]
        files = sorted(numbered, key=lambda p: (stage_number(p), p.name))
        if not files:
            raise FileNotFoundError(f"{path} holds no numbered stage files (e.g. 1-pretrain.toml)")
        return files
    return [path]


def run(args: argparse.Namespace) -> int:
    from ..training.config import NOT_AVAILABLE, TrainConfig
    from ..training.train import train

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    files = stage_files(args.config)
    configs = [TrainConfig.from_file(f) for f in files]
    for f, config in zip(files, configs):
        if len(files) > 1:
            if config.stage in NOT_AVAILABLE:
                print(f"{f.name}: the {NOT_AVAILABLE[config.stage]} stage is not available yet; stopping here")
                break
            if (Path(config.out_dir) / "DONE").exists():
                print(f"{f.name}: already finished ({config.out_dir}/DONE)")
                continue
        export = train(config, resume=args.resume or len(files) > 1)
        print(f"{f.name}: model exported to {export}")
    return 0
