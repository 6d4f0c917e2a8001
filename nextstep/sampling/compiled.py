"""The token loop's two hot paths compiled: the decoder's one-token step and the flow head's integration.

On a GPU a token is thousands of tiny kernels, and launching them costs more than running them.
`CompiledLoop` captures each path whole (`torch.compile(mode="reduce-overhead")`: CUDA graphs), so a
token is two graph replays. CUDA graphs need static shapes and static addresses, so everything a graph
reads is kept across calls: the KV cache (its length rounded up to a bucket, unused slots masked out
by `key_valid`), the RoPE tables, and one prepared flow sampler per (sampler, step count). Shapes
change only with (rows, bucket) for the decoder and (batch, groups, steps) for the head; each new
shape compiles once, and the number is bounded (`MAX_SHAPES`, after which that shape runs eagerly).

On the CPU the default is eager (see nextstep/pipeline.py): Inductor's warm-up takes minutes on a
small machine and its gain on the bench configuration is small (benchmarks/generate.py --compile).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import Tensor

from ..model import KVCache, NextStep
from ..model.decoder import rope_tables
from .flow import FlowSampler, PreparedSampler

logger = logging.getLogger(__name__)

CACHE_BUCKET = 128  # KV cache lengths are rounded up to a multiple of this (one decoder graph per bucket)
MAX_SHAPES = 8  # distinct shapes compiled per path; later ones run eagerly (and say so once)


def compile_default(device: torch.device, compile: bool | None) -> bool:
    """Whether to compile: as asked, else on CUDA (graph capture pays for its warm-up within one
    image) and not on the CPU (minutes of Inductor warm-up for a small gain)."""
    return compile if compile is not None else torch.device(device).type == "cuda"


class CompiledLoop:
    """Compiled decode step and flow integration for one model, reused across generation calls."""

    def __init__(self, device: torch.device, backend: str | None = None, mode: str | None = None) -> None:
        self.device = torch.device(device)
        if mode is None and backend is None and self.device.type == "cuda":
            mode = "reduce-overhead"  # CUDA graphs
        self.options: dict = {"fullgraph": True, "dynamic": False}
        if backend is not None:
            self.options["backend"] = backend
        if mode is not None:
            self.options["mode"] = mode
        self._decode: Callable | None = None
        self._caches: dict[tuple, tuple[KVCache, Tensor, tuple[Tensor, Tensor]]] = {}
        self._samplers: dict[tuple, PreparedSampler] = {}
        self.shapes: dict[str, list[tuple]] = {"decoder": [], "flow head": []}  # compiled, in order

    def _admit(self, path: str, key: tuple) -> bool:
        """Whether `key` (a shape) may be compiled for `path`; logs each new compile."""
        seen = self.shapes[path]
        if key in seen:
            return True
        if len(seen) >= MAX_SHAPES:
            if len(seen) == MAX_SHAPES:
                logger.warning("%s: %d shapes compiled already; %s and later new shapes run eagerly",
                               path, MAX_SHAPES, key)
                seen.append(("eager from here",))
            return False
        seen.append(key)
        logger.info("compiling the %s for shape %s (%d of at most %d)", path, key, len(seen), MAX_SHAPES)
        return True

    def cache(self, model: NextStep, rows: int, max_len: int) -> tuple[KVCache, Tensor, tuple[Tensor, Tensor]]:
        """A KV cache of at least `max_len` slots for `rows` rows, with `key_valid` cleared (all slots
        masked out) and the RoPE tables of every slot. Kept across calls: same addresses, same shapes."""
        length = -(-max_len // CACHE_BUCKET) * CACHE_BUCKET
        length = min(length, max(model.config.max_position_embeddings, max_len))
        dtype = model.embed_tokens.weight.dtype
        key = (id(model), rows, length, dtype)
        if key not in self._caches:
            cache = KVCache(model.config, rows, length, self.device, dtype)
            key_valid = torch.zeros(rows, length, dtype=torch.bool, device=self.device)
            rope = rope_tables(torch.arange(length, device=self.device), model.config.head_dim,
                               model.config.rope_theta, dtype)
            if self.device.type == "cuda":  # mutated in place by the graphs: their addresses must not move
                for t in (cache.k, cache.v, key_valid, *rope):
                    torch._dynamo.mark_static_address(t)
            self._caches[key] = (cache, key_valid, rope)
        cache, key_valid, rope = self._caches[key]
        key_valid.zero_()
        return cache, key_valid, rope

    def decode(self, model: NextStep, embed: Tensor, pos: Tensor, key_valid: Tensor, cache: KVCache,
               rope: tuple[Tensor, Tensor]) -> Tensor:
        """`decode_one_token`, compiled (one graph per cache shape)."""
        from .autoregressive import decode_one_token  # (that module imports this one)

        if not self._admit("decoder", (tuple(cache.k.shape), embed.dtype)):
            return decode_one_token(model, embed, pos, key_valid, cache, rope)
        if self._decode is None:
            self._decode = torch.compile(decode_one_token, **self.options)
        # A CUDA graph's output is overwritten by its next replay: return a copy (rows x hidden).
        return self._decode(model, embed, pos, key_valid, cache, rope).clone()

    def sampler(self, model: NextStep, sampler: FlowSampler) -> PreparedSampler:
        """The prepared sampler of `sampler` (a fixed step count), compiled, kept across calls.

        Built under the caller's autocast state, which is part of the key: under autocast its weights
        are cast copies. It holds the head's weights as they are now (inference: they do not change)."""
        autocast_dtype = (torch.get_autocast_dtype(self.device.type)
                          if torch.is_autocast_enabled(self.device.type) else None)
        key = (id(model), sampler, autocast_dtype)
        if key not in self._samplers:
            prepared = sampler.prepare(model.image_head.net, self.device)
            if self.device.type == "cuda":
                for t in prepared.static_tensors():
                    torch._dynamo.mark_static_address(t)
            # Each (batch, groups) it meets is a graph of its own: all count against the head's bound.
            head = (sampler.kind, sampler.num_steps, autocast_dtype)
            prepared.compile(admit=lambda shape: self._admit("flow head", (*head, *shape)), **self.options)
            self._samplers[key] = prepared
        return self._samplers[key]
