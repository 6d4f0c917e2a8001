"""Training the image tokenizer: a KL autoencoder with the paper's latent noise regularisation.

What one step does (read `train_vae` top to bottom):

1. encode a batch of pixels in [-1, 1] to the posterior N(mean, exp(logvar));
   with `encoder_norm` the mean is layer-normalised over channels (per `psz`
   patch), the paper's channel-wise normalisation that keeps latents unit-scale;
2. draw z = mean + std * eps from the posterior;
3. noise regularisation (the NextStep-1 paper's image tokenizer, after
   sigma-VAE): z' = z + alpha * s * eps', eps' ~ N(0, I), alpha ~ U[0, gamma]
   drawn once per image, gamma = `loss.noise_max`, s = the image's latent std
   (no gradient). With `encoder_norm` (the paper's
   channel-wise normalisation) s is ~1, which is the paper's formula; see
   `perturb` for why s is there. The decoder learns to reconstruct from
   perturbed latents, so small errors in the tokens a generator predicts decode
   to nearly the same image, and the latent distribution cannot collapse to a
   few tightly packed points;
4. decode z' and take the losses: reconstruction `l1 * |x - x'| + mse * (x - x')^2`
   (means over pixels) plus `kl * KL`, the KL of the posterior to N(0, I) averaged
   over latent elements (so its weight does not depend on the image size);
5. AdamW step with the gradient norm clipped, the learning rate warmed up linearly
   and then decayed by a cosine to `min_lr_ratio * lr`.

`loss.anchor` (with `init_from`) adds `anchor * mean((mean - mean_0)^2)`, where
mean_0 is the posterior mean of the init_from VAE, a frozen copy: the fine-tuned
encoder may move where reconstruction needs it (the shapes recipe's second VAE
stage separates colours on dark backgrounds) and stays near its old latents
elsewhere, so the generators trained on them follow in a short stage.

`freeze_encoder = true` (with `init_from`) trains the decoder alone: the encoder
stays in eval mode without gradients and the export keeps the base's
`shift_factor` and `scaling_factor`, so the latents, and every generator trained
on them, are unchanged (`python -m nextstep.training.ship --vae` accepts only such
a VAE). A generator's tokens are never exactly an encoder's; a decoder trained
longer on noisier latents turns them into cleaner images (recipes/shapes).

The paper fine-tunes the Flux VAE with reconstruction and perceptual (LPIPS)
losses; LPIPS needs pretrained VGG weights, which we do not depend on, so only the
pixel losses are here (`init_from` starts from a pretrained tokenizer).

At the end the latent normalisation is measured on held-out images: over the
posterior means of all held-out images, all channels and all positions,
`shift_factor` = their mean and `scaling_factor` = 1 / their standard deviation.
These are single scalars for the whole tensor because the official config
fields are scalars (`to_latents` computes `(z - shift) * scale`); with them the
posterior means of the held-out set have mean 0 and std 1 exactly. The
reconstruction PSNR of the same images is printed and written to
`RUN/report.json`, and the VAE, its config carrying the factors, is exported to
`RUN/export` (loadable with `AutoencoderKL.from_pretrained`).

Run folder: `config.json` (the resolved config), `metrics.jsonl` (one line per
step: step, loss, rec_loss, kl_loss, anchor_loss, lr, grad_norm, samples_per_s),
`checkpoints/step_XXXXXXXX/` (model, optimizer, RNG states, data position; the
last `keep_last`), `report.json`, `export/`. On CPU, the same config gives the
same metrics bit for bit (all but the timing field `samples_per_s`, at the same
`threads`), and a run resumed from a checkpoint continues exactly as if it had
never stopped.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import CheckpointError, ConfigError
from ..io.atomic import atomic_write
from ..vae.autoencoder import AutoencoderKL, DiagonalGaussian, VAEConfig
from .checkpoint import CheckpointManager, flatten_optimizer, unflatten_optimizer
from .config_file import build, read_toml, to_dict

METRICS = "metrics.jsonl"
REPORT = "report.json"
EXPORT = "export"
# Keys that may change between a run and its resume without changing the steps already taken
# (a new `steps` stretches the cosine schedule from the resumed step on).
RESUMABLE_CHANGES = {"steps", "checkpoint_every", "keep_last", "heldout", "data.heldout_source",
                     "data.heldout_seed"}
# Fields of the VAE config the training computes itself.
COMPUTED_VAE_KEYS = ("scaling_factor", "shift_factor")
INIT_LOGVAR = -6.0  # a new encoder's posterior starts with std exp(-3) ~ 0.05 (see _start_nearly_deterministic)


# --------------------------------------------------------------------------- config


@dataclass
class DataConfig:
    source: str = "shapes"  # "shapes", or a folder / .jsonl manifest / WebDataset shards for `open_dataset`
    image_size: int = 64  # training images are (image_size, image_size); real images are centre-cropped
    seed: int = 0  # shapes: the world's seed; real data: the shuffle seed
    heldout_source: str | None = None  # required for real data: images never trained on
    heldout_seed: int | None = None  # shapes: the held-out world's seed (default: seed + 1)
    dark_prob: float = 0.2  # shapes: the share of images on a dark background (the world's default)

    @property
    def is_shapes(self) -> bool:
        return self.source == "shapes"


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
class VAETrainConfig:
    run_dir: str
    vae: dict[str, Any] = field(default_factory=dict)  # VAEConfig fields (architecture)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    init_from: str | None = None  # a VAE folder to fine-tune (its config, updated by `vae`)
    # Train the decoder only: the encoder, and so the latent space and its shift/scale, stay
    # exactly those of `init_from`, and every generator trained on them still fits.
    freeze_encoder: bool = False
    steps: int = 1000
    batch_size: int = 16
    lr: float = 1e-3
    betas: tuple[float, ...] = (0.9, 0.999)
    weight_decay: float = 0.0
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0  # max gradient norm; 0 turns clipping off
    checkpoint_every: int = 500
    keep_last: int = 3
    heldout: int = 256  # held-out images for the latent statistics and PSNR
    seed: int = 0  # model init and all training noise
    device: str = "cpu"
    threads: int = 0  # torch CPU threads while training; 0 leaves torch's setting

    def __post_init__(self) -> None:
        # Built in Python rather than from TOML: accept plain dicts for the sections too.
        if isinstance(self.data, dict):
            self.data = build(DataConfig, self.data, "data")
        if isinstance(self.loss, dict):
            self.loss = build(LossConfig, self.loss, "loss")
        positive = ("steps", "batch_size", "checkpoint_every", "keep_last", "lr")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ConfigError(f"config key {name!r} must be positive, got {getattr(self, name)!r}")
        for name in ("warmup_steps", "weight_decay", "grad_clip", "threads"):
            if getattr(self, name) < 0:
                raise ConfigError(f"config key {name!r} must be >= 0, got {getattr(self, name)!r}")
        if self.heldout < 2:
            raise ConfigError(f"config key 'heldout' must be at least 2 (a standard deviation needs two), "
                              f"got {self.heldout}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"config key 'min_lr_ratio' must be in [0, 1], got {self.min_lr_ratio}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"config key 'betas' must be two numbers in [0, 1), got {list(self.betas)}")
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
    def from_toml(cls, path: str | os.PathLike) -> VAETrainConfig:
        """Read a config file; unknown keys, wrong types and bad values raise ConfigError naming the key."""
        data = read_toml(path)
        try:
            return build(cls, data)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None


def lr_at(config: VAETrainConfig, step: int) -> float:
    """Learning rate of step `step` (0-based): linear warm-up, then cosine down to min_lr_ratio * lr."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    span = max(1, config.steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    floor = config.min_lr_ratio
    return config.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


# --------------------------------------------------------------------------- data


def _fit_square(pixels: Tensor, size: int) -> Tensor:
    """(3, h, w) -> (3, size, size): centre crop to a square, then an antialiased resize.

    Real images arrive at their aspect-ratio bucket; the VAE is trained on
    squares so that a batch is one tensor (it is fully convolutional, so it
    still encodes any bucket later).
    """
    _, h, w = pixels.shape
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    square = pixels[:, top:top + s, left:left + s]
    if s != size:
        square = F.interpolate(square[None], size=(size, size), mode="bilinear", antialias=True,
                               align_corners=False)[0].clamp(-1, 1)
    return square.contiguous()


def _open_source(source: str, config: DataConfig, seed: int, what: str, shuffle: bool):
    """A StreamDataset for `source`; a missing or unusable source is a ConfigError naming `what`."""
    from ..data import ShapesDataset, open_dataset

    if source == "shapes":
        try:
            return ShapesDataset(size=config.image_size, seed=seed, dark_prob=config.dark_prob)
        except ValueError as e:
            raise ConfigError(f"config key 'data.image_size': {e}") from None
    local = "://" not in source and "{" not in source
    if local and not Path(source).exists():
        raise ConfigError(f"config key {what!r}: {source} does not exist")
    try:
        return open_dataset(source, resolution=config.image_size, seed=seed, shuffle=shuffle)
    except (OSError, ValueError) as e:
        raise ConfigError(f"config key {what!r}: cannot open {source}: {e}") from None


def _samples(dataset) -> Iterator[Tensor]:
    """Pixels of `dataset`, epoch after epoch, each marked consumed as it is taken (the resumable position)."""
    from ..data.stream import DataError, is_bookkeeping

    while True:
        # A resume can land at the very end of an epoch: then nothing is left to read in it.
        fresh = not dataset.done
        got = 0
        for sample in dataset:
            dataset.mark_consumed(sample)
            if is_bookkeeping(sample):
                continue
            got += 1
            yield sample["pixels"]
        if got == 0 and fresh:
            raise DataError(f"the training data ({type(dataset).__name__}) gave no usable image in a whole epoch")
        dataset.set_epoch(dataset.epoch + 1)


def _batches(dataset, batch_size: int, size: int) -> Iterator[Tensor]:
    samples = _samples(dataset)
    while True:
        yield torch.stack([_fit_square(next(samples), size) for _ in range(batch_size)])


def load_heldout(config: DataConfig, n: int) -> Tensor:
    """The first `n` held-out images, (n, 3, S, S) in [-1, 1] (fewer if the source has fewer)."""
    seed = config.seed + 1 if config.heldout_seed is None else config.heldout_seed
    dataset = _open_source(config.heldout_source or "shapes", config, seed, "data.heldout_source", shuffle=False)
    images = []
    for sample in dataset:  # one epoch at most: real sources end, the shapes stream does not
        if "pixels" in sample:
            images.append(_fit_square(sample["pixels"], config.image_size))
            if len(images) == n:
                break
    if len(images) < 2:
        raise ConfigError(f"config key 'data.heldout_source': {config.heldout_source} gave {len(images)} usable "
                          "image(s); at least 2 are needed")
    return torch.stack(images)


# --------------------------------------------------------------------------- one step's pieces


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


# --------------------------------------------------------------------------- run folder


def _read_metrics(path: Path, upto: int) -> list[str]:
    """Lines of metrics.jsonl with step <= `upto` (a torn last line from a kill is dropped)."""
    if not path.is_file():
        return []
    keep = []
    for line in path.read_text().splitlines():
        try:
            step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            continue
        if step <= upto:
            keep.append(line + "\n")
    return keep


def _config_changes(saved: dict[str, Any], now: dict[str, Any], prefix: str = "") -> list[str]:
    changed = []
    for key in sorted(set(saved) | set(now)):
        name = f"{prefix}{key}"
        a, b = saved.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict) and key != "vae":
            changed += _config_changes(a, b, name + ".")
        elif a != b and name not in RESUMABLE_CHANGES:
            changed.append(name)
    return changed


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    if n <= 0:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _export(model: AutoencoderKL, folder: Path) -> None:
    """save_pretrained into a fresh folder, then swap it in: `folder` is never half written."""
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        if folder.exists():
            os.rename(folder, old)
        os.rename(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------- training


def train_vae(config: VAETrainConfig, resume: bool = False, progress: bool = True,
              on_step: Callable[[int, dict[str, float]], None] | None = None) -> Path:
    """Train the VAE of `config`; returns the exported folder `RUN/export`.

    With `resume`, continue from the newest readable checkpoint of `run_dir`
    (or start afresh if there is none). `on_step(step, metrics)` is called after
    each step (and its checkpoint, if any). Everything that can be checked is
    checked before the model is built.
    """
    from tqdm.auto import tqdm

    run = Path(config.run_dir)
    ckpts = CheckpointManager(run, config.keep_last)
    metrics_path = run / METRICS
    if not resume and (ckpts.steps() or metrics_path.exists()):
        raise ConfigError(f"run folder {run} already holds a run (checkpoints or {METRICS}); "
                          "resume it (--resume) or choose another run_dir")
    if config.init_from is not None and not Path(config.init_from).is_dir():
        raise ConfigError(f"config key 'init_from': VAE folder {config.init_from} does not exist")
    device = torch.device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"config key 'device' is {config.device!r} but CUDA is not available")
    data = _open_source(config.data.source, config.data, config.data.seed, "data.source", shuffle=True)
    heldout = load_heldout(config.data, config.heldout)
    loaded = ckpts.load_latest() if resume else None
    step = 0
    if loaded is not None:
        tensors, meta = loaded
        step = int(meta["step"])
        changed = _config_changes(meta["config"], to_dict(config))
        if changed:
            raise ConfigError(f"cannot resume {run}: the config changed since its checkpoint in {changed} "
                              f"(only {sorted(RESUMABLE_CHANGES)} may change)")
        if step > config.steps:
            raise ConfigError(f"cannot resume {run}: its checkpoint is at step {step}, past steps = {config.steps}")

    with _threads(config.threads):
        # The model's initial weights depend on the seed only, not on the caller's RNG state.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            if config.init_from is not None:
                base = AutoencoderKL.from_pretrained(config.init_from)
                model = AutoencoderKL(config.vae_config(base.config))
                try:
                    model.load_state_dict(base.state_dict())
                except RuntimeError as e:
                    raise CheckpointError(f"init_from {config.init_from} does not fit the [vae] architecture: "
                                          f"{e}") from None
                if config.freeze_encoder:
                    model.config = dataclasses.replace(model.config, shift_factor=base.config.shift_factor,
                                                       scaling_factor=base.config.scaling_factor)
                del base
            else:
                model = AutoencoderKL(config.vae_config())
                _start_nearly_deterministic(model)
        # The anchor: the init_from VAE as it was, frozen (built before a checkpoint is loaded).
        anchor = copy.deepcopy(model).to(device).eval().requires_grad_(False) if config.loss.anchor else None
        model.to(device).train()
        if config.freeze_encoder:
            model.encoder.requires_grad_(False).eval()
        trained = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trained, lr=config.lr, betas=tuple(config.betas),
                                      weight_decay=config.weight_decay)
        generator = torch.Generator().manual_seed(config.seed)  # every random draw of the loop
        if loaded is not None:
            model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
            optimizer.load_state_dict(unflatten_optimizer(tensors, meta["optimizer"]))
            generator.set_state(tensors["rng.train"])
            torch.set_rng_state(tensors["rng.torch"])
            data.load_state_dict(meta["data"])
            print(f"resuming {run} from step {step}")

        run.mkdir(parents=True, exist_ok=True)
        config_text = json.dumps(to_dict(config), indent=1) + "\n"
        atomic_write(run / "config.json", lambda tmp: Path(tmp).write_text(config_text))
        # Steps after the checkpoint are done again: drop their lines, so the file reads as one run.
        kept = "".join(_read_metrics(metrics_path, step))
        atomic_write(metrics_path, lambda tmp: Path(tmp).write_text(kept))

        batches = _batches(data, config.batch_size, config.data.image_size)
        max_norm = config.grad_clip if config.grad_clip > 0 else math.inf
        with open(metrics_path, "a") as log, tqdm(total=config.steps, initial=step, desc="train-vae", unit="step",
                                                  disable=not progress, mininterval=2.0) as bar:
            while step < config.steps:
                start = time.perf_counter()
                x = next(batches).to(device)
                lr = lr_at(config, step)
                for group in optimizer.param_groups:
                    group["lr"] = lr

                posterior = model.encode(x)  # a frozen encoder's parameters need no grad: no graph is kept
                z = posterior.sample(generator)
                z = perturb(z, config.loss.noise_max, generator)
                x_rec = model.decode(z)
                rec = reconstruction_loss(x_rec, x, config.loss)
                kl = kl_loss(posterior)
                loss = rec + config.loss.kl * kl
                drift = torch.zeros(())
                if anchor is not None:
                    with torch.no_grad():
                        before = anchor.encode(x).mean
                    drift = (posterior.mean - before).pow(2).mean()
                    loss = loss + config.loss.anchor * drift

                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(trained, max_norm)
                optimizer.step()
                step += 1

                if not torch.isfinite(loss):
                    raise FloatingPointError(f"the loss became {loss.item()} at step {step}; lower 'lr' or "
                                             "raise 'warmup_steps' and resume from the last checkpoint")
                line = {"step": step, "loss": loss.item(), "rec_loss": rec.item(), "kl_loss": kl.item(),
                        "anchor_loss": drift.item(), "lr": lr, "grad_norm": grad_norm.item(),
                        "samples_per_s": config.batch_size / (time.perf_counter() - start)}
                log.write(json.dumps(line) + "\n")
                log.flush()
                bar.update(1)
                bar.set_postfix(loss=f"{line['loss']:.4f}", lr=f"{lr:.2e}", refresh=False)
                if step % config.checkpoint_every == 0 or step == config.steps:
                    _save(ckpts, step, model, optimizer, generator, data, config)
                if on_step is not None:
                    on_step(step, line)

        return _finish(model, heldout, config, run, step)


def _start_nearly_deterministic(model: AutoencoderKL) -> None:
    """Set the log-variance outputs of a new encoder to INIT_LOGVAR.

    A fresh conv_out gives logvar ~ 0, a posterior std of 1 against means of
    std ~0.4 (or 1 with encoder_norm): the first hundreds of steps would decode
    mostly noise. Trained KL autoencoders end with tiny posterior variances
    anyway (the KL weight is ~1e-6), and the robustness the paper wants comes
    from the explicit noise regularisation, so we start there.
    """
    conv = model.encoder.conv_out
    z = model.config.z_channels
    with torch.no_grad():
        conv.weight[z:].mul_(0.1)
        conv.bias[z:].fill_(INIT_LOGVAR)


def _save(ckpts: CheckpointManager, step: int, model: AutoencoderKL, optimizer: torch.optim.Optimizer,
          generator: torch.Generator, data, config: VAETrainConfig) -> None:
    optim_tensors, optim_rest = flatten_optimizer(optimizer.state_dict())
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update(optim_tensors)
    tensors["rng.train"] = generator.get_state()
    tensors["rng.torch"] = torch.get_rng_state()
    meta = {"kind": "vae", "config": to_dict(config), "optimizer": optim_rest, "data": data.state_dict()}
    ckpts.save(step, tensors, meta)


@torch.no_grad()
def latent_means(model: AutoencoderKL, images: Tensor, batch_size: int) -> Tensor:
    """Posterior means of `images`, encoded `batch_size` at a time."""
    device = next(model.parameters()).device
    return torch.cat([model.encode(images[i:i + batch_size].to(device)).mean.float().cpu()
                      for i in range(0, len(images), batch_size)])


def _finish(model: AutoencoderKL, heldout: Tensor, config: VAETrainConfig, run: Path, step: int) -> Path:
    """Latent normalisation and PSNR on the held-out images, report.json, export."""
    model.eval()
    means = latent_means(model, heldout, config.batch_size).double()
    if not config.freeze_encoder:  # frozen: the base's latent space, bit for bit (generators trained on it fit)
        model.config = dataclasses.replace(model.config, shift_factor=means.mean().item(),
                                           scaling_factor=1.0 / means.std().item())
    shift, scale = model.config.shift_factor, model.config.scaling_factor

    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(config.seed)
    psnr_mode, psnr_sample, scaled, stds = [], [], [], []
    with torch.no_grad():
        for i in range(0, len(heldout), config.batch_size):
            x = heldout[i:i + config.batch_size].to(device)
            posterior = model.encode(x)
            psnr_mode.append(psnr(model.decode(posterior.mode()).float().cpu(), x.cpu()))
            z = posterior.sample(generator)
            psnr_sample.append(psnr(model.decode(z).float().cpu(), x.cpu()))
            scaled.append(((z - shift) * scale).float().cpu())
            stds.append(posterior.std.float().flatten(1).mean(1).cpu())
    scaled_all = torch.cat(scaled).double()
    report = {
        "step": step,
        "heldout_images": len(heldout),
        "psnr_db": torch.cat(psnr_mode).mean().item(),  # decoding the posterior mean
        "psnr_db_sampled": torch.cat(psnr_sample).mean().item(),  # decoding a posterior sample
        "shift_factor": shift,
        "scaling_factor": scale,
        "latent_mean_std": [means.mean().item(), means.std().item()],  # raw posterior means
        # What the generator is trained on (to_latents with sampling): close to (0, 1) when the
        # posterior's own noise is small next to the spread of the means.
        "scaled_sample_mean_std": [scaled_all.mean().item(), scaled_all.std().item()],
        "posterior_std_mean": torch.cat(stds).mean().item(),  # the encoder's own noise, raw units
    }
    report_text = json.dumps(report, indent=1) + "\n"
    atomic_write(run / REPORT, lambda tmp: Path(tmp).write_text(report_text))
    export = run / EXPORT
    _export(model, export)
    print(f"held-out PSNR {report['psnr_db']:.2f} dB (sampled latents: {report['psnr_db_sampled']:.2f} dB) "
          f"on {len(heldout)} images; shift_factor {shift:.5f}, scaling_factor {scale:.5f}; exported to {export}")
    return export
