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

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..model.flow_head import FlowNet, FusedFlowNet

SAMPLERS = ("euler_maruyama", "sde", "cps", "ode")


@dataclass(frozen=True)
class StepPreset:
    """A step schedule of fewer flow steps: token k of n gets max(floor, start * (1 - k/n) ** power)
    * num_steps steps, rounded up (fractions of `num_steps`), so a count may fall from the first token
    to the last (training-free step annealing) or stay flat; `kind` and `noise_level` name the
    integrator those steps use (None: the sampler's own), since few steps favour a gentler one."""

    start: float
    power: float
    floor: float
    kind: str | None = None
    noise_level: float | None = None


# Flow steps per image token: "fixed" (the official: `num_steps` of the sampler for every token), or
# a preset of fewer. A preset must not lose more than 0.01 of shapes score against "fixed" (the
# shipped model, three full prompt sets; docs/performance.md). "fast": 6 of 20 steps (3.3x fewer
# head evaluations) of `cps` at noise 0.5 for every token; on v14 it was chosen on the training
# stream and holds the benchmark. The official sampler's own 7 of 20 steps (the former "fast") lost
# 0.014 there (0.094 on edits); falls from 20 steps lost more (0.030-0.099 on v10).
STEP_SCHEDULE_PRESETS = {"fast": StepPreset(0.3, 0.0, 0.3, kind="cps", noise_level=0.5)}
STEP_SCHEDULES = ("fixed", *STEP_SCHEDULE_PRESETS)


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
    rows = v.unflatten(0, (groups, -1))
    out = mix_rows(rows, guidance_weights(groups, cfg, cfg_img, v.dtype, v.device))
    if normalize:
        c = rows[0]
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
    step_schedule: str = STEP_SCHEDULES[0]  # the official fixed count

    def __post_init__(self) -> None:
        if self.kind not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.kind!r}; choose one of {SAMPLERS}")
        if self.step_schedule not in STEP_SCHEDULES:
            raise ValueError(f"unknown step schedule {self.step_schedule!r}; choose one of {STEP_SCHEDULES}")
        min_steps = self.min_steps
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
        stochastic step (`cps` draws on its last step too, although its coefficient is 0). Under a
        step schedule, at least the fixed count's (a token with fewer steps uses the first draws)."""
        own = {"euler_maruyama": self.num_steps, "ode": 1}.get(self.kind, self.num_steps + 1)
        if self.step_schedule not in STEP_SCHEDULE_PRESETS:
            return own
        return max(own, self.with_steps(self.token_steps(1)[0]).noise_draws)  # the first token has the most

    @property
    def min_steps(self) -> int:
        return 2 if self.kind == "euler_maruyama" else 1

    def token_steps(self, n_tokens: int) -> list[int]:
        """Flow steps of each of `n_tokens` image tokens under the step schedule."""
        if self.step_schedule not in STEP_SCHEDULE_PRESETS:
            return [self.num_steps] * n_tokens
        preset = STEP_SCHEDULE_PRESETS[self.step_schedule]
        low = max(self.with_steps(self.num_steps).min_steps, math.ceil(preset.floor * self.num_steps))
        return [min(self.num_steps, max(low, math.ceil(preset.start * self.num_steps * (1 - k / n_tokens)
                                                       ** preset.power))) for k in range(n_tokens)]

    def with_steps(self, num_steps: int) -> "FlowSampler":
        """One token's sampler under the step schedule: a fixed count of `num_steps`, with the
        schedule's integrator if it names one."""
        preset = STEP_SCHEDULE_PRESETS.get(self.step_schedule)
        kind = preset.kind if preset and preset.kind else self.kind
        noise_level = preset.noise_level if preset and preset.noise_level is not None else self.noise_level
        return dataclasses.replace(self, kind=kind, noise_level=noise_level, num_steps=num_steps,
                                   step_schedule=STEP_SCHEDULES[0])

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
        # The adaLN parameters of the current token, its per-step views, and the (shape, groups)
        # they were made for (see sample).
        self.mod: Tensor | None = None
        self.mod_parts: list[tuple[Tensor, ...]] = []
        self.mod_layout: tuple | None = None
        weight, bias = net.final
        # Plain float32 (no autocast, fp32 weights): each step's final matmul, guidance, bias and
        # noise become one addmm and one add (see sample). Otherwise the general path below.
        self.fused_update = weight.dtype == torch.float32 and not torch.is_autocast_enabled(device.type)
        self.final_t = weight.t()
        a, b, sigma = (torch.tensor(col, dtype=torch.float32, device=device) for col in zip(*self.coefs))
        self.a, self.b, self.sigma = a, b, sigma
        self.bias_terms = (b[:, None] * bias.float()[None])[:, None]  # (steps, 1, D): b_i * final bias
        self.stochastic = bool(sigma.any())
        self.compiled = None
        self.admit: Callable[[tuple[int, int]], bool] | None = None  # see compile

    def sample(self, c: Tensor, noise: Tensor, groups: int, cfg: float, cfg_img: float = 1.0) -> Tensor:
        """One token per conditional row.

        c: (groups * B, hidden) conditions, groups stacked [cond; uncond_1; uncond_2].
        noise: (noise_draws, B, token_dim), the initial noise first (more draws than needed are
        ignored: a step schedule passes the draws of the longest schedule).
        Returns (B, token_dim) in c's dtype.
        """
        mix = guidance_weights(groups, cfg, cfg_img, c.dtype, c.device)
        if self.compiled is not None and (self.admit is None or self.admit((c.shape[0] // groups, groups))):
            # the whole integration as one graph (static shapes per batch, groups and steps)
            # A CUDA graph's output is overwritten by its next replay: the caller keeps a copy.
            return self.compiled(c, noise[: self.sampler.noise_draws], mix, groups).clone()
        # Every step's adaLN parameters in one matmul, into a buffer kept for the call's next tokens,
        # with its per-step views cut once.
        shape = (self.t_emb.shape[0], c.shape[0], self.net.mod_weight.shape[0])
        if self.mod_layout != (shape, groups):
            self.mod = torch.empty(shape, dtype=self.net.mod_weight.dtype, device=c.device)
            self.mod_parts = self.net.step_parts(self.mod, groups, c.shape[0] // groups)
            self.mod_layout = (shape, groups)
        return self.integrate(c, noise, mix, groups, self.mod, self.mod_parts)

    def static_tensors(self) -> list[Tensor]:
        """Every tensor the integration reads that is not an argument (for CUDA graphs' static inputs)."""
        net = self.net
        tensors = [self.t_emb, self.final_t, self.bias_terms, self.sigma, net.mod_weight, net.mod_bias,
                   *net.input_proj, *net.final, *net.cond_embed]
        for block in net.blocks:
            tensors += [t for t in block if isinstance(t, Tensor)]
        return tensors

    def compile(self, admit: Callable[[tuple[int, int]], bool] | None = None, **options) -> None:
        """Run `integrate` through `torch.compile(**options)` from now on (see sampling/compiled.py).
        Each new (batch, groups) is a new graph: `admit(shape)`, if given, says whether it may be
        compiled (else that call runs eagerly), so the number of graphs can be bounded."""
        self.compiled = torch.compile(self.integrate, **options)
        self.admit = admit

    def integrate(self, c: Tensor, noise: Tensor, mix: Tensor | None, groups: int, buffer: Tensor | None = None,
                  parts: list[tuple[Tensor, ...]] | None = None) -> Tensor:
        """`sample` after its guidance weights: a function of tensors only, so it compiles as one graph.
        `parts`, if given, are `buffer`'s views cut by `step_parts`."""
        batch, dtype = noise.shape[1], c.dtype
        mod = self.net.modulation(self.t_emb, c, out=buffer)
        if parts is None:
            parts = self.net.step_parts(mod, groups, batch)

        def guided_input(x: Tensor, step: int) -> Tensor:
            # Guidance is linear in the rows with weights summing to 1, so it commutes with the
            # final (affine) layer: mix the rows first, then one matmul on B rows instead of G*B.
            return mix_rows(self.net.final_input(x.to(dtype), parts[step]), mix)

        # The state is integrated in float32 whatever the model's dtype (a no-op for fp32 models),
        # so bf16 rounding does not accumulate over the steps.
        x = noise[0].float()
        n_steps = len(self.coefs)
        if self.fused_update:
            # x' = a x + b (W u + bias) + sigma w  ==  addmm(b bias + sigma w, u, W^T, alpha=b) + a x,
            # with every step's b bias + sigma w computed up front in one op.
            extra = (torch.addcmul(self.bias_terms, self.sigma[:, None, None], noise[1: n_steps + 1].float())
                     if self.stochastic else self.bias_terms.expand(n_steps, batch, -1))
            for i, (a, b, _) in enumerate(self.coefs):
                x = torch.addmm(extra[i], guided_input(x, i), self.final_t, alpha=b).add_(x, alpha=a)
        else:
            for i, (a, b, sigma) in enumerate(self.coefs):
                v = F.linear(guided_input(x, i), *self.net.final).float()
                x = torch.add(x * a, v, alpha=b) if a != 1.0 else x.add(v, alpha=b)
                if sigma:
                    x = x.add_(noise[i + 1].float(), alpha=sigma)
        if self.sampler.kind == "euler_maruyama":  # the reference ends with one deterministic step
            v = F.linear(guided_input(x, n_steps), *self.net.final).float()
            x = x.add(v, alpha=self.sampler.last_step_size)
        return x.to(dtype)


def guidance_weights(groups: int, cfg: float, cfg_img: float, dtype: torch.dtype, device: torch.device
                     ) -> Tensor | None:
    """(cfg, cfg_img) as a tensor for `mix_rows` (a tensor, so a compiled graph serves every scale)."""
    return None if groups == 1 else torch.tensor([cfg, cfg_img], dtype=dtype, device=device)


def mix_rows(u: Tensor, scales: Tensor | None) -> Tensor:
    """(groups, B, dim) -> (B, dim): `guide`'s mix of the groups. Elementwise, so each row's result
    does not depend on the batch size (a matmul's blocking would)."""
    if scales is None:
        return u[0]
    if u.shape[0] == 2:
        return torch.lerp(u[1], u[0], scales[0])  # u + cfg (c - u)
    # u2 + cfg_img (u1 - u2) + cfg (c - u1)
    return torch.addcmul(torch.lerp(u[2], u[1], scales[1]), u[0] - u[1], scales[0])
