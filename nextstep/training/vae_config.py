"""VAETrainConfig: what `nextstep train-vae` reads from a TOML file.

The words shared with the model's training (`config.py`) mean the same and sit
in the same places: `out_dir`, `steps`, `seed`, `init_from`, the `[optim]`
table (`OptimSection`, with the VAE's defaults), `data.batch_size`,
`train.checkpoint_every` and `train.keep_last`. A file in the VAE's earlier
vocabulary (`run_dir`, a top-level `lr`, ...) fails naming each key's new
spelling (`RENAMED`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import ConfigError
from ..vae.autoencoder import VAEConfig
from .config import DataSource, OptimSection
from .config_file import build, read_toml, to_dict

# Keys that may change between a run and its resume without changing the steps already taken
# (a new `steps` stretches the cosine schedule from the resumed step on).
RESUMABLE_CHANGES = {"steps", "train.checkpoint_every", "train.keep_last", "heldout", "data.heldout_source",
                     "data.heldout_seed"}
# Fields of the VAE config the training computes itself.
COMPUTED_VAE_KEYS = ("scaling_factor", "shift_factor")
# The earlier vocabulary: old key -> where it is now.
RENAMED = {"run_dir": "out_dir", "lr": "optim.lr", "betas": "optim.betas", "weight_decay": "optim.weight_decay",
           "warmup_steps": "optim.warmup_steps", "min_lr_ratio": "optim.min_lr_ratio",
           "grad_clip": "optim.grad_clip", "batch_size": "data.batch_size",
           "checkpoint_every": "train.checkpoint_every", "keep_last": "train.keep_last"}


@dataclass
class DataConfig:
    source: str = "shapes"  # "shapes", or a folder / .jsonl manifest / WebDataset shards
    image_size: int = 64  # training images are (image_size, image_size); real images are centre-cropped
    batch_size: int = 16
    seed: int = 0  # shapes: the world's seed; real data: the shuffle seed
    heldout_source: str | None = None  # required for real data: images never trained on
    heldout_seed: int | None = None  # shapes: the held-out world's seed (default: seed + 1)
    dark_prob: float = 0.2  # shapes: the share of images on a dark background (the world's default)

    @property
    def is_shapes(self) -> bool:
        return self.source == "shapes"

    def as_source(self, path: str) -> DataSource:
        """`path` ("shapes" or image files) as the model training's DataSource of these images."""
        if path == "shapes":
            return DataSource(kind="shapes", size=self.image_size, dark_prob=self.dark_prob)
        return DataSource(kind="files", path=path, resolution=self.image_size)


@dataclass
class LossConfig:
    l1: float = 1.0
    mse: float = 0.0
    kl: float = 1e-6
    noise_max: float = 0.5  # gamma: alpha ~ U[0, gamma] per image
    # With init_from: weight of the mean squared distance between the posterior means and those
    # of the init_from encoder (a frozen copy). It keeps a fine-tuned encoder's latent space near
    # the one generators were trained on, so they follow it in a short stage.
    anchor: float = 0.0


@dataclass
class VAEOptimSection(OptimSection):
    """[optim] as for the model, with the VAE's defaults."""

    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: str = "cosine"


@dataclass
class VAETrainSection:
    checkpoint_every: int = 500
    keep_last: int = 3


@dataclass
class VAETrainConfig:
    out_dir: str
    vae: dict[str, Any] = field(default_factory=dict)  # VAEConfig fields (architecture)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: VAEOptimSection = field(default_factory=VAEOptimSection)
    train: VAETrainSection = field(default_factory=VAETrainSection)
    init_from: str | None = None  # a VAE folder to fine-tune (its config, updated by `vae`)
    # Train the decoder only: the encoder, and so the latent space and its shift/scale, stay
    # exactly those of `init_from`, and every generator trained on them still fits.
    freeze_encoder: bool = False
    steps: int = 1000
    heldout: int = 256  # held-out images for the latent statistics and PSNR
    seed: int = 0  # model init and all training noise
    device: str = "cpu"
    threads: int = 0  # torch CPU threads while training; 0 leaves torch's setting

    def __post_init__(self) -> None:
        # Built in Python rather than from TOML: accept plain dicts for the sections too.
        for name, cls in (("data", DataConfig), ("loss", LossConfig), ("optim", VAEOptimSection),
                          ("train", VAETrainSection)):
            if isinstance(getattr(self, name), dict):
                setattr(self, name, build(cls, getattr(self, name), name))
        for name, value in (("steps", self.steps), ("data.batch_size", self.data.batch_size),
                            ("train.checkpoint_every", self.train.checkpoint_every),
                            ("train.keep_last", self.train.keep_last)):
            if not value > 0:
                raise ConfigError(f"config key {name!r} must be positive, got {value!r}")
        problems = self.optim.problems()
        if self.optim.grad_accum != 1:
            problems.append(f"optim.grad_accum={self.optim.grad_accum} (the VAE's loop takes 1 only)")
        if problems:
            raise ConfigError("bad [optim]: " + "; ".join(problems))
        if self.threads < 0:
            raise ConfigError(f"config key 'threads' must be >= 0, got {self.threads!r}")
        if self.heldout < 2:
            raise ConfigError(f"config key 'heldout' must be at least 2 (a standard deviation needs two), "
                              f"got {self.heldout}")
        for name in ("l1", "mse", "kl", "noise_max", "anchor"):
            if getattr(self.loss, name) < 0:
                raise ConfigError(f"config key 'loss.{name}' must be >= 0, got {getattr(self.loss, name)}")
        if self.loss.l1 == 0 and self.loss.mse == 0:
            raise ConfigError("config keys 'loss.l1' and 'loss.mse' are both 0: nothing would train the decoder")
        if self.freeze_encoder and self.init_from is None:
            raise ConfigError("config key 'freeze_encoder' needs 'init_from': a new encoder cannot stay frozen")
        if self.loss.anchor and (self.init_from is None or self.freeze_encoder):
            raise ConfigError("config key 'loss.anchor' holds a trained encoder near its init_from: it needs "
                              "'init_from' and a trainable encoder (freeze_encoder = false)")
        if not 0 <= self.data.dark_prob <= 1:
            raise ConfigError(f"config key 'data.dark_prob' must be in [0, 1], got {self.data.dark_prob}")
        if self.data.image_size <= 0:
            raise ConfigError(f"config key 'data.image_size' must be positive, got {self.data.image_size}")
        if self.data.is_shapes and self.data.heldout_source is not None:
            raise ConfigError("config key 'data.heldout_source' is for real data; the shapes world holds out "
                              "images by 'data.heldout_seed'")
        if self.data.is_shapes and self.data.heldout_seed == self.data.seed:
            raise ConfigError(f"config key 'data.heldout_seed' equals 'data.seed' ({self.data.seed}): the "
                              "held-out images would be training images")
        if not self.data.is_shapes and self.data.heldout_source is None:
            raise ConfigError(f"config key 'data.heldout_source' is required with data.source = "
                              f"{self.data.source!r}: PSNR and latent statistics need images never trained on")
        try:
            torch.device(self.device)
        except RuntimeError as e:
            raise ConfigError(f"config key 'device': {e}") from None
        self.vae_config()  # architecture problems fail here, before anything is built

    def vae_config(self, base: VAEConfig | None = None) -> VAEConfig:
        """The architecture: `base` (the `init_from` folder's config) or the defaults, updated by `vae`."""
        bad = [k for k in COMPUTED_VAE_KEYS if k in self.vae]
        if bad:
            raise ConfigError(f"config keys {['vae.' + k for k in bad]} are computed at the end of training; "
                              "remove them")
        fields = to_dict(base) if base is not None else {}
        fields = {k: v for k, v in fields.items() if k not in COMPUTED_VAE_KEYS}
        fields.setdefault("resolution", self.data.image_size)
        cfg = build(VAEConfig, {**fields, **self.vae}, "vae")
        problems = []
        if cfg.in_channels != 3 or cfg.out_ch != 3:
            problems.append(f"in_channels and out_ch must be 3 (RGB), got {cfg.in_channels} and {cfg.out_ch}")
        widths = sorted({cfg.ch} | {cfg.ch * m for m in cfg.ch_mult})
        if not cfg.ch_mult or any(w <= 0 or w % 32 for w in widths):
            problems.append(f"ch * every ch_mult (and ch) must be a positive multiple of 32, the GroupNorm "
                            f"group count; ch={cfg.ch}, ch_mult={list(cfg.ch_mult)} give {widths}")
        if cfg.z_channels <= 0 or cfg.num_res_blocks <= 0:
            problems.append(f"z_channels and num_res_blocks must be positive, got {cfg.z_channels} and "
                            f"{cfg.num_res_blocks}")
        patch = 2 ** (len(cfg.ch_mult) - 1) * ((cfg.psz or 1) if cfg.encoder_norm else 1)
        if cfg.ch_mult and self.data.image_size % patch:
            problems.append(f"data.image_size {self.data.image_size} must be a multiple of {patch} "
                            f"(the down factor {2 ** (len(cfg.ch_mult) - 1)} times psz {cfg.psz})")
        if problems:
            raise ConfigError("bad VAE architecture in [vae]: " + "; ".join(problems))
        return cfg

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> VAETrainConfig:
        """Read a config file; unknown or renamed keys, wrong types and bad values raise ConfigError naming the key."""
        data = read_toml(path)
        try:
            moved = [f"{old!r} is now {new!r}" for old, new in RENAMED.items() if old in data]
            if moved:
                raise ConfigError("the VAE config took the model training's vocabulary: " + ", ".join(moved))
            return build(cls, data)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None


def resume_conflicts(saved: dict[str, Any], config: VAETrainConfig) -> list[str]:
    """The dotted keys, outside RESUMABLE_CHANGES, in which `config` differs from a checkpoint's `saved` one."""
    if any(old in saved for old in RENAMED):  # a checkpoint of the earlier vocabulary
        saved = to_dict(build(VAETrainConfig, _renamed(saved)))
    return _changes(saved, to_dict(config))


def _renamed(old: dict[str, Any]) -> dict[str, Any]:
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in old.items() if k not in RENAMED}
    for key, new in RENAMED.items():
        if key in old:
            table, _, name = new.rpartition(".")
            (out.setdefault(table, {}) if table else out)[name] = old[key]
    return out


def _changes(saved: dict[str, Any], now: dict[str, Any], prefix: str = "") -> list[str]:
    changed = []
    for key in sorted(set(saved) | set(now)):
        name = f"{prefix}{key}"
        a, b = saved.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict) and key != "vae":
            changed += _changes(a, b, name + ".")
        elif a != b and name not in RESUMABLE_CHANGES:
            changed.append(name)
    return changed
