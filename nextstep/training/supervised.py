"""The supervised stage kinds (pretrain, mixed, anneal, sft): batches of data and the NextStep loss.

Loss = lm_loss_weight * CE(text) + im_loss_weight * flow-matching MSE(image
tokens), with frozen-VAE latents computed on the fly. N ranks compute what one
process does with the same global batch (up to float rounding): each loss term
is the mean over the whole global batch (every rank and micro-batch, weighted
by tokens, see `loss_counts`), and every random draw is a function of the
samples, never of the rank (see `image_generators`).
"""

from __future__ import annotations

import hashlib
import random
from typing import Any

import torch
from torch.utils.data import DataLoader

from ..data import Collator
from ..data.buckets import TOKEN_PIXELS
from ..vae import AutoencoderKL
from . import distributed as dist
from .config import TrainConfig
from .sources import open_source
from .stages import StageContext, reference_model


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


class SupervisedStage:
    """Batches from `[data]`, the NextStep loss; the data position is its checkpointed state."""

    def __init__(self, ctx: StageContext) -> None:
        self.ctx = ctx
        config, env = ctx.config, ctx.env
        self.accum = config.optim.grad_accum
        per_rank = config.data.batch_size // (env.world_size * self.accum)
        self.token_pixels = ctx.vae.down_factor * ctx.model.config.latent_patch_size
        collator = Collator(ctx.tokenizer, caption_dropout=config.data.caption_dropout, seed=config.seed,
                            token_pixels=self.token_pixels, source_image=config.data.source_image,
                            edit_thought_tokens=config.data.edit_thought_tokens,
                            edit_source_after_thought=config.data.edit_source_after_thought)
        self.batches = Batches(config, collator, per_rank, env.rank, env.world_size)
        # `[train] hold_images`: the frozen starting model whose drawing the stage keeps.
        self.reference = reference_model(config, env.device) if config.train.hold_images else None

    def accumulate_gradients(self, step: int) -> dict[str, float]:
        ctx, config, env = self.ctx, self.ctx.config, self.ctx.env
        tokenizer, device = ctx.tokenizer, env.device
        lm_w, im_w = ctx.model.config.lm_loss_weight, ctx.model.config.im_loss_weight
        micro_batches = [self.batches.next(step, micro) for micro in range(self.accum)]
        counts = [loss_counts(b, tokenizer.placeholder_id, self.token_pixels) for b in micro_batches]
        total = dist.sum_over_ranks({k: sum(c[k] for c in counts) for k in ("lm", "im")}, env)
        sums = {"loss": 0.0, "lm_loss": 0.0, "im_loss": 0.0, "hold_loss": 0.0}
        for batch, count in zip(micro_batches, counts):
            latents = sample_latents(ctx.vae, batch["pixel_values"],
                                     image_generators(batch, tokenizer.boi_id, config.seed, step, "vae"))
            noise = None
            if config.train.context_noise:
                noise = draw_context_noise(latents, batch["latents_mask"], image_generators(
                    batch, tokenizer.boi_id, config.seed, step, "context"), config.train.context_noise)
            with ctx.autocast:
                losses = ctx.trained(batch["input_ids"].to(device), batch["labels"].to(device), latents,
                                     batch["latents_mask"].to(device), batch["attention_mask"].to(device),
                                     generator=image_generators(batch, tokenizer.boi_id, config.seed, step, "flow"),
                                     context_noise=noise)
            # This pass's share of the global-batch mean of each term; times the rank count
            # because FSDP averages the ranks' gradients.
            lm = losses.lm_loss * share(count["lm"], total["lm"])
            im = losses.im_loss * share(count["im"], total["im"])
            if self.reference is None:
                loss = lm_w * lm + im_w * im
            else:  # the drawing held: the image term is the distance to the reference's conditions
                held = self.held_distance(batch, latents, noise, losses.conditions, total["im"])
                loss = lm_w * lm + config.train.hold_images * held
                sums["hold_loss"] += held.item()
            (loss * env.world_size).backward()
            for k, v in (("loss", loss), ("lm_loss", lm), ("im_loss", im)):
                sums[k] += v.item()
        sums["samples"] = float(sum(len(b["input_ids"]) for b in micro_batches))
        return sums

    def held_distance(self, batch: dict[str, Any], latents: torch.Tensor | list[torch.Tensor],
                      noise: torch.Tensor | list[torch.Tensor] | None, conditions: torch.Tensor, total: float
                      ) -> torch.Tensor:
        """This pass's share of the global-batch mean squared distance between the trained model's
        flow-head conditions and the reference's, over the image tokens in the image loss: with the
        flow head frozen, the same conditions draw the same images, so the text path can learn while
        the drawing stays as it was (thoughts written anew, each drawn as before)."""
        device = self.ctx.env.device
        with self.ctx.autocast:
            reference = self.reference.image_conditions(batch["input_ids"].to(device),
                                                        batch["attention_mask"].to(device), latents, noise)
        mask = self.reference.image_token_mask(latents, batch["latents_mask"].to(device)).float()
        per_token = (conditions.float() - reference.float()).pow(2).mean(-1)
        return (per_token * mask).sum() / max(total, 1.0)

    def metrics(self, sums: dict[str, float]) -> dict[str, float]:
        keys = ("loss", "lm_loss", "im_loss") + (("hold_loss",) if self.reference is not None else ())
        return {k: sums[k] for k in keys}

    def postfix(self, record: dict[str, float]) -> dict[str, str]:
        return {"loss": f"{record['loss']:.4f}", "im": f"{record['im_loss']:.4f}"}

    def state_dict(self) -> list[dict]:
        return self.batches.state_dict()

    def load_state_dict(self, states: list[dict]) -> None:
        self.batches.load_state_dict(states)
