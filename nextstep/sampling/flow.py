"""Samplers of one image token: integrate the flow head's velocity from noise (t=0) to data (t=1).

Four integrators, all of the form x' = a*x + b*v + sigma*w per step (w ~ N(0, 1)):
- `euler_maruyama` (NextStep-1): S-1 Euler-Maruyama steps of the SDE whose
  drift is v + (1-t) * score (the score implied by v), on
  shift(linspace(0, 1 - 0.04, S)), then one deterministic step of
  `last_step_size` 0.04 from the last grid point;
- `sde`, `cps`, `ode` (NextStep-1.1): S steps on shift(linspace(0, 1, S+1))
  that end at t = 1. With x0 = x - t*v (predicted noise) and x1 = x + (1-t)*v
  (predicted data), `ode` moves to x0*(1-t') + x1*t' (plain Euler); `sde`
  adds the Flow-GRPO-style noise of strength `noise_level`; `cps` keeps the
  marginal noise level ("coefficients-preserving": x0 gets
  sqrt((1-t')^2 - s^2), fresh noise s = (1-t') sin(noise_level*pi/2)).

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

SAMPLERS = ("euler_maruyama", "sde", "cps", "ode")


def shift_timesteps(t: Tensor, shift: float) -> Tensor:
    """Warp t in [0, 1] towards 0 for shift > 1 (more of the steps are spent near the noise)."""
    return t / (shift - (shift - 1) * t)


def guide(v: Tensor, groups: int, cfg: float, cfg_img: float, normalize: bool = False) -> Tensor:
    """Mix the velocities of the row groups [cond, uncond_1, (uncond_2)] into one.

    `normalize` (NextStep-1.1's optional clamp) scales each guided row down so its
    norm never exceeds the conditional velocity's.
    """
    if groups == 1:
        return v
    if groups == 2:
        c, u = v.chunk(2)
        out = torch.lerp(u, c, cfg)  # u + cfg * (c - u)
    else:
        c, u1, u2 = v.chunk(3)
        out = torch.lerp(u2, u1, cfg_img).add_(c - u1, alpha=cfg)  # u2 + cfg_img*(u1-u2) + cfg*(c-u1)
    if normalize:
        ratio = c.norm(dim=-1, keepdim=True) / (out.norm(dim=-1, keepdim=True) + 1e-6)
        out = out * ratio.clamp(0, 1)
    return out


@dataclass(frozen=True)
class FlowSampler:
    kind: str = "euler_maruyama"
    num_steps: int = 20
    timesteps_shift: float = 1.0
    noise_level: float = 0.8  # sde / cps only
    last_step_size: float = 0.04  # euler_maruyama only

    def __post_init__(self) -> None:
        if self.kind not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.kind!r}; choose one of {SAMPLERS}")
        min_steps = 2 if self.kind == "euler_maruyama" else 1
        if not isinstance(self.num_steps, int) or self.num_steps < min_steps:
            raise ValueError(f"num_sampling_steps must be an integer >= {min_steps} for the {self.kind} sampler, "
                             f"got {self.num_steps!r}")
        if not self.timesteps_shift > 0:
            raise ValueError(f"timesteps_shift must be > 0, got {self.timesteps_shift}")
        if not 0 <= self.noise_level <= 1:
            raise ValueError(f"noise_level must be in [0, 1], got {self.noise_level}")

    @property
    def noise_draws(self) -> int:
        """Gaussian draws per token, in the reference's order: the initial noise, then one per
        stochastic step (`cps` draws on its last step too, although its coefficient is 0)."""
        return {"euler_maruyama": self.num_steps, "ode": 1}.get(self.kind, self.num_steps + 1)

    def timesteps(self) -> Tensor:
        """The time grid (float32, computed as the reference does)."""
        if self.kind == "euler_maruyama":
            return shift_timesteps(torch.linspace(0, 1 - self.last_step_size, self.num_steps), self.timesteps_shift)
        t = shift_timesteps(torch.linspace(0, 1, self.num_steps + 1)[:-1], self.timesteps_shift)
        return torch.cat([t, torch.ones(1)])

    def step_coefficients(self) -> list[tuple[float, float, float]]:
        """(a, b, sigma) of x' = a*x + b*v + sigma*w for every step between grid points."""
        t = self.timesteps()
        steps = []
        for i in range(len(t) - 1):
            ti, tj = t[i], t[i + 1]
            if self.kind == "euler_maruyama":
                # score = (t v - x) / ((1-t)^2 + t(1-t)), drift = v + (1-t) score:
                # x' = x + drift dt + sqrt(2 (1-t)) sqrt(dt) w, which is linear in x and v.
                dt = tj - ti
                k = dt * (1 - ti) / ((1 - ti) ** 2 + ti * (1 - ti))
                a, b, sigma = 1 - k, dt + k * ti, torch.sqrt(2 * (1 - ti)) * torch.sqrt(dt)
            elif self.kind == "ode":  # x0 (1-t') + x1 t'
                a, b, sigma = torch.ones(()), tj - ti, torch.zeros(())
            elif self.kind == "cps":  # x0 sqrt((1-t')^2 - s^2) + x1 t' + s w
                s = (1 - tj) * math.sin(self.noise_level * math.pi / 2)
                c0 = torch.sqrt((1 - tj) ** 2 - s**2)
                a, b, sigma = c0 + tj, -ti * c0 + (1 - ti) * tj, s
            else:  # sde: x0 (1-t') + x1 t' - s^2 dt / (2 sigma_t) x0 + s sqrt(dt) w
                sigma_t, dt = 1 - ti, tj - ti
                sigma_max = t[-2]  # the reference's choice (a t value, not a sigma)
                s = torch.sqrt(sigma_t / (1 - (sigma_max if sigma_t == 1 else sigma_t))) * self.noise_level
                k = s**2 * dt / (2 * sigma_t)
                a, b, sigma = 1 - k, -ti * (1 - tj - k) + (1 - ti) * tj, s * torch.sqrt(dt)
            steps.append((float(a), float(b), float(sigma)))
        return steps

    def prepare(self, net: FlowNet, device: torch.device) -> "PreparedSampler":
        """Everything that is the same for every token of a generation call, computed once."""
        return PreparedSampler(self, FusedFlowNet(net), device)


class PreparedSampler:
    def __init__(self, sampler: FlowSampler, net: FusedFlowNet, device: torch.device) -> None:
        self.sampler = sampler
        self.net = net
        grid = sampler.timesteps()
        # Times at which the velocity is evaluated: every grid point but the end (1.1), or every
        # grid point, the last one for the final deterministic step (1.0).
        eval_times = grid if sampler.kind == "euler_maruyama" else grid[:-1]
        self.t_emb = net.net.time_embed(eval_times.to(device))  # (S, dim)
        self.coefs = sampler.step_coefficients()
        self.mod: Tensor | None = None  # the adaLN parameters of the current token (see sample)

    def sample(self, c: Tensor, noise: Tensor, groups: int, cfg: float, cfg_img: float = 1.0) -> Tensor:
        """One token per conditional row.

        c: (groups * B, hidden) conditions, groups stacked [cond; uncond_1; uncond_2].
        noise: (noise_draws, B, token_dim), the initial noise first.
        Returns (B, token_dim) in c's dtype.
        """
        # Every step's adaLN parameters in one matmul, into a buffer kept for the call's next tokens.
        shape = (self.t_emb.shape[0], c.shape[0], self.net.mod_weight.shape[0])
        if self.mod is None or self.mod.shape != shape:
            self.mod = torch.empty(shape, dtype=self.net.mod_weight.dtype, device=c.device)
        mod = self.net.modulation(self.t_emb, c, out=self.mod)
        dtype = c.dtype

        def velocity(x: Tensor, step: int) -> Tensor:
            return guide(self.net.velocity(x.to(dtype), mod[step], groups), groups, cfg, cfg_img).float()

        # The state is integrated in float32 whatever the model's dtype (a no-op for fp32 models),
        # so bf16 rounding does not accumulate over the steps.
        x = noise[0].float()
        for i, (a, b, sigma) in enumerate(self.coefs):
            v = velocity(x, i)
            x = torch.add(x * a, v, alpha=b) if a != 1.0 else x.add(v, alpha=b)
            if sigma:
                x = x.add_(noise[i + 1].float(), alpha=sigma)
        if self.sampler.kind == "euler_maruyama":  # the reference ends with one deterministic step
            x = x.add(velocity(x, len(self.coefs)), alpha=self.sampler.last_step_size)
        return x.to(dtype)
