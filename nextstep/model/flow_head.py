"""The flow-matching head: a small MLP with AdaLN that predicts the velocity of one image token.

Convention (the reference's): x_t = t * x1 + (1 - t) * noise, velocity v = x1 - noise,
t = 1 is data. The head sees the token x_t, the flow time t and the decoder's
condition vector c. Parameter names match the official checkpoint
(`image_head.net.*`).
"""

from __future__ import annotations

import math
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
        return self.velocity(x, self.time_embed(t) + self.cond_embed(c))

    def velocity(self, x: Tensor, y: Tensor) -> Tensor:
        """The network after the embeddings: y = time_embed(t) + cond_embed(c).

        Samplers call this directly, computing cond_embed once per token and
        time_embed once per call instead of once per step.
        """
        h = self.input_proj(x)
        for block in self.res_blocks:
            h = block(h, y)
        return self.final_layer(h, y)


class FlowHead(nn.Module):
    """Owns the velocity network and its training loss (module name `image_head` in checkpoints)."""

    def __init__(self, token_dim: int, cond_dim: int, dim: int, depth: int, batch_mul: int) -> None:
        super().__init__()
        self.net = FlowNet(token_dim, cond_dim, dim, depth)
        self.batch_mul = batch_mul

    def loss(self, target: Tensor, c: Tensor, mask: Tensor | None = None,
             generator: torch.Generator | None = None) -> Tensor:
        """Flow-matching MSE for tokens `target` (N, D) conditioned on `c` (N, cond_dim).

        Every token is repeated `batch_mul` times with its own noise and time, a
        cheap way to get more head updates per decoder pass. Noise and times are
        drawn on the CPU generator (noise first, then t) so a seed means the same
        thing on every device; t is logit-normal.
        """
        m = self.batch_mul
        target, c = target.repeat(m, 1), c.repeat(m, 1)
        noise = torch.randn(target.shape, generator=generator).to(target.device, target.dtype)
        t = torch.sigmoid(torch.normal(0.0, 1.0, size=(target.shape[0],), generator=generator)).to(target.device)
        t_col = t[:, None].to(target.dtype)
        x_t = t_col * target + (1 - t_col) * noise
        per_row = (self.net(x_t, t, c).float() - (target - noise).float()).pow(2).mean(dim=-1)
        if mask is None:
            return per_row.mean()
        mask = mask.repeat(m).to(per_row.dtype)
        return (per_row * mask).sum() / (mask.sum() + 1e-8)
