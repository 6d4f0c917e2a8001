"""The image tokenizer: a Flux-style KL autoencoder (f8, 16 latent channels).

Pixels in [-1, 1] go through a convolutional encoder to a diagonal Gaussian
over latents with `2 ** (len(ch_mult) - 1)` times fewer pixels per side; the
decoder maps latents back to pixels. Module and parameter names follow the
checkpoint layout exactly (`encoder.down.0.block.0.norm1.weight`, ...), so the
official state_dict loads with strict checking and no renaming.

NextStep adds one twist over FLUX.1's VAE: with `encoder_norm`, the posterior
mean is layer-normalised (optionally per `psz x psz` patch), so the latents the
language model sees are already roughly unit-scaled.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import CheckpointError, ConfigError
from ..io.atomic import atomic_write

CONFIG_NAME = "config.json"
# Weight files we look for, in order of preference: safetensors cannot run code.
SAFETENSORS_NAMES = ("model.safetensors", "diffusion_pytorch_model.safetensors", "checkpoint.safetensors")
PICKLE_NAME = "checkpoint.pt"


# --------------------------------------------------------------------------- config


FAMILIES = ("nextstep-1", "nextstep-1.1")
# What the NextStep-1.1 loader assumes for keys its config.json omits (1.0's are the field defaults).
FAMILY_DEFAULTS = {"nextstep-1.1": dict(scaling_factor=1.0, shift_factor=0.0, deterministic=True,
                                        encoder_norm=True, psz=1)}


@dataclass
class VAEConfig:
    """The reference's `AutoEncoderParams`, with the same defaults.

    `family` says which official code the folder was made for: NextStep-1.1
    wraps the same weights in diffusers' AutoencoderKL, whose encoder widens
    to `ch * ch_mult[0]` at `conv_in` (Flux's stays at `ch`; they agree when
    ch_mult[0] == 1, as in the released tokenizer), applies `encoder_norm`
    only with `psz` set, and has other defaults for missing keys.
    """

    resolution: int = 256  # only informational: no layer depends on it
    in_channels: int = 3
    ch: int = 128
    out_ch: int = 3
    ch_mult: tuple[int, ...] = field(default=(1, 2, 4, 4))
    num_res_blocks: int = 2
    z_channels: int = 16
    scaling_factor: float = 0.3611
    shift_factor: float = 0.1159
    deterministic: bool = False
    encoder_norm: bool = False
    psz: int | None = None
    family: str = "nextstep-1"

    def __post_init__(self) -> None:
        # JSON gives lists; a tuple keeps the config hashable and immutable-looking.
        self.ch_mult = tuple(int(m) for m in self.ch_mult)
        if self.family not in FAMILIES:
            raise ConfigError(f"unknown VAE family {self.family!r}; expected one of {FAMILIES}")

    @classmethod
    def from_dict(cls, d: dict[str, Any], family: str | None = None) -> "VAEConfig":
        """`family` (or a "family" key) picks the defaults for missing keys; see the class doc."""
        family = family or d.get("family", "nextstep-1")
        d = {**FAMILY_DEFAULTS.get(family, {}), **d, "family": family}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            # The reference ignores these with a log line; we do the same, but loudly enough to notice.
            warnings.warn(f"VAEConfig: ignoring unknown config keys {unknown}", stacklevel=2)
        try:
            return cls(**{k: v for k, v in d.items() if k in known})
        except (TypeError, ValueError) as e:
            raise ConfigError(f"invalid VAE config: {e}") from e

    @classmethod
    def from_pretrained(cls, folder_or_json: str | os.PathLike, family: str | None = None) -> "VAEConfig":
        path = Path(folder_or_json)
        if path.is_dir():
            path = path / CONFIG_NAME
        try:
            d = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot read VAE config {path}: {e}") from e
        if not isinstance(d, dict):
            raise ConfigError(f"VAE config {path} must hold a JSON object, got {type(d).__name__}")
        return cls.from_dict(d, family)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["ch_mult"] = list(self.ch_mult)
        if self.family == "nextstep-1":
            del d["family"]  # the official layout; official loaders ignore the key for 1.1
        return d


# --------------------------------------------------------------------------- posterior


class DiagonalGaussian:
    """The encoder's posterior N(mean, exp(logvar)), per latent element."""

    def __init__(self, mean: Tensor, logvar: Tensor, deterministic: bool = False) -> None:
        self.mean = mean
        # Clamp like diffusers' DiagonalGaussianDistribution so exp() never over/underflows.
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.deterministic = deterministic
        if deterministic:
            self.std = torch.zeros_like(mean)
            self.var = torch.zeros_like(mean)
        else:
            self.std = torch.exp(0.5 * self.logvar)
            self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        # Noise is always drawn on the CPU (from `generator`, or the global CPU RNG), so the
        # same seed gives the same sample on every device. It is drawn even when
        # deterministic (std = 0) because the reference does, and the RNG must advance alike.
        eps = torch.randn(self.mean.shape, generator=generator, dtype=self.mean.dtype, device="cpu")
        return self.mean + self.std * eps.to(self.mean.device)

    def mode(self) -> Tensor:
        return self.mean


# --------------------------------------------------------------------------- building blocks


def _swish(x: Tensor) -> Tensor:
    # Written out rather than F.silu: the fused kernel rounds differently, and this form
    # reproduces the reference bit for bit.
    return x * torch.sigmoid(x)


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """(GroupNorm, SiLU, conv3x3) twice, plus a residual (1x1 conv when channels change)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm1 = _group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(_swish(self.norm1(x)))
        h = self.conv2(_swish(self.norm2(h)))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels (used only in the mid block)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = _group_norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        # (B, C, H, W) -> (B, 1 head, H*W tokens, C), made contiguous in that layout:
        # the same values in another memory layout give a (1e-6) different SDPA result.
        q, k, v = (
            proj(y).permute(0, 2, 3, 1).reshape(b, 1, h * w, c).contiguous() for proj in (self.q, self.k, self.v)
        )
        y = F.scaled_dot_product_attention(q, k, v)
        y = y.reshape(b, h, w, c).permute(0, 3, 1, 2)
        return x + self.proj_out(y)


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        # Pad only right/bottom: this is what the checkpoint was trained with
        # (a symmetric padding=1 conv would shift the sampling grid by one pixel).
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Level(nn.Module):
    """One resolution level: `block` (ResnetBlocks), then an optional down/upsample.

    An empty container keeps the checkpoint's names (`down.{i}.block.{j}`, `down.{i}.downsample`).
    """

    def __init__(self, blocks: list[ResnetBlock], resample: nn.Module | None, resample_name: str) -> None:
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.resample_name = resample_name
        if resample is not None:
            self.add_module(resample_name, resample)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.block:
            x = block(x)
        resample = getattr(self, self.resample_name, None)
        return x if resample is None else resample(x)


# --------------------------------------------------------------------------- encoder / decoder


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        n_levels = len(cfg.ch_mult)
        block_in = cfg.ch if cfg.family == "nextstep-1" else cfg.ch * cfg.ch_mult[0]
        self.conv_in = nn.Conv2d(cfg.in_channels, block_in, 3, padding=1)
        self.down = nn.ModuleList()
        for i, mult in enumerate(cfg.ch_mult):
            block_out = cfg.ch * mult
            blocks = []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(block_in, block_out))
                block_in = block_out
            # Every level but the last halves the resolution.
            down = Downsample(block_in) if i != n_levels - 1 else None
            self.down.append(Level(blocks, down, "downsample"))
        self.mid = MidBlock(block_in)
        self.norm_out = _group_norm(block_in)
        # Twice z_channels: mean and log-variance.
        self.conv_out = nn.Conv2d(block_in, 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(_swish(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        n_levels = len(cfg.ch_mult)
        block_in = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, padding=1)
        self.mid = MidBlock(block_in)
        # Built from the lowest resolution up, but stored so that `up.{i}` mirrors `down.{i}`
        # (the checkpoint's numbering); forward therefore walks `up` in reverse.
        levels: list[Level] = []
        for i in reversed(range(n_levels)):
            block_out = cfg.ch * cfg.ch_mult[i]
            blocks = []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, block_out))
                block_in = block_out
            up = Upsample(block_in) if i != 0 else None
            levels.insert(0, Level(blocks, up, "upsample"))
        self.up = nn.ModuleList(levels)
        self.norm_out = _group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, cfg.out_ch, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(_swish(self.norm_out(h)))


# --------------------------------------------------------------------------- encoder_norm


def _layer_norm_channels(x: Tensor) -> Tensor:
    """LayerNorm (no affine, eps 1e-6) over the channel axis at every spatial position."""
    return F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), eps=1e-6).permute(0, 3, 1, 2)


def _normalize_mean(mean: Tensor, psz: int | None) -> Tensor:
    if psz is None:
        return _layer_norm_channels(mean)
    b, c, h, w = mean.shape
    if h % psz or w % psz:
        raise ValueError(f"latent size {h}x{w} is not divisible by psz={psz}")
    # Patchify to (B, C*p*p, H/p, W/p) with channel index c*p*p + i*p + j, normalise, undo.
    x = mean.reshape(b, c, h // psz, psz, w // psz, psz).permute(0, 1, 3, 5, 2, 4)
    x = _layer_norm_channels(x.reshape(b, c * psz * psz, h // psz, w // psz))
    x = x.reshape(b, c, psz, psz, h // psz, w // psz).permute(0, 1, 4, 2, 5, 3)
    return x.reshape(b, c, h, w)


# --------------------------------------------------------------------------- checkpoint files


def _read_state_dict(path: Path) -> dict[str, Tensor]:
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


def _from_diffusers_layout(sd: dict[str, Tensor], n_levels: int) -> dict[str, Tensor]:
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


def _check_state_dict(model: nn.Module, sd: dict[str, Tensor], path: Path) -> None:
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


# --------------------------------------------------------------------------- the model


class AutoencoderKL(nn.Module):
    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)

    @property
    def down_factor(self) -> int:
        return 2 ** (len(self.config.ch_mult) - 1)

    def encode(self, x: Tensor) -> DiagonalGaussian:
        """Pixels in [-1, 1], (B, 3, H, W) -> posterior over (B, z, H/f, W/f)."""
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        if self.config.encoder_norm and (self.config.psz is not None or self.config.family == "nextstep-1"):
            # Only the mean is normalised; logvar is left as the encoder produced it.
            mean = _normalize_mean(mean, self.config.psz)
        return DiagonalGaussian(mean, logvar, deterministic=self.config.deterministic)

    def decode(self, z: Tensor) -> Tensor:
        """Raw (un-normalised) latents -> pixels in about [-1, 1]."""
        return self.decoder(z)

    def to_latents(self, pixels: Tensor, generator: torch.Generator | None = None, sample: bool = True) -> Tensor:
        """Pixels -> the scaled latents the language model consumes."""
        posterior = self.encode(pixels)
        z = posterior.sample(generator) if sample else posterior.mode()
        return (z - self.config.shift_factor) * self.config.scaling_factor

    def from_latents(self, latents: Tensor) -> Tensor:
        """Scaled latents (as produced by the language model) -> pixels."""
        return self.decode(latents / self.config.scaling_factor + self.config.shift_factor)

    @classmethod
    def from_pretrained(
        cls,
        folder: str | os.PathLike,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        family: str | None = None,
    ) -> "AutoencoderKL":
        """Load `config.json` + weights. `family` ("nextstep-1" or "nextstep-1.1") says which
        official code the folder was made for, when its config does not say (see VAEConfig)."""
        folder = Path(folder)
        if not folder.is_dir():
            raise CheckpointError(f"VAE folder {folder} does not exist")
        config_path = folder / CONFIG_NAME
        if not config_path.is_file():
            raise CheckpointError(f"VAE config {config_path} not found")
        try:
            config = VAEConfig.from_pretrained(config_path, family)
        except ConfigError as e:
            raise CheckpointError(f"bad VAE config {config_path}: {e}") from e

        candidates = [folder / n for n in (*SAFETENSORS_NAMES, PICKLE_NAME)]
        weights = next((p for p in candidates if p.is_file()), None)
        if weights is None:
            raise CheckpointError(f"no VAE weights in {folder} (looked for {[p.name for p in candidates]})")
        sd = _from_diffusers_layout(_read_state_dict(weights), len(config.ch_mult))

        # Build without allocating, then adopt the loaded tensors: weights are never held twice.
        with torch.device("meta"):
            model = cls(config)
        _check_state_dict(model, sd, weights)
        model.load_state_dict(sd, strict=True, assign=True)
        if device is not None or dtype is not None:
            model.to(device=device, dtype=dtype)
        return model.eval()

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        atomic_write(folder / "model.safetensors", lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
        config_text = json.dumps(self.config.to_dict(), indent=2) + "\n"
        atomic_write(folder / CONFIG_NAME, lambda tmp: Path(tmp).write_text(config_text))
