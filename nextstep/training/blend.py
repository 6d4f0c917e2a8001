"""Blending two runs of one model ("model soup"): the weighted average of their weights.

Used by `ship --blend` and by a training stage's `[init_blend]`. Both runs must share the
config (training-only fields aside), the tokenizer and the latent space.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..io import load_model
from ..model import NextStep
from ..text import TextTokenizer
from ..vae import AutoencoderKL
from .config import TRAINING_ONLY_FIELDS


def check_same_latents(trained_on: AutoencoderKL, other: AutoencoderKL) -> None:
    """Raise unless `other` maps images to exactly the latents `trained_on` does (encoder and scaling)."""
    a, b = trained_on.state_dict(), other.state_dict()
    differ = [k for k in a if k.startswith("encoder.") and (k not in b or not torch.equal(a[k], b[k]))]
    factors = [(trained_on.config.shift_factor, trained_on.config.scaling_factor),
               (other.config.shift_factor, other.config.scaling_factor)]
    if differ or factors[0] != factors[1]:
        what = f"{len(differ)} encoder tensors differ" if differ else f"(shift, scale) {factors[1]} != {factors[0]}"
        raise ValueError(f"not the latent space the model was trained on ({what}); only a VAE whose "
                         "decoder alone was fine-tuned (freeze_encoder = true) can replace it")


def blend_into(model: NextStep, tokenizer: TextTokenizer, vae: AutoencoderKL, other: Path, weight: float) -> None:
    """Set `model` (float32) to (1 - weight) * itself + weight * the model in `other`, which must share
    its config (training-only fields aside), its `tokenizer` and the latent space of its `vae`."""
    if not 0 < weight < 1:
        raise ValueError(f"blend weight must be between 0 and 1 (exclusive), got {weight}")
    second = load_model(other, torch.device("cpu"), torch.float32)
    mine, theirs = (m.config.to_dict() for m in (model, second))
    differ = sorted(k for k in mine.keys() | theirs.keys()
                    if k not in TRAINING_ONLY_FIELDS and mine.get(k) != theirs.get(k))
    if differ:
        raise ValueError(f"cannot blend with {other}: the configs differ in {differ}")
    if TextTokenizer.from_pretrained(other).tokenizer.to_str() != tokenizer.tokenizer.to_str():
        raise ValueError(f"cannot blend with {other}: the tokenizers differ")
    check_same_latents(vae, AutoencoderKL.from_pretrained(other / (theirs["vae_name_or_path"] or "vae"),
                                                          family=model.config.family))
    theirs_sd = second.state_dict()
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point():
                tensor.lerp_(theirs_sd[name], weight)
