"""`nextstep train CONFIG`: one stage of NextStep training, a straight loop from top to bottom.

Loss = lm_loss_weight * CE(text) + im_loss_weight * flow-matching MSE(image
tokens), with frozen-VAE latents computed on the fly. AdamW, warm-up then a
constant or cosine learning rate, gradient clipping (`optim.py`, as for the VAE)
and accumulation, bf16 autocast on GPU and fp32 on CPU unless asked
(`devices.training_autocast_dtype`). Every step appends a line to
`RUN/metrics.jsonl` (`metrics.py`); checkpoints hold the model, optimizer, RNG, data
position and step, so `--resume` continues exactly where a run stopped (on
the CPU the resumed losses are bit-identical to an uninterrupted run's).
Under torchrun the model is sharded with FSDP2 (see `distributed.py`).

N ranks compute what one process does with the same global batch (up to
float rounding): each loss term is the mean over the whole global batch (every
rank and micro-batch, weighted by tokens, see `loss_counts`), and every random
draw is a function of the samples, never of the rank (see `sample_latents`).
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .. import devices
from ..config import NextStepConfig
from ..data import Collator
from ..data.buckets import TOKEN_PIXELS
from ..io import load_model
from ..io.atomic import atomic_write
from ..io.checkpoint import load_language_model
from ..model import NextStep
from ..pipeline import NextStepPipeline
from ..shapes.tokenizer import shapes_tokenizer
from ..text import TextTokenizer
from ..vae import AutoencoderKL
from . import distributed as dist
from .blend import blend_into
from .checkpoint import CheckpointManager
from .config import TrainConfig
from .metrics import MetricsLog, refuse_to_overwrite
from .optim import adamw, clip_gradients, set_learning_rate
from .sources import open_source

logger = logging.getLogger("nextstep.training")


# ---------------------------------------------------------------------- parts


def build_parts(config: TrainConfig, device: torch.device) -> tuple[NextStep, TextTokenizer, AutoencoderKL]:
    """The model to train (the previous stage's export, or a new one), its tokenizer and frozen VAE."""
    if config.init_from:
        folder = Path(config.init_from)
        model = load_model(folder, device, torch.float32).train()
        if config.model.config:  # training-only fields (TrainConfig refuses any other)
            model.config = replace(model.config, **config.model.config)
            model.config.validate(f"{config.source} [model]")
            model.image_head.batch_mul = model.config.fm_head_batch_mul
        tokenizer = TextTokenizer.from_pretrained(folder)
        trained_on = folder / (model.config.vae_name_or_path or "vae")
        vae_dir = Path(config.model.vae) if config.model.vae else trained_on  # `[model] vae`: a new image tokenizer
    else:
        tokenizer = (shapes_tokenizer() if config.model.tokenizer == "shapes"
                     else TextTokenizer.from_pretrained(config.model.tokenizer))
        vae_dir = trained_on = Path(config.model.vae)
        vocab = math.ceil(len(tokenizer) / 64) * 64  # padded like the official vocabularies
        fields = dict(vocab_size=vocab, boi=tokenizer.boi_id, eoi=tokenizer.eoi_id,
                      image_placeholder_id=tokenizer.placeholder_id, pad_token_id_added=tokenizer.pad_id,
                      bos_token_id=None, eos_token_id=tokenizer.tokenizer.token_to_id("<|endoftext|>"),
                      vae_name_or_path="vae", **config.model.config)
        model_config = NextStepConfig.from_dict(fields, source=f"{config.source} [model]")
        torch.manual_seed(config.seed)
        model = NextStep(model_config).to(device)
        model.init_weights(generator=torch.Generator(device=device).manual_seed(config.seed))
        if config.model.lm_init:  # the official recipe starts the decoder from Qwen2.5-14B
            missing = load_language_model(model, config.model.lm_init)
            if missing:
                logger.warning("model.lm_init left %d decoder tensors freshly initialised, e.g. %s",
                               len(missing), missing[:3])
    vae = AutoencoderKL.from_pretrained(vae_dir, device=device, dtype=torch.float32,
                                        family=model.config.family).requires_grad_(False)
    if vae.config.z_channels != model.config.latent_channels:
        raise ValueError(f"VAE {vae_dir} has {vae.config.z_channels} latent channels, "
                         f"the model {model.config.latent_channels}")
    if config.init_blend.path:
        # The two blended runs must share the latent space init_from was trained on (not a new `vae`'s).
        own = vae if vae_dir == trained_on else AutoencoderKL.from_pretrained(trained_on, family=model.config.family)
        blend_into(model, tokenizer, own, Path(config.init_blend.path), config.init_blend.weight)
    return model, tokenizer, vae


class Batches:
    """Batches from one or several data sources; the source of each step is a seeded choice by weight."""

    def __init__(self, config: TrainConfig, collator: Collator, per_rank: int, rank: int, world: int) -> None:
        self.config = config
        self.datasets = [open_source(s, config.seed, f"data.sources[{i}]", rank=rank, world_size=world)
                         for i, s in enumerate(config.data.sources)]
        self.weights = [s.weight for s in config.data.sources]
        self.loaders = [DataLoader(ds, batch_size=per_rank, collate_fn=collator,
                                   num_workers=config.data.num_workers) for ds in self.datasets]
        self.iters: list[Any] = [None] * len(self.datasets)

    def next(self, step: int, micro: int) -> dict[str, Any]:
        i = random.Random(f"{self.config.seed}:{step}:{micro}").choices(range(len(self.weights)), self.weights)[0]
        while True:
            if self.iters[i] is None:
                self.iters[i] = iter(self.loaders[i])
            try:
                batch = next(self.iters[i])
            except StopIteration:  # an epoch of a finite source ended: start the next one
                self.datasets[i].set_epoch(self.datasets[i].epoch + 1)
                self.iters[i] = None
                continue
            self.datasets[i].mark_consumed(batch)
            if len(batch["input_ids"]):
                return batch

    def state_dict(self) -> list[dict]:
        return [ds.state_dict() for ds in self.datasets]

    def load_state_dict(self, states: list[dict]) -> None:
        for ds, state in zip(self.datasets, states):
            ds.load_state_dict(state)


def draw_seed(*parts: Any) -> int:
    """A 63-bit seed from `parts` (the same in every process, unlike hash())."""
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def image_generators(batch: dict[str, Any], boi_id: int, seed: int, step: int, purpose: str
                     ) -> list[torch.Generator]:
    """One generator per image of the batch, seeded by (seed, step, purpose, sample key, image index).

    An image then gets the same random draws whichever rank, micro-batch or
    batch position it lands in: that is what lets N ranks reproduce one process.
    """
    images_per_row = (batch["input_ids"] == boi_id).sum(1).tolist()
    if sum(images_per_row) != len(batch["pixel_values"]):
        raise ValueError(f"the batch has {len(batch['pixel_values'])} images but {sum(images_per_row)} "
                         "begin-of-image tokens")
    return [torch.Generator().manual_seed(draw_seed(seed, step, purpose, key, j))
            for key, n in zip(batch["keys"], images_per_row) for j in range(n)]


@torch.no_grad()
def sample_latents(vae: AutoencoderKL, pixel_values: list[torch.Tensor], generators: list[torch.Generator]
                   ) -> torch.Tensor | list[torch.Tensor]:
    """Scaled VAE latents of the images, each posterior sampled with its own generator.

    Images of one size are encoded in one batched call; only the noise is per image.
    """
    device = next(vae.parameters()).device
    out: list[torch.Tensor | None] = [None] * len(pixel_values)
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, p in enumerate(pixel_values):
        by_shape.setdefault(tuple(p.shape), []).append(i)
    shift, scale = vae.config.shift_factor, vae.config.scaling_factor
    for idx in by_shape.values():
        posterior = vae.encode(torch.cat([pixel_values[i] for i in idx]).to(device, torch.float32))
        for j, i in enumerate(idx):
            eps = torch.randn(posterior.mean.shape[1:], generator=generators[i]).to(device)
            out[i] = ((posterior.mean[j] + posterior.std[j] * eps - shift) * scale)[None]
    return torch.cat(out) if len(by_shape) == 1 else out


@torch.no_grad()
def draw_context_noise(latents: torch.Tensor | list[torch.Tensor], latents_mask: torch.Tensor,
                       generators: list[torch.Generator], max_std: float) -> torch.Tensor | list[torch.Tensor]:
    """Noise shaped like `latents` for `NextStep.forward(context_noise=...)`: each image in the
    image loss (mask 1) gets std U[0, max_std] times N(0, 1), from its own generator; sources get 0."""
    items = [latents[i:i + 1] for i in range(latents.shape[0])] if isinstance(latents, torch.Tensor) else latents
    out = []
    for x, m, g in zip(items, latents_mask.tolist(), generators, strict=True):
        if not m:  # a source image: nothing to draw
            out.append(torch.zeros_like(x))
            continue
        std = float(torch.rand((), generator=g)) * max_std
        out.append((torch.randn(x.shape, generator=g) * std).to(x.device, x.dtype))
    return torch.cat(out) if isinstance(latents, torch.Tensor) else out


def loss_counts(batch: dict[str, Any], placeholder_id: int, token_pixels: int = TOKEN_PIXELS) -> dict[str, float]:
    """How many terms each loss of `NextStep.forward` averages over for `batch`.

    lm: text targets (positions whose next token is scored by cross-entropy);
    im: image tokens entering the flow-matching loss (latents_mask 1).
    """
    next_ids, next_labels = batch["input_ids"][:, 1:], batch["labels"][:, 1:]
    lm = ((next_labels != -100) & (next_ids != placeholder_id)).sum().item()
    tokens = [p.shape[-2] * p.shape[-1] // token_pixels**2 for p in batch["pixel_values"]]
    im = sum(float(m) * n for m, n in zip(batch["latents_mask"].tolist(), tokens))
    return {"lm": float(lm), "im": im}


def share(count: float, total: float) -> float:
    return count / total if total else 0.0


def save_samples(model: NextStep, vae: AutoencoderKL, tokenizer: TextTokenizer, config: TrainConfig,
                 path: Path) -> None:
    """A row of images for the fixed sample prompts, as one PNG."""
    t = config.train
    was_training = model.training
    model.eval()
    pipe = NextStepPipeline(model, vae, tokenizer)
    settings = pipe.settings.with_overrides(**config.train.sample_settings)
    images = [im for group in pipe.generate(t.sample_prompts, settings, [config.seed] * len(t.sample_prompts))
              for im in group]
    model.train(was_training)
    h, w = settings.hw
    grid = Image.new("RGB", (w * len(images), h))
    for i, im in enumerate(images):
        grid.paste(im, (i * w, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: grid.save(tmp, format="PNG"))


# ---------------------------------------------------------------------- the loop


def train(config: TrainConfig, resume: bool = False) -> Path:
    """Run one stage; returns the exported model folder (official layout)."""
    config.check(dist.requested_world_size())  # before joining the ranks or building anything
    out = Path(config.out_dir)
    refuse_to_overwrite(out, resume)  # before joining too: no rank has written anything yet
    env = dist.setup()
    device = env.device
    ckpts = CheckpointManager(out, config.train.keep_last)
    out.mkdir(parents=True, exist_ok=True)

    model, tokenizer, vae = build_parts(config, device)
    autocast_dtype = devices.training_autocast_dtype(device, config.train.precision)
    autocast = devices.autocast(device, autocast_dtype)
    if config.train.grad_checkpointing:
        model.gradient_checkpointing = True
    trained = dist.wrap(model, env)

    accum = config.optim.grad_accum
    per_rank = config.data.batch_size // (env.world_size * accum)
    token_pixels = vae.down_factor * model.config.latent_patch_size
    collator = Collator(tokenizer, caption_dropout=config.data.caption_dropout, seed=config.seed,
                        token_pixels=token_pixels, source_image=config.data.source_image)
    batches = Batches(config, collator, per_rank, env.rank, env.world_size)
    o = config.optim
    optimizer = adamw(trained.parameters(), o)
    lm_w, im_w = model.config.lm_loss_weight, model.config.im_loss_weight
    sample_dtype = autocast_dtype or torch.float32  # of rank 0's copy under torchrun

    start = 0
    if resume:
        meta = dist.load_checkpoint(ckpts, trained, optimizer, env)
        if meta is not None:
            batches.load_state_dict(dist.data_position(meta, env))
            start = meta["step"]
            logger.info("resumed from step %d", start)
    log = MetricsLog(out, start, config.train.tensorboard) if env.is_main else None

    trained.train()
    progress = tqdm(range(start, config.steps), initial=start, total=config.steps, disable=not env.is_main,
                    desc=f"{config.stage}")
    for step in progress:
        t0 = time.perf_counter()
        lr = set_learning_rate(optimizer, o, step, config.steps)
        micro_batches = [batches.next(step, micro) for micro in range(accum)]
        counts = [loss_counts(b, tokenizer.placeholder_id, token_pixels) for b in micro_batches]
        total = dist.sum_over_ranks({k: sum(c[k] for c in counts) for k in ("lm", "im")}, env)
        sums = {"loss": 0.0, "lm_loss": 0.0, "im_loss": 0.0}
        for batch, count in zip(micro_batches, counts):
            latents = sample_latents(vae, batch["pixel_values"],
                                     image_generators(batch, tokenizer.boi_id, config.seed, step, "vae"))
            noise = None
            if config.train.context_noise:
                noise = draw_context_noise(latents, batch["latents_mask"], image_generators(
                    batch, tokenizer.boi_id, config.seed, step, "context"), config.train.context_noise)
            with autocast:
                losses = trained(batch["input_ids"].to(device), batch["labels"].to(device), latents,
                                 batch["latents_mask"].to(device), batch["attention_mask"].to(device),
                                 generator=image_generators(batch, tokenizer.boi_id, config.seed, step, "flow"),
                                 context_noise=noise)
            # This pass's share of the global-batch mean of each term; times the rank count
            # because FSDP averages the ranks' gradients.
            lm = losses.lm_loss * share(count["lm"], total["lm"])
            im = losses.im_loss * share(count["im"], total["im"])
            loss = lm_w * lm + im_w * im
            (loss * env.world_size).backward()
            for k, v in (("loss", loss), ("lm_loss", lm), ("im_loss", im)):
                sums[k] += v.item()
        grad_norm = clip_gradients(trained.parameters(), o)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        done = step + 1
        sums = dist.sum_over_ranks(sums, env)
        if env.is_main and (done % config.train.log_every == 0 or done == config.steps):
            n_samples = sum(len(b["input_ids"]) for b in micro_batches)
            record = {"step": done, **sums, "lr": lr, "grad_norm": float(grad_norm),
                      "samples_per_s": n_samples * env.world_size / (time.perf_counter() - t0)}
            log.write(record)
            progress.set_postfix(loss=f"{sums['loss']:.4f}", im=f"{sums['im_loss']:.4f}")
        if done % config.train.checkpoint_every == 0 or done == config.steps:
            meta = {"stage": config.stage}
            dist.save_checkpoint(ckpts, done, trained, optimizer, meta, batches.state_dict(), env)
        if config.train.sample_every and done % config.train.sample_every == 0:
            full = dist.full_model(trained, model, env, device, sample_dtype)  # all ranks take part
            if env.is_main:
                save_samples(full, vae, tokenizer, config, out / "samples" / f"step_{done:08d}.png")

    export = out / "export"
    final_model = dist.full_model(trained, model, env)  # under torchrun: rank 0's fp32 copy on the CPU
    if env.is_main:
        NextStepPipeline(final_model.eval(), vae, tokenizer).save_pretrained(export)
        if env.distributed:
            final_model = final_model.to(device, sample_dtype)
        save_samples(final_model, vae, tokenizer, config, out / "samples" / "final.png")
        atomic_write(out / "DONE", lambda tmp: Path(tmp).write_text(f"{config.steps}\n"))
    if log is not None:
        log.close()
    dist.teardown(env)
    return export
