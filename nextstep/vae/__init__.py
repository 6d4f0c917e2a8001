"""The image tokenizer (Flux-style KL autoencoder) used by NextStep."""

from .autoencoder import AutoencoderKL, DiagonalGaussian, VAEConfig

__all__ = ["AutoencoderKL", "DiagonalGaussian", "VAEConfig"]
