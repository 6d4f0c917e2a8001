"""Autoregressive generation of image tokens: prefill the prompt, then one token at a time.

Plain functions over a `KVCache` sized once per call (gpt-fast style):
`prefill` runs the prompt, `decode_one_token` feeds one sampled image token.
Each step: hidden state -> `image_out_projector` -> flow sampler -> token ->
`image_in_projector` -> next decoder step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from ..model import KVCache, NextStep
from ..model.decoder import rope_tables
from .compiled import CompiledLoop
from .flow import FlowSampler
from .threads import intra_op_threads, token_loop_threads


def prefill(model: NextStep, embeds: Tensor, key_valid: Tensor, cache: KVCache, rope: tuple[Tensor, Tensor]) -> Tensor:
    """Run the whole prompt into the cache; returns the last position's hidden state (R, hidden)."""
    T = embeds.shape[1]
    pos = torch.arange(T, device=embeds.device)
    return model.hidden_states(embeds, pos, key_valid, cache, (rope[0][:T], rope[1][:T]))[:, -1]


def decode_one_token(model: NextStep, embed: Tensor, pos: Tensor, key_valid: Tensor, cache: KVCache,
                     rope: tuple[Tensor, Tensor]) -> Tensor:
    """Feed one token embedding (R, hidden) at slot `pos` (1,); returns its hidden state (R, hidden)."""
    key_valid.index_fill_(1, pos, True)
    cos, sin = rope[0].index_select(0, pos), rope[1].index_select(0, pos)
    return model.hidden_states(embed[:, None], pos, key_valid, cache, (cos, sin))[:, -1]


# no_grad rather than inference_mode: under inference_mode autocast recasts every weight at
# every call (its weight cache is off), which doubles the cost of the tiny batch-1 matmuls.
@torch.no_grad()
def generate_tokens(
    model: NextStep,
    input_ids: Tensor,
    attention_mask: Tensor,
    n_tokens: int,
    sampler: FlowSampler,
    noise: Tensor,
    guidance: Sequence[tuple[float, float]],
    groups: int,
    latents: Tensor | list[Tensor] | None = None,
    pos_embed: Tensor | None = None,
    use_norm: bool = False,
    progress: bool = False,
    trace: dict[str, list[Tensor]] | None = None,
    context_noise: Tensor | None = None,
    *,
    compiled: CompiledLoop | None = None,
) -> Tensor:
    """Sample `n_tokens` image tokens after the prompt.

    input_ids, attention_mask: (groups * B, T) left-padded prompt rows, groups stacked.
    noise: (n_tokens, sampler.noise_draws, B, token_dim).
    guidance: (cfg, cfg_img) for each token.
    pos_embed: (n_tokens, hidden) added to the hidden state before the projector, if set.
    trace: if given, receives per-token `sample_c` and `sample_out` (for debugging and parity tests).
    context_noise: (n_tokens, B, token_dim), added to each token where the decoder reads it back.
    compiled: run the decode step and the flow head's per-token integration compiled (CUDA graphs
    on a GPU); None runs them eagerly. Same numbers either way, to float rounding.
    Returns (B, n_tokens, token_dim).
    """
    device, dtype = model.embed_tokens.weight.device, model.embed_tokens.weight.dtype
    rows, T = input_ids.shape
    # The last token is never fed back, so the cache needs T + n_tokens - 1 slots.
    max_len = T + n_tokens - 1
    if compiled is not None:  # a cache of a bucketed length, kept across calls: static shapes and addresses
        cache, key_valid, rope = compiled.cache(model, rows, max_len)
    else:
        cache = KVCache(model.config, rows, max_len, device, dtype)
        key_valid = torch.zeros(rows, max_len, dtype=torch.bool, device=device)
        rope = rope_tables(torch.arange(max_len, device=device), model.config.head_dim, model.config.rope_theta,
                           dtype)
    key_valid[:, :T] = attention_mask.bool()
    # One prepared sampler per distinct step count of the schedule (one for the official fixed count).
    token_steps = sampler.token_steps(n_tokens)
    prepared = {n: (compiled.sampler(model, sampler.with_steps(n)) if compiled is not None
                   else sampler.with_steps(n).prepare(model.image_head.net, device))
                for n in sorted(set(token_steps))}
    decode = compiled.decode if compiled is not None else decode_one_token
    noise = noise.to(device)
    if context_noise is not None:
        context_noise = context_noise.to(device)
    slots = torch.arange(T, max_len + 1, device=device)  # where token k is fed back: no host copy per step
    threads = token_loop_threads(rows, model.config.hidden_size, model.config.intermediate_size, device)

    h = prefill(model, model.embed(input_ids, latents), key_valid, cache, rope)
    tokens = []
    with intra_op_threads(threads):
        for k in tqdm(range(n_tokens), disable=not progress, desc="image tokens", leave=False):
            if pos_embed is not None:
                h = h + pos_embed[k]
            c = model.image_out_projector(h)
            cfg, cfg_img = guidance[k]
            out = prepared[token_steps[k]].sample(c, noise[k], groups, cfg, cfg_img)
            token = F.layer_norm(out, out.shape[-1:], eps=1e-6) if use_norm else out
            tokens.append(token)
            if trace is not None:
                trace.setdefault("sample_c", []).append(c)
                trace.setdefault("sample_out", []).append(out)
            if k + 1 < n_tokens:
                fed = token if context_noise is None else token + context_noise[k].to(token.dtype)
                embed = model.image_in_projector(fed).repeat(groups, 1)
                h = decode(model, embed, slots[k: k + 1], key_valid, cache, rope)
    return torch.stack(tokens, dim=1)
