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
   `vae_losses.perturb` for why s is there. The decoder learns to reconstruct from
   perturbed latents, so small errors in the tokens a generator predicts decode
   to nearly the same image, and the latent distribution cannot collapse to a
   few tightly packed points;
4. decode z' and take the losses: reconstruction `l1 * |x - x'| + mse * (x - x')^2`
   (means over pixels) plus `kl * KL`, the KL of the posterior to N(0, I) averaged
   over latent elements (so its weight does not depend on the image size);
5. AdamW step with the gradient norm clipped and the learning rate of step s,
   as `[optim]` says for both training loops (`optim.py`; the VAE's default
   schedule: warm-up, then a cosine down to `min_lr_ratio * lr`).

The config (`VAETrainConfig`, the model training's vocabulary) is in
`vae_config.py`; the run folder's metrics log and data sources are opened as
the model's training opens them (`metrics.py`, `sources.py`).

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
last `train.keep_last`), `report.json`, `export/`. On CPU, the same config gives the
same metrics bit for bit (all but the timing field `samples_per_s`, at the same
`threads`), and a run resumed from a checkpoint continues exactly as if it had
never stopped.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import CheckpointError, ConfigError
from ..io.atomic import atomic_write
from ..sampling.threads import intra_op_threads
from ..vae.autoencoder import AutoencoderKL
from .checkpoint import CheckpointManager, flatten_optimizer, unflatten_optimizer
from .config_file import to_dict
from .metrics import MetricsLog, refuse_to_overwrite
from .optim import adamw, clip_gradients, set_learning_rate
from .sources import open_source
from .vae_config import RESUMABLE_CHANGES, DataConfig, VAETrainConfig, resume_conflicts
from .vae_losses import kl_loss, perturb, psnr, reconstruction_loss

REPORT = "report.json"
EXPORT = "export"
INIT_LOGVAR = -6.0  # a new encoder's posterior starts with std exp(-3) ~ 0.05 (see _start_nearly_deterministic)


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
    dataset = open_source(config.as_source(config.heldout_source or "shapes"), seed, "data.heldout_source",
                          shuffle=False)
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


# --------------------------------------------------------------------------- run folder


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

    With `resume`, continue from the newest readable checkpoint of `out_dir`
    (or start afresh if there is none). `on_step(step, metrics)` is called after
    each step (and its checkpoint, if any). Everything that can be checked is
    checked before the model is built.
    """
    from tqdm.auto import tqdm

    run = Path(config.out_dir)
    refuse_to_overwrite(run, resume)
    ckpts = CheckpointManager(run, config.train.keep_last)
    if config.init_from is not None and not Path(config.init_from).is_dir():
        raise ConfigError(f"config key 'init_from': VAE folder {config.init_from} does not exist")
    device = torch.device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"config key 'device' is {config.device!r} but CUDA is not available")
    data = open_source(config.data.as_source(config.data.source), config.data.seed, "data.source")
    heldout = load_heldout(config.data, config.heldout)
    loaded = ckpts.load_latest() if resume else None
    step = 0
    if loaded is not None:
        tensors, meta = loaded
        step = int(meta["step"])
        changed = resume_conflicts(meta["config"], config)
        if changed:
            raise ConfigError(f"cannot resume {run}: the config changed since its checkpoint in {changed} "
                              f"(only {sorted(RESUMABLE_CHANGES)} may change)")
        if step > config.steps:
            raise ConfigError(f"cannot resume {run}: its checkpoint is at step {step}, past steps = {config.steps}")

    with intra_op_threads(config.threads if config.threads > 0 else None):
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
        optimizer = adamw(trained, config.optim)
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
        batches = _batches(data, config.data.batch_size, config.data.image_size)
        with MetricsLog(run, step) as log, tqdm(total=config.steps, initial=step, desc="train-vae", unit="step",
                                                disable=not progress, mininterval=2.0) as bar:
            while step < config.steps:
                start = time.perf_counter()
                x = next(batches).to(device)
                lr = set_learning_rate(optimizer, config.optim, step, config.steps)

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
                grad_norm = clip_gradients(trained, config.optim)
                optimizer.step()
                step += 1

                if not torch.isfinite(loss):
                    raise FloatingPointError(f"the loss became {loss.item()} at step {step}; lower 'optim.lr' or "
                                             "raise 'optim.warmup_steps' and resume from the last checkpoint")
                line = {"step": step, "loss": loss.item(), "rec_loss": rec.item(), "kl_loss": kl.item(),
                        "anchor_loss": drift.item(), "lr": lr, "grad_norm": grad_norm.item(),
                        "samples_per_s": config.data.batch_size / (time.perf_counter() - start)}
                log.write(line)
                bar.update(1)
                bar.set_postfix(loss=f"{line['loss']:.4f}", lr=f"{lr:.2e}", refresh=False)
                if step % config.train.checkpoint_every == 0 or step == config.steps:
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
    means = latent_means(model, heldout, config.data.batch_size).double()
    if not config.freeze_encoder:  # frozen: the base's latent space, bit for bit (generators trained on it fit)
        model.config = dataclasses.replace(model.config, shift_factor=means.mean().item(),
                                           scaling_factor=1.0 / means.std().item())
    shift, scale = model.config.shift_factor, model.config.scaling_factor

    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(config.seed)
    psnr_mode, psnr_sample, scaled, stds = [], [], [], []
    with torch.no_grad():
        for i in range(0, len(heldout), config.data.batch_size):
            x = heldout[i:i + config.data.batch_size].to(device)
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
