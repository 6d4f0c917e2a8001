"""GRPO for a per-token flow head: the `[grpo]` settings and the objective's arithmetic.

A rollout (`rollout.py`) samples every image token with a stochastic sampler
whose steps are Gaussian transitions x' ~ N(a x + b v, sigma^2) (v: the flow
head's velocity). Each stochastic step is an action with a log-probability;
deterministic steps (sigma = 0) carry none. Following Flow-GRPO, a step's
log-probability is the Gaussian log-density averaged over the token's
dimensions (a sum would scale the ratios with the token size).

The objective per (image, token, flow step):
    ratio = exp(logp_new - logp_rollout)
    loss  = max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps)) + kl_weight * KL(policy || reference)
with A the image's group-normalised advantage (r - mean) / (std + eps) within
its prompt's group. KL between two Gaussians of one sigma is closed-form:
||mu - mu_ref||^2 / (2 sigma^2) (averaged over the dimensions, like logp).
Groups whose rewards are all equal (no signal) or whose mean is above
`reject_mean_above` are dropped before the update (online rejection).

With `policy = "thought"` the actions are instead the tokens of the thought
each image is drawn after (self-CoT, docs/self-cot.md): sampled at
`thought_temperature`, log-probability log softmax(logits / T) of the token
written (the end of the thought: of writing any special token there), the
image drawn after it as at inference; the same advantages weight the tokens.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

THOUGHT_END = -1  # in a thought's tokens: it ended here (wrote a special token) rather than at its length limit
NO_GUIDANCE = 1.0  # the guidance scale that means none: rollouts sample the plain conditional model
GRPO_SAMPLERS = ("sde", "cps")  # the stochastic samplers whose steps are Gaussian transitions
GRPO_POLICIES = ("image", "thought")  # what the rewards train: the flow head's steps or the thought's tokens
ADVANTAGE_EPS = 1e-4  # keeps (r - mean) / (std + eps) finite for groups of nearly equal rewards


@dataclass
class GRPOSection:
    """`[grpo]`: NextStep-GRPO (Flow-GRPO adapted to a per-token flow head)."""

    group_size: int = 8  # G: images per prompt, whose rewards are normalised together
    prompts_per_step: int = 4  # over all ranks; rank r takes prompts r, r+R, ...
    clip_range: float = 1e-4  # eps of the clipped ratio (per-step ratios stay very close to 1)
    kl_weight: float = 0.0  # weight of the KL to the frozen init_from model; 0: no reference model
    step_fraction: float = 1.0  # share of the stochastic flow steps trained per iteration (a random subset)
    reject_mean_above: float = 1.0  # groups with a mean reward above this are dropped (1.0: none by mean)
    sampler: str = "cps"  # "cps" (as NextStep-1.1) or "sde"
    noise_level: float | None = None  # the sampler's noise level; None: the model's generation default
    reward: str = "shapes"  # a built-in reward, or "module:function" (see nextstep/training/rewards.py)
    # A text file of prompts, one a line, taken in order (prompt j of step s is line s * P + j, cycling);
    # empty: captions of the shapes world drawn with the training seed (`data.sources[0]`'s world).
    prompts: str = ""
    # GenerationSettings overrides for the rollouts (e.g. hw, num_sampling_steps, timesteps_shift);
    # unset ones are the init_from model's defaults. Rollouts never use guidance.
    rollout_settings: dict[str, Any] = field(default_factory=dict)
    # The share of a step's prompts that are edits of the shapes world (drawn per (seed, step, prompt));
    # shapes-world prompts only, not with a `prompts` file.
    edit_fraction: float = 0.0
    # What the rewards train: "image" (the stochastic flow steps of each image token, NextStep-GRPO)
    # or "thought" (the tokens of the thought each image is drawn after; the images are drawn as at
    # inference, guidance included, and `train.trainable` names what learns, e.g. ["lm_head"]).
    policy: str = "image"
    thought_temperature: float = 1.0  # policy = "thought": the temperature thoughts are sampled at

    def problems(self) -> list[str]:
        """What is wrong with this [grpo] table, one 'grpo.KEY=VALUE (why)' item per problem."""
        problems = []
        if self.group_size < 2:
            problems.append(f"grpo.group_size={self.group_size} (must be >= 2: advantages compare a group's images)")
        if self.prompts_per_step < 1:
            problems.append(f"grpo.prompts_per_step={self.prompts_per_step} (must be >= 1)")
        if not 0 < self.clip_range < 1:
            problems.append(f"grpo.clip_range={self.clip_range} (must be in (0, 1))")
        if not 0 <= self.kl_weight < math.inf:
            problems.append(f"grpo.kl_weight={self.kl_weight} (must be a number >= 0)")
        if not 0 < self.step_fraction <= 1:
            problems.append(f"grpo.step_fraction={self.step_fraction} (must be in (0, 1])")
        if not 0 <= self.reject_mean_above <= 1:
            problems.append(f"grpo.reject_mean_above={self.reject_mean_above} (must be in [0, 1]: rewards are)")
        if self.sampler not in GRPO_SAMPLERS:
            problems.append(f"grpo.sampler={self.sampler!r} (one of {GRPO_SAMPLERS}: a stochastic sampler)")
        if self.noise_level is not None and not 0 < self.noise_level <= 1:
            problems.append(f"grpo.noise_level={self.noise_level} (must be in (0, 1]: 0 leaves nothing to learn)")
        if self.policy not in GRPO_POLICIES:
            problems.append(f"grpo.policy={self.policy!r} (one of {GRPO_POLICIES})")
        elif self.policy == "thought":
            if not 0 < self.thought_temperature < math.inf:
                problems.append(f"grpo.thought_temperature={self.thought_temperature} (must be > 0: a greedy "
                                "thought has no probabilities to train)")
            if self.edit_fraction:
                problems.append(f"grpo.edit_fraction={self.edit_fraction} with grpo.policy='thought' (thoughts "
                                "are trained on captions)")
            if self.step_fraction != 1:
                problems.append(f"grpo.step_fraction={self.step_fraction} with grpo.policy='thought' (it "
                                "chooses flow steps; every token of a thought is trained)")
            for key in ("think", "text_temperature", "text_top_k", "text_top_p"):
                if key in self.rollout_settings:
                    problems.append(f"grpo.rollout_settings.{key} (grpo.policy='thought' samples every "
                                    "thought at grpo.thought_temperature, from the whole vocabulary)")
        for key in ("cfg", "cfg_img", "sampler", "noise_level"):
            if key in self.rollout_settings and self.policy == "image":
                problems.append(f"grpo.rollout_settings.{key} (rollouts use no guidance; set grpo.sampler "
                                "and grpo.noise_level instead)")
        if not 0 <= self.edit_fraction <= 1:
            problems.append(f"grpo.edit_fraction={self.edit_fraction} (must be in [0, 1]: the share of "
                            "prompts that are edits)")
        elif self.edit_fraction > 0 and self.prompts:
            problems.append(f"grpo.edit_fraction={self.edit_fraction} with grpo.prompts (a prompts file holds "
                            "captions only: edit prompts come from the shapes world, so leave grpo.prompts unset)")
        return problems


def gaussian_log_prob(x: Tensor, mean: Tensor, sigma: float | Tensor) -> Tensor:
    """log N(x; mean, sigma^2 I), averaged over the last dimension, in float32."""
    x, mean = x.float(), mean.float()
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
    z = (x - mean) / sigma
    return (-0.5 * z.pow(2) - torch.log(sigma) - 0.5 * math.log(2 * math.pi)).mean(dim=-1)


def gaussian_kl(mean: Tensor, mean_ref: Tensor, sigma: float | Tensor) -> Tensor:
    """KL(N(mean, sigma^2) || N(mean_ref, sigma^2)), averaged over the last dimension."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=mean.device)
    return ((mean.float() - mean_ref.float()).pow(2) / (2 * sigma**2)).mean(dim=-1)


def group_advantages(rewards: Tensor, group_size: int, reject_mean_above: float
                     ) -> tuple[Tensor, Tensor]:
    """Advantages (N,) and a keep mask (N,) for rewards laid out group-major (N = groups * G).

    A group is dropped (keep False, advantage 0) when its rewards are all equal or
    its mean is above `reject_mean_above`.
    """
    r = rewards.float().reshape(-1, group_size)
    mean, std = r.mean(dim=1, keepdim=True), r.std(dim=1, unbiased=False, keepdim=True)
    keep = (r.max(dim=1).values > r.min(dim=1).values) & (mean.squeeze(1) <= reject_mean_above)
    adv = (r - mean) / (std + ADVANTAGE_EPS)
    adv = torch.where(keep[:, None], adv, torch.zeros_like(adv))
    return adv.reshape(-1), keep.repeat_interleave(group_size)


def clipped_objective(logp: Tensor, logp_old: Tensor, advantages: Tensor, clip_range: float
                      ) -> tuple[Tensor, Tensor]:
    """PPO's clipped surrogate, elementwise (to be minimised), and whether each ratio was clipped.

    logp, logp_old: (..., steps); advantages broadcast against them.
    """
    ratio = torch.exp(logp - logp_old)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_range, 1 + clip_range)
    return torch.maximum(unclipped, clipped), (ratio - 1).abs() > clip_range


def token_log_probs(logits: Tensor, tokens: Tensor, temperature: float, stop_ids: Sequence[int]) -> Tensor:
    """log-probability (float32) of each written token under softmax(logits / temperature).

    logits: (N, V) at the positions that wrote `tokens` (N,); a token THOUGHT_END is the end of the
    text, whose probability is that of writing any of `stop_ids` there.
    """
    logp = (logits.float() / temperature).log_softmax(-1)
    end = tokens == THOUGHT_END
    written = logp.gather(1, tokens.clamp(min=0)[:, None])[:, 0]
    ending = logp[:, list(stop_ids)].logsumexp(-1)
    return torch.where(end, ending, written)


def categorical_kl(logits: Tensor, logits_ref: Tensor, temperature: float) -> Tensor:
    """KL(softmax(logits / T) || softmax(logits_ref / T)) of each row, in float32."""
    logp = (logits.float() / temperature).log_softmax(-1)
    logq = (logits_ref.float() / temperature).log_softmax(-1)
    return (logp.exp() * (logp - logq)).sum(-1)
