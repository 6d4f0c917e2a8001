"""GRPO rollouts of a per-token flow head, and their log-probabilities recomputed for training.

`rollout` samples image tokens autoregressively (KV cache, no guidance) with a
stochastic sampler and records, per image token and flow step, the state x_i,
the next state x_{i+1} and the transition's log-probability under
N(a x_i + b v, sigma^2) (`FlowSampler.step_coefficients`). Only its (a, b,
sigma) and time grid are used here: the same transitions as the pipeline's
sampler, written out step by step because every state is kept.

`transition_means` recomputes the means of chosen steps with gradients, in one
teacher-forced pass of the decoder over prompt + sampled tokens (no cache),
then one batched call of the flow head over every (token, step); the
probability arithmetic is float32.

An edit's row holds its source image in the prompt (`request.latents`, one
image per such row, in row order; rows without one are text to image), so the
teacher-forced pass reads each row's images in sequence order: the source,
then the sampled image.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.distributed.fsdp import FSDPModule

from ..model import KVCache, NextStep
from ..model.decoder import rope_tables
from ..model.flow_head import FusedFlowNet
from ..model.nextstep import unpatchify
from ..sampling.autoregressive import decode_one_token, prefill
from ..sampling.flow import FlowSampler
from ..sampling.requests import GenerationRequest
from .grpo import gaussian_log_prob


@dataclass
class Rollout:
    """B images sampled from prompt rows, with what the objective needs."""

    input_ids: Tensor  # (B, T) left-padded prompt rows
    attention_mask: Tensor  # (B, T)
    source_latents: Tensor | list[Tensor] | None  # the source image of each edit row, in row order
    tokens: Tensor  # (B, N, D) the image tokens as fed back and decoded (layer-normed with use_norm)
    states: Tensor  # (B, N, S + 1, D) float32: the noise, then the state after each flow step
    log_probs: Tensor  # (B, N, K) float32: log-probability of each stochastic step's transition
    stochastic: list[int]  # the K steps (indices into the S steps) with sigma > 0
    sampler: FlowSampler
    grid: tuple[int, int]
    pos_embed: Tensor | None  # (N, hidden)

    def sigmas(self, steps: list[int]) -> Tensor:
        """The noise std of flow steps `steps`: (len(steps),)."""
        return Transitions.of(self.sampler).sigma[torch.tensor(steps)]


@dataclass(frozen=True)
class Transitions:
    """The sampler's steps as tensors: times t_i (S,), and a, b, sigma (S,) of x' = a x + b v + sigma w."""

    times: Tensor
    a: Tensor
    b: Tensor
    sigma: Tensor

    @classmethod
    def of(cls, sampler: FlowSampler) -> "Transitions":
        if sampler.kind == "euler_maruyama":  # its last, deterministic step is not on the grid's coefficients
            raise ValueError("GRPO rollouts need the sde or cps sampler (their steps end at t = 1)")
        a, b, sigma = (torch.tensor(c, dtype=torch.float32) for c in zip(*sampler.step_coefficients()))
        return cls(sampler.timesteps()[:-1].float(), a, b, sigma)


@torch.no_grad()
def rollout(model: NextStep, request: GenerationRequest) -> Rollout:
    """Sample the request's images (one row group: no guidance) and record every flow step. Edit rows
    read their source image from `request.latents` (one per row with image placeholders, in row order)."""
    if request.groups != 1:
        raise ValueError(f"GRPO rollouts sample without guidance (one row group), got {request.groups} groups")
    head = model.image_head.net
    sharded = isinstance(head, FSDPModule)  # under torchrun: the fused head reads whole weights, not shards
    if sharded:
        head.unshard()
    try:
        return _sample(model, request)
    finally:
        if sharded:
            head.reshard()


def _sample(model: NextStep, r: GenerationRequest) -> Rollout:
    steps = Transitions.of(r.sampler)
    device, dtype = model.embed_tokens.weight.device, model.embed_tokens.weight.dtype
    rows, T = r.input_ids.shape
    n_tokens = r.grid[0] * r.grid[1]
    max_len = T + n_tokens - 1  # the last token is never fed back
    cache = KVCache(model.config, rows, max_len, device, dtype)
    key_valid = torch.zeros(rows, max_len, dtype=torch.bool, device=device)
    key_valid[:, :T] = r.attention_mask.bool()
    rope = rope_tables(torch.arange(max_len, device=device), model.config.head_dim, model.config.rope_theta, dtype)
    # The pipeline's fused form of the head (the same function as `FlowNet.forward`): every step's
    # adaLN modulation of a token in one matmul, so its largest weight is read once per token.
    head = model.image_head.net
    net = FusedFlowNet(head)
    t_emb = head.time_embed(steps.times.to(device))  # (S, dim)
    noise = r.noise.to(device)
    coefs = r.sampler.step_coefficients()
    stochastic = [i for i, (_, _, sigma) in enumerate(coefs) if sigma > 0]

    h = prefill(model, model.embed(r.input_ids, r.latents), key_valid, cache, rope)
    tokens, states, log_probs = [], [], []
    for k in range(n_tokens):
        if r.pos_embed is not None:
            h = h + r.pos_embed[k]
        mod = net.modulation(t_emb, model.image_out_projector(h))  # (S, rows, ...)
        x = noise[k, 0].float()
        token_states, token_logp = [x], []
        for i, (a, b, sigma) in enumerate(coefs):
            v = net.velocity(x.to(dtype), mod[i]).float()
            mean = a * x + b * v
            x = mean + sigma * noise[k, i + 1].float() if sigma > 0 else mean
            if sigma > 0:
                token_logp.append(gaussian_log_prob(x, mean, sigma))
            token_states.append(x)
        token = F.layer_norm(x, x.shape[-1:], eps=1e-6) if r.use_norm else x
        tokens.append(token.to(dtype))
        states.append(torch.stack(token_states, dim=1))
        log_probs.append(torch.stack(token_logp, dim=1))
        if k + 1 < n_tokens:
            slot = torch.tensor([T + k], device=device)
            h = decode_one_token(model, model.image_in_projector(token.to(dtype)), slot, key_valid, cache, rope)
    return Rollout(r.input_ids, r.attention_mask, r.latents, torch.stack(tokens, 1), torch.stack(states, 1),
                   torch.stack(log_probs, 1), stochastic, r.sampler, r.grid, r.pos_embed)


def transition_means(model: NextStep, forward_hidden: Callable[..., Tensor], ro: Rollout, steps: list[int]
                     ) -> Tensor:
    """The policy's transition means at flow steps `steps` for every image token: (B, N, len(steps), D),
    float32, with gradients. `forward_hidden` is `model.forward_hidden` (or its FSDP-hooked version)."""
    B, T = ro.input_ids.shape
    n_tokens = ro.tokens.shape[1]
    placeholders = torch.full((B, n_tokens), model.config.image_placeholder_id, dtype=ro.input_ids.dtype,
                              device=ro.input_ids.device)
    ids = torch.cat([ro.input_ids, placeholders], dim=1)
    mask = torch.cat([ro.attention_mask, torch.ones_like(placeholders, dtype=ro.attention_mask.dtype)], dim=1)
    hidden = forward_hidden(ids, mask, sequence_latents(model, ro))
    hidden = hidden[:, T - 1: T - 1 + n_tokens]  # position p predicts token p + 1
    if ro.pos_embed is not None:
        hidden = hidden + ro.pos_embed
    c = model.image_out_projector(hidden)  # (B, N, hidden)
    tr = Transitions.of(ro.sampler)
    idx = torch.tensor(steps)
    x = ro.states[:, :, idx]  # (B, N, K, D)
    K, D = len(steps), x.shape[-1]
    t = tr.times[idx].to(x.device).repeat(B * n_tokens)
    cond = c[:, :, None].expand(B, n_tokens, K, c.shape[-1]).reshape(-1, c.shape[-1])
    v = model.image_head.net(x.reshape(-1, D).to(c.dtype), t, cond).float().reshape(B, n_tokens, K, D)
    a, b = tr.a[idx].to(x.device)[:, None], tr.b[idx].to(x.device)[:, None]
    return a * x + b * v


def sequence_latents(model: NextStep, ro: Rollout) -> Tensor | list[Tensor]:
    """Every image of the rollout's rows in sequence order (as `NextStep.embed` fills the placeholders,
    row by row): an edit row's source image, then its sampled image; text-to-image rows the latter only."""
    sampled = unpatchify(ro.tokens, model.config.latent_patch_size, *ro.grid)
    if ro.source_latents is None:
        return sampled
    sources = list(ro.source_latents.split(1) if isinstance(ro.source_latents, Tensor) else ro.source_latents)
    has_source = (ro.input_ids == model.config.image_placeholder_id).any(dim=1).tolist()
    if len(sources) != sum(has_source):
        raise ValueError(f"{len(sources)} source images for {sum(has_source)} rows with image placeholders")
    # The VAE encodes under inference_mode; such tensors cannot be saved for the backward pass.
    sources = [x.clone() if x.is_inference() else x for x in reversed(sources)]  # popped from the end
    out = []
    for row, edit in enumerate(has_source):
        if edit:
            out.append(sources.pop())
        out.append(sampled[row:row + 1])
    return out


def transition_log_probs(means: Tensor, ro: Rollout, steps: list[int]) -> Tensor:
    """log-probabilities (B, N, K) of the rollout's next states under the given means of steps `steps`."""
    sigma = ro.sigmas(steps).to(means.device)[:, None]
    return gaussian_log_prob(ro.states[:, :, torch.tensor(steps) + 1].to(means.device), means, sigma)
