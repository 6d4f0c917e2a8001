"""The image tokenizer: a Flux-style KL autoencoder (f8, 16 latent channels).

Pixels in [-1, 1] go through a convolutional encoder to a diagonal Gaussian
over latents with `2 ** (len(ch_mult) - 1)` times fewer pixels per side; the
decoder maps latents back to pixels. Module and parameter names follow the
checkpoint layout exactly (`encoder.down.0.block.0.norm1.weight`, ...), so the
official state_dict loads with strict checking and no renaming.

NextStep adds one twist over FLUX.1's VAE: with `encoder_norm`, the posterior
mean is layer-normalised (optionally per `psz x psz` patch), so the latents the
language model sees are already roughly unit-scaled.

This module is the wrapper (encode/decode, latent scaling, loading, saving);
the networks are in `networks.py`, the config in `config.py`, and weight-file
reading in `checkpoint.py`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import CheckpointError, ConfigError
from ..io.atomic import atomic_write
from .checkpoint import PICKLE_NAME, SAFETENSORS_NAMES, check_state_dict, from_diffusers_layout, read_state_dict
from .config import CONFIG_NAME, VAEConfig
from .networks import Decoder, Encoder

__all__ = ["AutoencoderKL", "DiagonalGaussian", "VAEConfig"]


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
        sd = from_diffusers_layout(read_state_dict(weights), len(config.ch_mult))

        # Build without allocating, then adopt the loaded tensors: weights are never held twice.
        with torch.device("meta"):
            model = cls(config)
        check_state_dict(model, sd, weights)
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
