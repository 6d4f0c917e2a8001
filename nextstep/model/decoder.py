"""The causal decoder: a Qwen2.5-style transformer (RMSNorm, RoPE, GQA, q/k/v bias, SwiGLU).

Attention runs through `F.scaled_dot_product_attention` with a boolean mask.
A static `KVCache` is sized once per generation call; `input_pos` is a tensor
of slot indices, so a decode step has the same shapes at every position:
`torch.compile(fullgraph=True)` captures it as one graph with no recompiles
(tests/test_compile.py). CUDA graphs need the same static shapes, but are untested.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import NextStepConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # The same arithmetic as below in one fused op (a decode step is launch-bound: 1 op, not 7).
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # Normalise in fp32 even under bf16, as Qwen2 does.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_tables(positions: Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos/sin of shape (T, head_dim) for integer `positions` (T,): default (unscaled) RoPE."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    freqs = positions.float()[:, None] * inv_freq[None, :]
    angles = torch.cat([freqs, freqs], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (i, i + d/2) of every head: the "rotate half" layout of Llama/Qwen checkpoints."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class KVCache:
    """Keys and values of every layer for `max_len` slots, allocated once per generation call."""

    def __init__(self, config: NextStepConfig, batch: int, max_len: int, device, dtype) -> None:
        shape = (config.num_hidden_layers, batch, config.num_key_value_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len


class Attention(nn.Module):
    def __init__(self, config: NextStepConfig) -> None:
        super().__init__()
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        hd = config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, self.n_heads * hd, bias=config.attention_bias)
        self.k_proj = nn.Linear(config.hidden_size, self.n_kv_heads * hd, bias=config.attention_bias)
        self.v_proj = nn.Linear(config.hidden_size, self.n_kv_heads * hd, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.n_heads * hd, config.hidden_size, bias=config.o_attention_bias)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor,
        cache: KVCache | None = None, layer: int = 0, input_pos: Tensor | None = None,
    ) -> Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            # (under autocast the projections come out in bf16 while the cache keeps the model's dtype)
            cache.k[layer].index_copy_(2, input_pos, k.to(cache.k[layer].dtype))
            cache.v[layer].index_copy_(2, input_pos, v.to(cache.v[layer].dtype))
            k, v = cache.k[layer], cache.v[layer]
        # Grouped-query attention without copying K/V: the G query heads that
        # share a KV head are folded into the query-length axis.
        # `mask` comes pre-expanded to (B, 1, G*T, L) by `gqa_mask`, once for all layers.
        q = q.reshape(B, self.n_kv_heads, -1, self.head_dim)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        # reshape, not view: CUDA kernels may return a non-contiguous y
        y = y.reshape(B, self.n_heads, T, self.head_dim).transpose(1, 2).reshape(B, T, -1)
        return self.o_proj(y)


class MLP(nn.Module):
    def __init__(self, config: NextStepConfig) -> None:
        super().__init__()
        d, f, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(d, f, bias=bias)
        self.up_proj = nn.Linear(d, f, bias=bias)
        self.down_proj = nn.Linear(f, d, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: NextStepConfig) -> None:
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor,
                cache: KVCache | None = None, layer: int = 0, input_pos: Tensor | None = None) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer, input_pos)
        return x + self.mlp(self.post_attention_layernorm(x))


def gqa_mask(mask: Tensor, groups: int) -> Tensor:
    """(B, 1, T, L) -> (B, 1, groups*T, L): the mask for queries folded as in `Attention`."""
    if groups == 1:
        return mask
    B, _, T, L = mask.shape
    return mask.unsqueeze(2).expand(B, 1, groups, T, L).reshape(B, 1, groups * T, L)


def attention_mask(key_valid: Tensor, query_pos: Tensor) -> Tensor:
    """Boolean (B, 1, T, L) mask: query at slot p sees valid keys at slots <= p.

    `key_valid` (B, L) is False for padding. Every query also sees itself, so a
    padding row is never fully masked (which would give NaN); its output is
    garbage, but nothing reads it.
    """
    slots = torch.arange(key_valid.shape[1], device=key_valid.device)
    causal = slots[None, :] <= query_pos[:, None]  # (T, L)
    allowed = causal[None] & key_valid[:, None, :]
    allowed = allowed | (slots[None, :] == query_pos[:, None])[None]
    return allowed[:, None]
