"""Text generation with the LM head, on the same decoder and KV cache as image tokens.

`sample_text` prefills the prompt rows, then picks one token per row and step
from `lm_head(hidden)` and feeds it back through `decode_one_token`, until
every row has met a stop token or `max_new_tokens` are out.

Randomness is drawn up front, as for images: each row gets `max_new_tokens`
uniforms from its own CPU generator seeded with its own seed (`draw_uniforms`),
and a token is picked by inverse CDF (the first token whose cumulative
probability exceeds the uniform). Nothing a row computes reads another row, so
a row's text depends only on its prompt and seed, not on what shares its batch
(when the rows have the same length: left padding shifts RoPE slots, which
moves float rounding; `NextStepPipeline` batches only equal lengths).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..model import KVCache, NextStep
from ..model.decoder import rope_tables
from .autoregressive import decode_one_token, prefill


@dataclass(frozen=True)
class TextSampling:
    """How each token is chosen: temperature 0 is greedy; top_k 0 and top_p 1 keep every token."""

    temperature: float
    top_k: int
    top_p: float

    def __post_init__(self) -> None:
        problems = []
        if not self.temperature >= 0:
            problems.append(f"temperature={self.temperature!r} (must be >= 0)")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            problems.append(f"top_k={self.top_k!r} (must be an integer >= 0)")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p={self.top_p!r} (must be in (0, 1])")
        if problems:
            raise ValueError("invalid text sampling: " + "; ".join(problems))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def pick(self, logits: Tensor, uniforms: Tensor) -> Tensor:
        """One token per row of `logits` (R, V), float32; `uniforms` (R,) in [0, 1)."""
        if self.greedy:
            return logits.argmax(-1)
        logits = logits / self.temperature
        if 0 < self.top_k < logits.shape[-1]:
            kth = logits.topk(self.top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = logits.softmax(-1)
        if self.top_p < 1:
            # The most likely tokens whose mass before them is under top_p (the first is always kept).
            sorted_probs, order = probs.sort(-1, descending=True)
            before = sorted_probs.cumsum(-1) - sorted_probs
            sorted_probs = sorted_probs.masked_fill(before >= self.top_p, 0.0)
            probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
        cdf = probs.cumsum(-1)
        # Scaled by the row's total, so masked mass and rounding never leave a uniform past the end.
        target = uniforms.to(cdf)[:, None] * cdf[:, -1:]
        picked = torch.searchsorted(cdf, target, right=True)[:, 0]
        # right=True never lands on a zero-probability token (its cdf equals the one before it);
        # a target rounded up to the total would fall past the end: take the last kept token.
        last_kept = (probs > 0).int().cumsum(-1).argmax(-1)
        return torch.minimum(picked, last_kept)


def draw_uniforms(seeds: Sequence[int], max_new_tokens: int) -> Tensor:
    """(rows, max_new_tokens) uniforms, row r drawn from a CPU generator seeded with seeds[r]."""
    return torch.stack([torch.rand(max_new_tokens, generator=torch.Generator().manual_seed(int(s)))
                        for s in seeds]) if seeds else torch.zeros(0, max_new_tokens)


# no_grad rather than inference_mode, as in generate_tokens (autocast's weight cache).
@torch.no_grad()
def sample_text(
    model: NextStep,
    input_ids: Tensor,
    attention_mask: Tensor,
    max_new_tokens: int,
    sampling: TextSampling,
    uniforms: Tensor,
    stop_ids: Sequence[int] = (),
    vocab_size: int | None = None,
    latents: Tensor | list[Tensor] | None = None,
    trace: dict[str, list[Tensor]] | None = None,
) -> list[list[int]]:
    """Continue each prompt row with up to `max_new_tokens` tokens.

    input_ids, attention_mask: (R, T) left-padded prompt rows (their image placeholders take
    `latents`, as in `NextStep.embed`). uniforms: (R, max_new_tokens), see `draw_uniforms`.
    A row ends at its first token in `stop_ids`, which is not returned. `vocab_size`: tokens
    the tokenizer knows (an official LM head is padded past them; those ids are never picked).
    trace: if given, receives `logits` (R, V) float32 of every step.
    Returns the new tokens of every row.
    """
    rows, T = input_ids.shape
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if uniforms.shape != (rows, max_new_tokens):
        raise ValueError(f"uniforms: expected shape {(rows, max_new_tokens)}, got {tuple(uniforms.shape)}")
    if T + max_new_tokens - 1 > model.config.max_position_embeddings:
        raise ValueError(f"prompt ({T} tokens) + {max_new_tokens} new tokens exceeds "
                         f"max_position_embeddings={model.config.max_position_embeddings}")
    device, dtype = model.embed_tokens.weight.device, model.embed_tokens.weight.dtype
    max_len = T + max_new_tokens - 1  # the last token is never fed back
    cache = KVCache(model.config, rows, max_len, device, dtype)
    key_valid = torch.zeros(rows, max_len, dtype=torch.bool, device=device)
    key_valid[:, :T] = attention_mask.to(device).bool()
    rope = rope_tables(torch.arange(max_len, device=device), model.config.head_dim, model.config.rope_theta, dtype)
    slots = torch.arange(T, max_len + 1, device=device)
    stop = torch.zeros(model.config.vocab_size, dtype=torch.bool, device=device)
    stop[list(stop_ids)] = True
    unknown = None
    if vocab_size is not None and vocab_size < model.config.vocab_size:
        unknown = torch.arange(model.config.vocab_size, device=device) >= vocab_size
    uniforms = uniforms.to(device)

    h = prefill(model, model.embed(input_ids.to(device), latents), key_valid, cache, rope)
    out = torch.zeros(rows, max_new_tokens, dtype=torch.long, device=device)
    ended = torch.zeros(rows, dtype=torch.bool, device=device)
    length = torch.full((rows,), max_new_tokens, dtype=torch.long, device=device)
    for k in range(max_new_tokens):
        logits = model.lm_head(h).float()
        if unknown is not None:
            logits = logits.masked_fill(unknown, float("-inf"))
        if trace is not None:
            trace.setdefault("logits", []).append(logits)
        token = sampling.pick(logits, uniforms[:, k])
        out[:, k] = token
        stopping = stop[token] & ~ended
        length = torch.where(stopping, k, length)
        ended |= stopping
        # One host sync per token: text is short, and it saves the steps after every row ended.
        if k + 1 == max_new_tokens or bool(ended.all()):
            break
        h = decode_one_token(model, model.embed_tokens(token), slots[k: k + 1], key_valid, cache, rope)
    return [row[:n] for row, n in zip(out.tolist(), length.tolist())]
