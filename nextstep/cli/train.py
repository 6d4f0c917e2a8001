"""`nextstep train CONFIG [--resume]`: one training stage, or every stage of a recipe folder in order."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train NextStep (one stage, or a whole recipe)",
                       description="Train one stage from a TOML config, or, given a recipe folder, every "
                                   "numbered stage file in it (in number order) that has not finished yet, up to "
                                   "a number held by several files (alternatives, such as 5-grpo and 5-dpo: "
                                   "run the one you want by name). Under "
                                   "torchrun the model is sharded across ranks with FSDP2.")
    p.add_argument("config", type=Path, help="a stage's .toml file, or a recipe folder of them")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint of the run")
    p.add_argument("--plan", action="store_true",
                   help="print each stage's per-rank memory plan (parameters, gradients, optimizer state, "
                        "activations with and without checkpointing) and whether it fits; train nothing. "
                        "Exits 1 if a plan does not fit")
    p.add_argument("--ranks", type=int, default=None,
                   help="--plan: the number of ranks (default: torchrun's WORLD_SIZE, else 1)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="--plan: the kind of device the ranks run on (default cuda; its memory is "
                        "[distributed] device_memory_gib, else this machine's GPU, else 80 GiB)")
    p.set_defaults(run=run)


def stage_number(path: Path) -> int:
    """The leading number of a stage file's name ("10-dpo.toml" -> 10), so stage 10 runs after 9."""
    digits = path.stem[:len(path.stem) - len(path.stem.lstrip("0123456789"))]
    return int(digits)


def stage_files(path: Path) -> list[Path]:
    """A stage file, or a recipe folder's numbered stage files in number order."""
    if path.is_dir():
        numbered = [p for p in path.glob("*.toml") if p.stem[:1].isdigit()]
        files = sorted(numbered, key=lambda p: (stage_number(p), p.name))
        if not files:
            raise FileNotFoundError(f"{path} holds no numbered stage files (e.g. 1-pretrain.toml)")
        return files
    return [path]


def alternatives(files: list[Path]) -> dict[int, list[Path]]:
    """Stage numbers held by more than one file (e.g. 5-grpo.toml and 5-dpo.toml): the user picks one."""
    by_number: dict[int, list[Path]] = {}
    for f in files:
        by_number.setdefault(stage_number(f), []).append(f)
    return {n: fs for n, fs in by_number.items() if len(fs) > 1}


def run(args: argparse.Namespace) -> int:
    from ..training.config import TrainConfig
    from ..training.train import train

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    files = stage_files(args.config)
    configs = [TrainConfig.from_file(f) for f in files]
    if args.plan:
        return print_plans(configs, args)
    choices = alternatives(files) if len(files) > 1 else {}
    for f, config in zip(files, configs):
        if len(files) > 1:
            if stage_number(f) in choices:
                names = " and ".join(p.name for p in choices[stage_number(f)])
                print(f"{names} are alternatives for stage {stage_number(f)}: run the one you want by name "
                      f"(nextstep train {args.config / '<file>'}); stopping here")
                break
            if (Path(config.out_dir) / "DONE").exists():
                print(f"{f.name}: already finished ({config.out_dir}/DONE)")
                continue
        export = train(config, resume=args.resume or len(files) > 1)
        print(f"{f.name}: model exported to {export}")
    return 0


def print_plans(configs: list, args: argparse.Namespace) -> int:
    """`--plan`: each stage's memory plan; 0 if every plan fits, 1 if one does not."""
    import os

    import torch

    from ..training.plan import GIB, largest_micro_batch, training_plan

    ranks = args.ranks or int(os.environ.get("WORLD_SIZE", "1"))
    all_fit = True
    for config in configs:
        if config.distributed.device_memory_gib:
            memory = int(config.distributed.device_memory_gib * GIB)
        elif args.device == "cuda" and torch.cuda.is_available():
            memory = torch.cuda.get_device_properties(0).total_memory
        else:
            memory = 80 * GIB
        plan = training_plan(config, ranks, args.device, memory)
        print(f"{config.source}: {plan.table()}")
        if not plan.fits:
            fitting = largest_micro_batch(config, ranks, args.device, memory)
            print(f"  the largest micro-batch per rank that fits: {fitting}")
        all_fit = all_fit and plan.fits
    return 0 if all_fit else 1
