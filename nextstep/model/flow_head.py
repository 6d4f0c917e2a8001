"""The flow-matching head: a small MLP with AdaLN that predicts the velocity of one image token.

Convention (the reference's): x_t = t * x1 + (1 - t) * noise, velocity v = x1 - noise,
t = 1 is data. The head sees the token x_t, the flow time t and the decoder's
condition vector c. Parameter names match the official checkpoint
(`image_head.net.*`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def timestep_frequencies(t: Tensor, dim: int = 256, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal features of the raw flow time t in [0, 1]: cat([cos, sin])."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    def __init__(self, dim: int, freq_dim: int = 256) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(timestep_frequencies(t, self.freq_dim).to(self.mlp[0].weight.dtype))


class ResBlock(nn.Module):
    """h + gate * MLP(LN(h) * (1 + scale) + shift), with (shift, scale, gate) from the condition."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.in_ln = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 3 * dim))

    def forward(self, h: Tensor, y: Tensor) -> Tensor:
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)
        return h + gate * self.mlp(self.in_ln(h) * (1 + scale) + shift)


class FinalLayer(nn.Module):
    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.linear = nn.Linear(dim, out_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, h: Tensor, y: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(y).chunk(2, dim=-1)
        return self.linear(self.norm_final(h) * (1 + scale) + shift)


class FlowNet(nn.Module):
    """v(x_t, t, c): the velocity network (the reference's `SimpleMLPAdaLN`)."""

    def __init__(self, token_dim: int, cond_dim: int, dim: int, depth: int) -> None:
        super().__init__()
        self.time_embed = TimestepEmbedder(dim)
        self.cond_embed = nn.Linear(cond_dim, dim)
        self.input_proj = nn.Linear(token_dim, dim)
        self.res_blocks = nn.ModuleList(ResBlock(dim) for _ in range(depth))
        self.final_layer = FinalLayer(dim, token_dim)

    def forward(self, x: Tensor, t: Tensor, c: Tensor) -> Tensor:
        y = self.time_embed(t) + self.cond_embed(c)
        h = self.input_proj(x)
        for block in self.res_blocks:
            h = block(h, y)
        return self.final_layer(h, y)


class FusedFlowNet:
    """FlowNet for sampling: the same function, organised for many tiny calls.

    A token is sampled with 20-50 calls of a small network on a few rows, so
    the time goes to reading weights and launching ops, not to arithmetic.
    The adaLN modulations depend only on the condition and the time, not on
    the token being integrated, so `modulation` computes them for every step
    of a token in one matmul (the largest weight is then read once per token
    instead of once per step), with `1 + scale` folded into the bias. The
    per-step `velocity` is left with the input projection (run once for all
    guidance groups, which share x), the MLPs and fused multiply-adds.
    Built once per generation call; tests check it against `FlowNet.forward`.
    """

    def __init__(self, net: FlowNet) -> None:
        self.net = net
        self.depth = len(net.res_blocks)
        self.dim = net.input_proj.out_features
        weights, biases = [], []
        for layer in [b.adaLN_modulation[1] for b in net.res_blocks] + [net.final_layer.adaLN_modulation[1]]:
            bias = layer.bias.detach().clone()
            bias[self.dim: 2 * self.dim] += 1  # chunks are (shift, scale, [gate]): scale -> 1 + scale
            weights.append(layer.weight.detach())
            biases.append(bias)
        # Under autocast, matmul weights are cast here once instead of by autocast at every call
        # (these detached tensors fall outside autocast's weight cache); norms stay as they are.
        device_type = net.input_proj.weight.device.type
        mm = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None

        def w(t: Tensor) -> Tensor:
            return t.detach() if mm is None else t.detach().to(mm)

        self.mod_weight = w(torch.cat(weights))
        self.mod_bias = w(torch.cat(biases))
        # Plain tensors, read without nn.Module attribute lookups in the hot loop.
        self.input_proj = (w(net.input_proj.weight), w(net.input_proj.bias))
        self.cond_embed = (w(net.cond_embed.weight), w(net.cond_embed.bias))
        self.blocks = [(b.in_ln.weight, b.in_ln.bias, b.in_ln.eps, w(b.mlp[0].weight), w(b.mlp[0].bias),
                        w(b.mlp[2].weight), w(b.mlp[2].bias)) for b in net.res_blocks]
        self.final = (w(net.final_layer.linear.weight), w(net.final_layer.linear.bias))

    def modulation(self, t_emb: Tensor, c: Tensor, out: Tensor | None = None) -> Tensor:
        """adaLN parameters for times t_emb (S, dim) and conditions c (R, cond_dim): (S, R, (3*depth+2)*dim).
        `out`, a buffer of that shape, is written instead of a new tensor: at batch 64 the result
        is tens of MB, and a fresh allocation per token costs more in page faults than the matmul."""
        y = F.silu(t_emb[:, None, :] + F.linear(c, *self.cond_embed)[None])
        if out is None:
            return F.linear(y, self.mod_weight, self.mod_bias)
        w = self.mod_weight
        torch.addmm(self.mod_bias, y.reshape(-1, y.shape[-1]).to(w.dtype), w.t(), out=out.view(-1, w.shape[0]))
        return out

    def velocity(self, x: Tensor, mod: Tensor, groups: int = 1) -> Tensor:
        """Velocity for x (B, D) given one step's modulation (groups * B, ...): (groups * B, D)."""
        u = self.final_input(x, mod.view(groups, x.shape[0], -1).split(self.dim, dim=-1))
        return F.linear(u, *self.final).flatten(0, 1)

    def step_parts(self, mod: Tensor, groups: int, batch: int) -> list[tuple[Tensor, ...]]:
        """`modulation`'s result (S, groups * B, ...) cut into every step's (shift, scale, gate) of each
        block and (shift, scale) of the final layer, views of (groups, B, dim). Cutting is a dozen
        view ops, as many as the step's arithmetic: views of a buffer reused across tokens are cut
        once per generation call instead of once per step."""
        steps = mod.shape[0]
        return [m.split(self.dim, dim=-1) for m in mod.view(steps, groups, batch, -1).unbind(0)]

    def final_input(self, x: Tensor, parts: Sequence[Tensor]) -> Tensor:
        """The final layer's modulated input (groups, B, dim) for x (B, D) and one step's modulation
        cut into `parts` (see `step_parts`): the velocity is `F.linear` of it with `self.final`. The
        guidance groups share x, so the input projection and first layer norm run on B rows and
        broadcast (no copy); the guided velocity is then one mix of these rows before a single final
        matmul."""
        d = self.dim
        h = F.linear(x, *self.input_proj)
        for i, (ln_w, ln_b, eps, w1, b1, w2, b2) in enumerate(self.blocks):
            shift, scale1, gate = parts[3 * i: 3 * i + 3]
            u = torch.addcmul(shift, F.layer_norm(h, (d,), ln_w, ln_b, eps), scale1)
            h = torch.addcmul(h, gate, F.linear(F.silu(F.linear(u, w1, b1)), w2, b2))
        shift, scale1 = parts[3 * self.depth:]
        return torch.addcmul(shift, F.layer_norm(h, (d,), eps=1e-6), scale1)


class FlowHead(nn.Module):
    """Owns the velocity network and its training loss (module name `image_head` in checkpoints)."""

    def __init__(self, token_dim: int, cond_dim: int, dim: int, depth: int, batch_mul: int) -> None:
        super().__init__()
        self.net = FlowNet(token_dim, cond_dim, dim, depth)
        self.batch_mul = batch_mul

    def loss(self, target: Tensor, c: Tensor, mask: Tensor | None = None,
             generator: torch.Generator | list[torch.Generator] | None = None,
             tokens_per_image: list[int] | None = None) -> Tensor:
        """Flow-matching MSE for tokens `target` (N, D) conditioned on `c` (N, cond_dim).

        Every token is repeated `batch_mul` times with its own noise and time, a
        cheap way to get more head updates per decoder pass. Noise and times are
        drawn on the CPU (noise first, then t) so a seed means the same thing on
        every device; t is logit-normal. `generator` may be one generator per
        image (with `tokens_per_image`): then each image's draws depend on its
        own generator only, whatever else shares the batch.
        """
        m = self.batch_mul
        target, c = target.repeat(m, 1), c.repeat(m, 1)
        noise, u = _draw_noise(m, target.shape[-1], generator, tokens_per_image, target.shape[0] // m)
        noise = noise.to(target.device, target.dtype)
        t = torch.sigmoid(u).to(target.device)
        t_col = t[:, None].to(target.dtype)
        x_t = t_col * target + (1 - t_col) * noise
        per_row = (self.net(x_t, t, c).float() - (target - noise).float()).pow(2).mean(dim=-1)
        if mask is None:
            return per_row.mean()
        mask = mask.repeat(m).to(per_row.dtype)
        return (per_row * mask).sum() / (mask.sum() + 1e-8)


def _draw_noise(m: int, dim: int, generator: torch.Generator | list[torch.Generator] | None,
                tokens_per_image: list[int] | None, n_tokens: int) -> tuple[Tensor, Tensor]:
    """Noise (m * N, dim) and logit-normal pre-activations u (m * N,), rows laid out copy-major."""
    if not isinstance(generator, list):
        return (torch.randn((m * n_tokens, dim), generator=generator),
                torch.normal(0.0, 1.0, size=(m * n_tokens,), generator=generator))
    if tokens_per_image is None or len(tokens_per_image) != len(generator) or sum(tokens_per_image) != n_tokens:
        raise ValueError("one generator per image needs tokens_per_image matching the image tokens")
    draws = [(torch.randn((m, n, dim), generator=g), torch.normal(0.0, 1.0, size=(m, n), generator=g))
             for g, n in zip(generator, tokens_per_image)]
    return (torch.cat([d[0] for d in draws], dim=1).reshape(m * n_tokens, dim),
            torch.cat([d[1] for d in draws], dim=1).reshape(m * n_tokens))
