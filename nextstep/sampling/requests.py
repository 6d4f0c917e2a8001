"""A prepared generation call, and how several of them share one model call.

A `GenerationRequest` holds everything the token loop needs: prompt rows,
source latents, and all its noise, drawn up front. Requests whose prompt rows
have the same length and whose settings match can be stacked into one batch
(`merge_requests`); no row is padded for another, so each image is exactly the
one its request gives alone (only the batch size changes, and on the CPU and
GPU kernels used here a row's arithmetic does not depend on the other rows).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .flow import FlowSampler


@dataclass
class GenerationRequest:
    """A validated generation call, ready for the token loop."""

    input_ids: Tensor  # (groups * B, T), left-padded
    attention_mask: Tensor
    # Scaled source-image latents in placeholder order (row by row, each row's images left to right).
    latents: Tensor | list[Tensor] | None
    noise: Tensor  # (n_tokens, noise_draws, B, token_dim)
    context_noise: Tensor | None  # (n_tokens, B, token_dim), already scaled: added to fed-back tokens
    guidance: list[tuple[float, float]]  # (cfg, cfg_img) per token
    groups: int
    sampler: FlowSampler
    grid: tuple[int, int]  # image tokens per column and row
    pos_embed: Tensor | None
    use_norm: bool
    # Source images in one row of each guidance group that holds them ((1,) or (1, 1): cond and
    # uncond_1; (2, 1) where a cond row repeats its source after a thought); () without sources.
    images_per_row: tuple[int, ...] = ()

    @property
    def prompt_length(self) -> int:
        return self.input_ids.shape[1]


def merge_requests(requests: Sequence[GenerationRequest]) -> GenerationRequest:
    """One batch from several prepared requests with the same settings and prompt length. Each
    keeps its own prompt rows, source latents and noise; the images come back request-major."""
    first = requests[0]
    if len(requests) == 1:
        return first
    same = ("groups", "grid", "guidance", "use_norm", "sampler", "prompt_length", "images_per_row")
    for r in requests[1:]:
        differ = [k for k in same if getattr(r, k) != getattr(first, k)]
        if (r.latents is None) != (first.latents is None):
            differ.append("source image")
        if (r.context_noise is None) != (first.context_noise is None):
            differ.append("context noise")
        if differ:
            raise ValueError(f"requests differ in {', '.join(differ)}: they cannot share a batch")
    g = first.groups

    def by_group(x: Tensor, n_groups: int) -> Tensor:  # (n_groups * B_i, ...) -> (n_groups, B_i, ...)
        return x.reshape(n_groups, -1, *x.shape[1:])

    def merged(xs: list[Tensor], n_groups: int) -> Tensor:
        return torch.cat([by_group(x, n_groups) for x in xs], dim=1).flatten(0, 1)

    context_noise = None
    if first.context_noise is not None:
        context_noise = torch.cat([r.context_noise for r in requests], dim=1)
    latents = None
    if first.latents is not None:
        # Each request's latents split by guidance group (rows x images per row), then joined group by group.
        chunks = []
        for r in requests:
            lat = r.latents if isinstance(r.latents, Tensor) else torch.cat(r.latents)
            chunks.append(lat.split([r.noise.shape[2] * k for k in r.images_per_row]))
        latents = torch.cat([c[i] for i in range(len(first.images_per_row)) for c in chunks])
    return GenerationRequest(
        merged([r.input_ids for r in requests], g), merged([r.attention_mask for r in requests], g), latents,
        torch.cat([r.noise for r in requests], dim=2), context_noise, first.guidance, g, first.sampler, first.grid,
        first.pos_embed, first.use_norm, first.images_per_row)


def guidance_schedule(cfg: float, cfg_img: float, schedule: str, n_tokens: int, family: str
                      ) -> list[tuple[float, float]]:
    """(cfg, cfg_img) for each token.

    "linear" differs by family: NextStep-1 starts at the full scale and falls
    towards 1; NextStep-1.1 rises from max(scale/2, 1) towards the full scale.
    """
    if schedule == "constant":
        return [(cfg, cfg_img)] * n_tokens
    if family == "nextstep-1":
        def scale(g: float, k: int) -> float:
            return 1 + (g - 1) * (n_tokens - k) / n_tokens
    else:
        def scale(g: float, k: int) -> float:
            return max(g / 2, 1 + (g - 1) * k / n_tokens)
    return [(scale(cfg, k), scale(cfg_img, k)) for k in range(n_tokens)]
