"""NextStep-1 in plain PyTorch: autoregressive image generation with continuous tokens."""

from .config import NextStepConfig
from .errors import CheckpointError, ConfigError, NextStepError
from .model import NextStep
from .pipeline import NextStepPipeline
from .vae import AutoencoderKL

__all__ = ["AutoencoderKL", "CheckpointError", "ConfigError", "NextStep", "NextStepConfig",
           "NextStepError", "NextStepPipeline"]
__version__ = "0.1.0"
