"""Stage kinds: what differs between the stages that `train()`'s one loop runs.

The loop (`train.py`) owns the optimizer, learning rate, clipping, checkpoints,
the metrics log, sample grids and export. A stage kind supplies, per step, the
forward and backward passes (its batches or rollouts and its loss), the metrics
to log, and the state a resume needs:

    accumulate_gradients(step) -> sums   forward + backward of step `step` (gradients
                                         accumulate in ctx.trained); values that add up
                                         over ranks, with "samples" among them
    metrics(sums) -> dict                the rank-summed sums -> the metrics logged
    postfix(record) -> dict              a few of them for the progress bar
    state_dict() / load_state_dict()     the per-rank position saved in checkpoints

Kinds: the supervised stages (`supervised.py`), "grpo" (`grpo_stage.py`),
"dpo" (`dpo.py`). Post-training kinds compare against the frozen model they
started from: `reference_model`.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from ..io import load_model
from ..model import NextStep
from ..settings import read_generation_defaults
from ..text import TextTokenizer
from ..vae import AutoencoderKL
from .config import TrainConfig
from .distributed import Env


@dataclass
class StageContext:
    """Everything a stage kind gets from the loop."""

    config: TrainConfig
    env: Env
    model: NextStep  # the unwrapped model (its config, its pieces)
    trained: nn.Module  # what the loop optimizes (FSDP-wrapped under torchrun): call it for gradients
    tokenizer: TextTokenizer
    vae: AutoencoderKL  # frozen
    autocast: AbstractContextManager


class Stage(Protocol):
    def accumulate_gradients(self, step: int) -> dict[str, float]: ...

    def metrics(self, sums: dict[str, float]) -> dict[str, float]: ...

    def postfix(self, record: dict[str, float]) -> dict[str, str]: ...

    def state_dict(self) -> list[dict]: ...

    def load_state_dict(self, states: list[dict]) -> None: ...


def make_stage(ctx: StageContext) -> Stage:
    """The stage kind `ctx.config.stage` names."""
    kind = ctx.config.stage
    if kind == "grpo":
        from .grpo_stage import GRPOStage

        return GRPOStage(ctx)
    if kind == "dpo":
        from .dpo import DPOStage

        return DPOStage(ctx)
    from .supervised import SupervisedStage

    return SupervisedStage(ctx)


def reference_model(config: TrainConfig, device: torch.device) -> NextStep:
    """The frozen model a post-training stage starts from (`init_from`), for KL terms and
    reference losses: float32, eval mode, no gradients. Every rank holds a whole copy."""
    if not config.init_from:
        raise ValueError(f"{config.source or 'training config'}: stage {config.stage!r} needs init_from "
                         "(the reference model)")
    return load_model(Path(config.init_from), device, torch.float32).eval().requires_grad_(False)


def init_defaults(config: TrainConfig) -> dict:
    """The generation defaults of the model a stage starts from (its folder's
    `generation_defaults.json`, e.g. the shipped model's size), for rollouts and sample grids."""
    return read_generation_defaults(Path(config.init_from))[0] if config.init_from else {}
