"""Samplers of one image token: integrate the flow head's velocity from noise (t=0) to data (t=1).

Two integrators:
- `euler_maruyama` (the NextStep-1 reference's): an SDE step built from the
  score implied by the velocity, then one deterministic step of
  `last_step_size` (0.04) at the end;
- `euler`: the plain deterministic ODE, `steps` Euler steps from 0 to 1.

Classifier-free guidance mixes the velocities of G row groups, all evaluated
in one batched call: G=1 none, G=2 text (cond, uncond), G=3 text and image
(cond, image-only, neither). Noise is passed in, drawn up front by the caller,
so the loop itself draws nothing (same numbers on every device, graph-friendly).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..model.flow_head import FlowNet

SAMPLERS = ("euler_maruyama", "euler")


def shift_timesteps(t: Tensor, shift: float) -> Tensor:
    """Warp t in [0, 1] towards 1 (shift > 1 spends more steps near the noise end)."""
    return t / (shift - (shift - 1) * t)


def guide(v: Tensor, groups: int, cfg: float, cfg_img: float) -> Tensor:
    """Mix the velocities of the row groups [cond, uncond_1, (uncond_2)] into one."""
    if groups == 1:
        return v
    if groups == 2:
        c, u = v.chunk(2)
        return u + cfg * (c - u)
    c, u1, u2 = v.chunk(3)
    return u2 + cfg_img * (u1 - u2) + cfg * (c - u1)


@dataclass(frozen=True)
class FlowSampler:
    kind: str = "euler_maruyama"
    num_steps: int = 20
    timesteps_shift: float = 1.0
    last_step_size: float = 0.04

    def __post_init__(self) -> None:
        if self.kind not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.kind!r}; choose one of {SAMPLERS}")
        min_steps = 2 if self.kind == "euler_maruyama" else 1
        if self.num_steps < min_steps:
            raise ValueError(f"num_sampling_steps must be >= {min_steps} for the {self.kind} sampler, "
                             f"got {self.num_steps}")
        if self.timesteps_shift <= 0:
            raise ValueError(f"timesteps_shift must be > 0, got {self.timesteps_shift}")

    @property
    def noise_draws(self) -> int:
        """Gaussian draws per token: the initial noise, plus one per SDE step."""
        return self.num_steps if self.kind == "euler_maruyama" else 1

    def timesteps(self) -> Tensor:
        """The times at which the velocity is evaluated (float32, as the reference)."""
        if self.kind == "euler_maruyama":
            t = torch.linspace(0, 1 - self.last_step_size, self.num_steps)
        else:
            t = torch.linspace(0, 1, self.num_steps + 1)
        return shift_timesteps(t, self.timesteps_shift)

    def prepare(self, net: FlowNet, device: torch.device, dtype: torch.dtype) -> "PreparedSampler":
        """Everything that is the same for every token of a generation call, computed once."""
        ts = self.timesteps()
        t_emb = net.time_embed(ts.to(device)).to(dtype)
        return PreparedSampler(self, net, ts, t_emb)


class PreparedSampler:
    def __init__(self, sampler: FlowSampler, net: FlowNet, ts: Tensor, t_emb: Tensor) -> None:
        self.kind = sampler.kind
        self.last_step_size = sampler.last_step_size
        self.net = net
        self.t_emb = t_emb  # (S, dim): time embedding of each evaluation time
        ts64 = ts.tolist()
        self.ts = ts64
        if self.kind == "euler_maruyama":
            # Per-step scalars of the Euler-Maruyama update, in the reference's float32 arithmetic.
            self.steps = []
            for i in range(len(ts) - 1):
                ti, tj = ts[i], ts[i + 1]
                dt = tj - ti
                denom = (1 - ti) ** 2 + ti * (1 - ti)
                self.steps.append((ti.item(), denom.item(), (1 - ti).item(), dt.item(),
                                   torch.sqrt(2 * (1 - ti)).item(), torch.sqrt(dt).item()))
        else:
            self.dts = [(ts[i + 1] - ts[i]).item() for i in range(len(ts) - 1)]

    def velocity(self, x: Tensor, step: int, cond: Tensor, groups: int, cfg: float, cfg_img: float) -> Tensor:
        y = self.t_emb[step] + cond
        v = self.net.velocity(x.repeat(groups, 1) if groups > 1 else x, y)
        return guide(v, groups, cfg, cfg_img)

    def sample(self, c: Tensor, noise: Tensor, groups: int = 1, cfg: float = 1.0, cfg_img: float = 1.0) -> Tensor:
        """One token per conditional row.

        c: (groups * B, hidden) conditions, groups stacked [cond; uncond_1; uncond_2].
        noise: (noise_draws, B, token_dim), the initial noise first.
        Returns (B, token_dim) in c's dtype.
        """
        cond = self.net.cond_embed(c)
        x = noise[0].to(c.dtype)
        if self.kind == "euler":
            for i, dt in enumerate(self.dts):
                x = x + self.velocity(x, i, cond, groups, cfg, cfg_img) * dt
            return x
        for i, (ti, denom, one_minus_t, dt, sigma, sqrt_dt) in enumerate(self.steps):
            v = self.velocity(x, i, cond, groups, cfg, cfg_img)
            score = (ti * v - x) / denom
            drift = v + one_minus_t * score
            x = x + drift * dt + sigma * (noise[i + 1].to(c.dtype) * sqrt_dt)
        v = self.velocity(x, len(self.steps), cond, groups, cfg, cfg_img)
        return x + v * self.last_step_size
