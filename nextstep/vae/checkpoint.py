"""Reading VAE weight files: safetensors or a weights-only pickle, the diffusers layout, strict key checks."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import Tensor, nn

from ..errors import CheckpointError

# Weight files we look for, in order of preference: safetensors cannot run code.
SAFETENSORS_NAMES = ("model.safetensors", "diffusion_pytorch_model.safetensors", "checkpoint.safetensors")
PICKLE_NAME = "checkpoint.pt"


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """Read a flat name -> tensor dict; every failure becomes a CheckpointError naming `path`."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            # weights_only: a pickle can run arbitrary code; this refuses anything but tensors/containers.
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt, truncated, or code-carrying file
        raise CheckpointError(f"cannot load VAE weights from {path}: {type(e).__name__}: {e}") from e
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in sd.items()):
        raise CheckpointError(f"{path} does not hold a flat state_dict of named tensors")
    return sd


# diffusers' AutoencoderKL names (what NextStep-1.1's VAE wrapper holds after converting the
# checkpoint) -> the Flux-style names of the official checkpoint and of this module.
_DIFFUSERS_RENAMES = [
    (r"\.conv_shortcut\.", ".nin_shortcut."), (r"\.conv_norm_out\.", ".norm_out."),
    (r"\.mid_block\.resnets\.0\.", ".mid.block_1."), (r"\.mid_block\.resnets\.1\.", ".mid.block_2."),
    (r"\.mid_block\.attentions\.0\.group_norm\.", ".mid.attn_1.norm."),
    (r"\.mid_block\.attentions\.0\.to_q\.", ".mid.attn_1.q."),
    (r"\.mid_block\.attentions\.0\.to_k\.", ".mid.attn_1.k."),
    (r"\.mid_block\.attentions\.0\.to_v\.", ".mid.attn_1.v."),
    (r"\.mid_block\.attentions\.0\.to_out\.0\.", ".mid.attn_1.proj_out."),
    (r"\.down_blocks\.", ".down."), (r"\.resnets\.", ".block."),
    (r"\.downsamplers\.0\.", ".downsample."), (r"\.upsamplers\.0\.", ".upsample."),
]


def from_diffusers_layout(sd: dict[str, Tensor], n_levels: int) -> dict[str, Tensor]:
    """Rename a diffusers-layout VAE state dict to ours; other dicts pass through unchanged.

    diffusers numbers decoder levels from the lowest resolution (`up_blocks.0`),
    the Flux layout from the highest (`up.0`), and stores the attention's 1x1
    convolutions as linear weights.
    """
    if not any(".mid_block." in k or "_blocks." in k for k in sd):
        return sd
    out = {}
    for key, value in sd.items():
        new = re.sub(r"^decoder\.up_blocks\.(\d+)\.",
                     lambda m: f"decoder.up.{n_levels - 1 - int(m.group(1))}.", key)
        for pattern, repl in _DIFFUSERS_RENAMES:
            new = re.sub(pattern, repl, new)
        if ".mid.attn_1." in new and new.endswith(".weight") and value.dim() == 2:
            value = value[:, :, None, None]
        out[new] = value
    return out


def check_state_dict(model: nn.Module, sd: dict[str, Tensor], path: Path) -> None:
    """Refuse any missing, unexpected or mis-shaped key (the reference silently kept random weights)."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    mismatched = [
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {expected[k]}"
        for k in expected
        if k in sd and tuple(sd[k].shape) != expected[k]
    ]
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
        if keys:
            more = f" (+{len(keys) - 5} more)" if len(keys) > 5 else ""
            problems.append(f"{len(keys)} {label}: {keys[:5]}{more}")
    if problems:
        raise CheckpointError(f"VAE weights in {path} do not fit the config: " + "; ".join(problems))
