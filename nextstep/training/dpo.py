"""Diffusion-DPO for the per-token flow head: learn from preference pairs (`stage = "dpo"`).

Diffusion-DPO (Wallace et al., 2023) trains a denoiser to prefer one image over
another without a reward model: at the same noise and time, the policy's
denoising error on the preferred image should fall relative to a frozen
reference's by more than its error on the rejected one. Here the denoiser is
the flow head and its error is flow matching's velocity error. For a pair
(w = chosen, l = rejected) of one prompt:

    e(x) = mean over the image's tokens (and the head's `fm_head_batch_mul` draws)
           of |v(x_t, t, c) - (x - noise)|^2 / D,  the velocity MSE of `FlowHead.loss`
    d    = (e_policy(w) - e_ref(w)) - (e_policy(l) - e_ref(l))
    loss = -log sigmoid(-beta * d) = softplus(beta * d)  [+ sft_weight * e_policy(w)]

Chosen and rejected share each token's noise and time, and policy and reference
see the same draws, so d measures the models, not the luck of the draw. Each
image token's condition c comes from the decoder reading the prompt and the
image's earlier tokens (teacher forcing), as in supervised training, so the
gradient reaches the decoder as well as the head. At the start the policy is
the reference, d = 0 and the loss is log 2 exactly.

The draws of a pair come from a generator seeded by (seed, step, pair index):
the same on any rank, in any micro-batch, after a resume.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..data import Collator
from ..model import NextStep
from .preferences import pair_batch, pairs_for, read_pair_files
from .stages import StageContext, reference_model
from .supervised import draw_seed, image_generators, sample_latents


def tokens_per_image(model: NextStep, latents: Tensor | list[Tensor]) -> list[int]:
    """Image tokens of each image of `latents` (a (B, C, h, w) tensor or a list of (1, C, h_i, w_i))."""
    p2 = model.config.latent_patch_size ** 2
    items = [latents] if isinstance(latents, Tensor) else latents
    return [x.shape[-2] * x.shape[-1] // p2 for x in items for _ in range(x.shape[0])]


def pair_draws(pair_ids: list[int], tokens: list[int], draws: int, dim: int, seed: int, step: int
               ) -> tuple[Tensor, Tensor]:
    """Noise (draws, N, dim) and flow times t (draws, N) for the target images of a pair batch.

    `tokens` are the token counts of the batch's 2P target images (chosen of pairs 0..P-1, then
    rejected in the same order; N = sum). Pair i's chosen and rejected images get the same draws,
    taken from a generator seeded by (seed, step, pair_ids[i]): noise first, then logit-normal t,
    as `FlowHead.loss` draws them.
    """
    n_pairs = len(pair_ids)
    if len(tokens) != 2 * n_pairs:
        raise ValueError(f"{len(tokens)} target images for {n_pairs} pairs (expected two per pair)")
    per_pair = []
    for i, pid in enumerate(pair_ids):
        if tokens[i] != tokens[n_pairs + i]:
            raise ValueError(f"pair {pid}: chosen has {tokens[i]} image tokens, rejected {tokens[n_pairs + i]}")
        g = torch.Generator().manual_seed(draw_seed(seed, step, "dpo", pid))
        per_pair.append((torch.randn((draws, tokens[i], dim), generator=g),
                         torch.sigmoid(torch.normal(0.0, 1.0, size=(draws, tokens[i]), generator=g))))
    both = per_pair + per_pair  # the rejected images reuse their pair's draws
    return torch.cat([d[0] for d in both], dim=1), torch.cat([d[1] for d in both], dim=1)


def velocity_errors(model: NextStep, batch: dict[str, Any], latents: Tensor | list[Tensor], noise: Tensor,
                    t: Tensor) -> Tensor:
    """Each target image's velocity MSE (see the module doc), one value per image: (n_targets,).

    `batch` is a collated batch (input_ids, attention_mask, latents_mask), `latents` its images'
    latents, `noise` (draws, N, D) and `t` (draws, N) one draw set per target token (`pair_draws`).
    Source images of edits (latents_mask 0) are read by the decoder and not scored.
    """
    device = model.embed_tokens.weight.device
    ids = batch["input_ids"].to(device)
    hidden = model.forward_hidden(ids, batch["attention_mask"].to(device), latents)[:, :-1]
    c = model.image_out_projector(hidden[ids[:, 1:] == model.config.image_placeholder_id])
    counts = tokens_per_image(model, latents)
    scored = batch["latents_mask"].to(device).bool()
    keep = scored.repeat_interleave(torch.tensor(counts, device=device))
    c, x1 = c[keep], model.image_tokens(latents).to(c.dtype)[keep]
    draws, n, dim = noise.shape
    if n != x1.shape[0] or dim != x1.shape[1]:
        raise ValueError(f"draws for {n} tokens of {dim} values, the batch has {tuple(x1.shape)}")
    # Copy-major rows, as FlowHead.loss lays out its `batch_mul` copies.
    x1, c = x1.repeat(draws, 1), c.repeat(draws, 1)
    noise = noise.reshape(draws * n, dim).to(device, x1.dtype)
    t = t.reshape(draws * n).to(device)
    t_col = t[:, None].to(x1.dtype)
    x_t = t_col * x1 + (1 - t_col) * noise
    per_row = (model.image_head.net(x_t, t, c).float() - (x1 - noise).float()).pow(2).mean(dim=-1)
    image_of_token = torch.repeat_interleave(
        torch.arange(int(scored.sum()), device=device),
        torch.tensor([k for k, s in zip(counts, scored.tolist()) if s], device=device))
    sums = torch.zeros(int(scored.sum()), device=device).index_add(0, image_of_token.repeat(draws), per_row)
    return sums / (torch.bincount(image_of_token).float() * draws)


def dpo_loss(policy: Tensor, reference: Tensor, beta: float, sft_weight: float = 0.0
             ) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-pair Diffusion-DPO losses from the 2P per-image errors of policy and reference (chosen
    first, then rejected), plus `sft_weight` times the policy's error on the chosen image, and
    per-pair statistics for the metrics (all (P,))."""
    if policy.shape != reference.shape or policy.ndim != 1 or policy.numel() % 2:
        raise ValueError(f"errors must be two equal (2P,) vectors, got {tuple(policy.shape)} and "
                         f"{tuple(reference.shape)}")
    p_w, p_l = policy.chunk(2)
    r_w, r_l = reference.chunk(2)
    d = (p_w - r_w) - (p_l - r_l)
    loss = F.softplus(beta * d) + sft_weight * p_w
    stats = {"chosen_err": p_w.detach(), "rejected_err": p_l.detach(),
             "chosen_vs_ref": (p_w - r_w).detach(), "rejected_vs_ref": (p_l - r_l).detach(),
             "margin": (-beta * d).detach(), "accuracy": (d < 0).float().detach()}
    return loss, stats


STATS = ("chosen_err", "rejected_err", "chosen_vs_ref", "rejected_vs_ref", "margin", "accuracy")


class DPOStage:
    """Pairs from `[dpo] pairs`, the Diffusion-DPO loss against the frozen `init_from` model.

    `data.batch_size` pairs per step (over all ranks and micro-batches); which pairs
    is a function of (seed, step) (`preferences.pairs_for`), so there is no data
    position to save. Caption dropout is off: a preference holds for its prompt.
    """

    def __init__(self, ctx: StageContext) -> None:
        self.ctx = ctx
        config, env = ctx.config, ctx.env
        self.pairs = read_pair_files(config.dpo.pair_files)  # checks every file whole before any compute
        self.reference = reference_model(config, env.device)
        # The loss never reaches the text head: frozen, it gets no optimizer state (which a resume
        # would otherwise find missing) and no weight decay. (Tied, it is the embedding, which trains.)
        if ctx.model.lm_head.weight is not ctx.model.embed_tokens.weight:
            ctx.model.lm_head.requires_grad_(False)
        self.accum = config.optim.grad_accum
        self.per_rank = config.data.batch_size // (env.world_size * self.accum)
        token_pixels = ctx.vae.down_factor * ctx.model.config.latent_patch_size
        self.collator = Collator(ctx.tokenizer, caption_dropout=0.0, seed=config.seed, token_pixels=token_pixels,
                                 source_image=config.data.source_image,
                                 edit_thought_tokens=config.data.edit_thought_tokens,
                                 edit_source_after_thought=config.data.edit_source_after_thought)
        if env.distributed:  # forward_hidden on the sharded root then gathers its parameters as forward does
            from torch.distributed.fsdp import register_fsdp_forward_method

            register_fsdp_forward_method(ctx.trained, "forward_hidden")

    def accumulate_gradients(self, step: int) -> dict[str, float]:
        ctx, config, env = self.ctx, self.ctx.config, self.ctx.env
        total = config.data.batch_size
        sums = dict.fromkeys(("loss", "pairs", *STATS), 0.0)
        for micro in range(self.accum):
            start = (micro * env.world_size + env.rank) * self.per_rank
            chosen = pairs_for(len(self.pairs), config.seed, step, total, start, self.per_rank)
            batch = pair_batch([self.pairs[i] for i in chosen], self.collator)
            latents = sample_latents(ctx.vae, batch["pixel_values"],
                                     image_generators(batch, ctx.tokenizer.boi_id, config.seed, step, "vae"))
            targets = [n for n, m in zip(tokens_per_image(ctx.model, latents), batch["latents_mask"].tolist()) if m]
            noise, t = pair_draws(batch["pairs"], targets, ctx.model.image_head.batch_mul,
                                  ctx.model.config.token_dim, config.seed, step)
            with ctx.autocast:
                policy = velocity_errors(ctx.trained, batch, latents, noise, t)
                with torch.no_grad():
                    reference = velocity_errors(self.reference, batch, latents, noise, t)
            losses, stats = dpo_loss(policy, reference, config.dpo.beta, config.dpo.sft_weight)
            # The mean over the step's pairs on every rank; times the rank count because FSDP
            # averages the ranks' gradients.
            loss = losses.sum() / total
            (loss * env.world_size).backward()
            sums["loss"] += loss.item()
            sums["pairs"] += len(chosen)
            for k in STATS:
                sums[k] += stats[k].sum().item()
        sums["samples"] = sums["pairs"]
        return sums

    def metrics(self, sums: dict[str, float]) -> dict[str, float]:
        """loss; per-pair means of the policy's errors, their change from the reference, the
        margin -beta * d and the share of pairs the policy already prefers (accuracy)."""
        return {"loss": sums["loss"], **{k: sums[k] / sums["pairs"] for k in STATS}}

    def postfix(self, record: dict[str, float]) -> dict[str, str]:
        return {"loss": f"{record['loss']:.4f}", "acc": f"{record['accuracy']:.2f}"}

    def state_dict(self) -> list[dict]:
        return []  # the pairs of a step follow from (seed, step)

    def load_state_dict(self, states: list[dict]) -> None:
        pass
