"""The `nextstep` command line. Each subcommand lives in its own module with a `register(subparsers)`."""

from __future__ import annotations

import argparse
import sys

from ..errors import NextStepError
from . import data, edit, generate, plan, serve, train, train_vae
from . import eval as evaluate

COMMANDS = [generate, edit, evaluate, data, train, train_vae, serve, plan]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nextstep", description="NextStep-1 image generation in plain PyTorch")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS:
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except (NextStepError, ValueError, TypeError, FileNotFoundError) as e:
        # Bad input: one clear line, no traceback.
        print(f"nextstep {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
