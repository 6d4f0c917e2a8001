"""The VAE's losses and its quality measure, one step's pieces of `vae.py`'s loop."""

from __future__ import annotations

import torch
from torch import Tensor

from ..vae.autoencoder import DiagonalGaussian
from .vae_config import LossConfig


def perturb(z: Tensor, noise_max: float, generator: torch.Generator) -> Tensor:
    """The noise regularisation: z + alpha * s * eps, alpha ~ U[0, noise_max] per image, eps ~ N(0, I).

    s is the image's own latent standard deviation (not differentiated). With
    `encoder_norm` s is ~1 and this is the paper's z + alpha * eps; without it,
    measuring the noise against the latents' scale keeps the encoder from
    escaping the regulariser by simply making its latents larger. Both draws
    come from `generator` on the CPU (like `DiagonalGaussian.sample`), so a seed
    gives the same noise on every device.
    """
    shape = (z.shape[0],) + (1,) * (z.dim() - 1)
    alpha = torch.rand(shape, generator=generator) * noise_max
    eps = torch.randn(z.shape, generator=generator)
    scale = z.detach().flatten(1).std(dim=1).reshape(shape)
    return z + scale * (alpha * eps).to(z.device, z.dtype)


def kl_loss(posterior: DiagonalGaussian) -> Tensor:
    """KL(N(mean, var) || N(0, I)) per latent element, averaged over all elements."""
    logvar = posterior.logvar
    return 0.5 * (posterior.mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()


def reconstruction_loss(x_rec: Tensor, x: Tensor, loss: LossConfig) -> Tensor:
    diff = x_rec - x
    out = diff.new_zeros(())
    if loss.l1:
        out = out + loss.l1 * diff.abs().mean()
    if loss.mse:
        out = out + loss.mse * diff.pow(2).mean()
    return out


def psnr(x_rec: Tensor, x: Tensor) -> Tensor:
    """Per-image PSNR in dB of pixels in [-1, 1] (the reconstruction clamped to that range), peak = full range."""
    mse = ((x_rec.clamp(-1, 1) - x) / 2).pow(2).flatten(1).mean(1)  # in [0, 1] pixel units
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))
