"""What an `[optim]` table means, for both training loops (`train.py` and `vae.py`).

AdamW with the table's `lr`, `betas` and `weight_decay`. The learning rate of
step s (0-based) rises linearly over the first `warmup_steps` steps, then stays
at `lr` (`schedule = "constant"`) or falls along a cosine to `min_lr_ratio * lr`
at the last step (`"cosine"`). It is a function of the step alone, set before
each optimizer step, so a resumed run needs nothing saved to continue it. The
gradients' total norm is clipped to `grad_clip` (0: not clipped). `grad_accum`
micro-batches make one step (the model's loop; the VAE's takes 1 only).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor

from .config import OptimSection



def learning_rate(step: int, optim: OptimSection, steps: int) -> float:
    """The learning rate of step `step` (0-based) of a run of `steps` steps."""
    if step < optim.warmup_steps:
        factor = (step + 1) / optim.warmup_steps
    elif optim.schedule == "constant":
        factor = 1.0
    else:
        progress = min(1.0, (step - optim.warmup_steps) / max(1, steps - optim.warmup_steps))
        factor = optim.min_lr_ratio + (1 - optim.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    # lr times the factor, as torch's LambdaLR computed it for earlier model runs (bit for bit).
    return optim.lr * factor


def set_learning_rate(optimizer: torch.optim.Optimizer, optim: OptimSection, step: int, steps: int) -> float:
    """Give every parameter group step `step`'s learning rate; returns it."""
    lr = learning_rate(step, optim, steps)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def adamw(params: Iterable[torch.nn.Parameter], optim: OptimSection) -> torch.optim.AdamW:
    optimizer = torch.optim.AdamW(params, lr=optim.lr, betas=tuple(optim.betas), weight_decay=optim.weight_decay)
    for group in optimizer.param_groups:
        # The key torch's LR schedulers add: model checkpoints of earlier versions (LambdaLR) carry
        # it, and `distributed.load_checkpoint` (DCP) refuses keys the optimizer lacks.
        group["initial_lr"] = optim.lr
    return optimizer


def clip_gradients(params: Iterable[torch.nn.Parameter], optim: OptimSection) -> Tensor:
    """Clip the gradients' total norm to `grad_clip` (0: leave them); returns the norm before clipping."""
    return torch.nn.utils.clip_grad_norm_(params, optim.grad_clip if optim.grad_clip > 0 else math.inf)

