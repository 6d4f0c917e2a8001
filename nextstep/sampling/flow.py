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

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..model.flow_head import FlowNet, FusedFlowNet

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
        return torch.lerp(u, c, cfg)  # u + cfg * (c - u)
    c, u1, u2 = v.chunk(3)
    return torch.lerp(u2, u1, cfg_img).add_(c - u1, alpha=cfg)  # u2 + cfg_img*(u1-u2) + cfg*(c-u1)


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
        if not isinstance(self.num_steps, int) or self.num_steps < min_steps:
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
        return PreparedSampler(self, FusedFlowNet(net), self.timesteps().to(device))


class PreparedSampler:
    def __init__(self, sampler: FlowSampler, net: FusedFlowNet, ts: Tensor) -> None:
        self.kind = sampler.kind
        self.last_step_size = sampler.last_step_size
        self.net = net
        self.t_emb = net.net.time_embed(ts)  # (S, dim): the time embedding of every evaluation time
        ts = ts.cpu()
        if self.kind == "euler_maruyama":
            # The Euler-Maruyama step, with score = (t v - x) / ((1-t)^2 + t(1-t)) and
            # drift = v + (1-t) score, is linear in x and v:
            #   x' = a x + b v + sqrt(2 (1-t)) sqrt(dt) w.
            # a, b and the noise scale are per-step constants.
            self.coefs = []
            for i in range(len(ts) - 1):
                t, dt = ts[i].item(), (ts[i + 1] - ts[i]).item()
                k = dt * (1 - t) / ((1 - t) ** 2 + t * (1 - t))
                self.coefs.append((1 - k, dt + k * t, math.sqrt(2 * (1 - t)) * math.sqrt(dt)))
        else:
            self.coefs = [(1.0, (ts[i + 1] - ts[i]).item(), 0.0) for i in range(len(ts) - 1)]


    def sample(self, c: Tensor, noise: Tensor, groups: int = 1, cfg: float = 1.0, cfg_img: float = 1.0) -> Tensor:
        """One token per conditional row.

        c: (groups * B, hidden) conditions, groups stacked [cond; uncond_1; uncond_2].
        noise: (noise_draws, B, token_dim), the initial noise first.
        Returns (B, token_dim) in c's dtype.
        """
        mod = self.net.modulation(self.t_emb, c)  # every step's adaLN parameters, in one matmul

        def velocity(x: Tensor, step: int) -> Tensor:
            return guide(self.net.velocity(x, mod[step], groups), groups, cfg, cfg_img)

        x = noise[0]
        for i, (a, b, sigma) in enumerate(self.coefs):
            v = velocity(x, i)
            x = torch.add(x * a, v, alpha=b) if a != 1.0 else x.add(v, alpha=b)
            if sigma:
                x = x.add_(noise[i + 1], alpha=sigma)
        if self.kind == "euler_maruyama":  # the reference ends with one deterministic step
            x = x.add(velocity(x, len(self.coefs)), alpha=self.last_step_size)
        return x.to(c.dtype)
