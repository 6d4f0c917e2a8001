"""The decode step compiles as one graph: `torch.compile(fullgraph=True)`, no recompiles across positions."""

from __future__ import annotations

import torch

from nextstep import NextStep, NextStepConfig
from nextstep.model import KVCache
from nextstep.model.decoder import rope_tables
from nextstep.sampling.autoregressive import decode_one_token, prefill

from .conftest import assert_close

# GQA (2 query heads per KV head) and 2 layers, so the folded-query attention and per-layer cache writes are traced.
CONFIG = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, max_position_embeddings=256, fm_head_dim=16, fm_head_layers=1,
              base_image_grid_size=4, boi=60, eoi=61, image_placeholder_id=62, pad_token_id_added=59,
              bos_token_id=None, eos_token_id=None)
ROWS, PROMPT, STEPS = 2, 5, 4


def run(model: NextStep, step) -> tuple[torch.Tensor, KVCache, torch.Tensor]:
    """Prefill a prompt (row 0 left-padded), then STEPS decode steps through `step`."""
    cfg = model.config
    max_len = PROMPT + STEPS
    cache = KVCache(cfg, ROWS, max_len, "cpu", torch.float32)
    key_valid = torch.zeros(ROWS, max_len, dtype=torch.bool)
    key_valid[:, :PROMPT] = True
    key_valid[0, 0] = False
    rope = rope_tables(torch.arange(max_len), cfg.head_dim, cfg.rope_theta, torch.float32)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 50, (ROWS, PROMPT), generator=g)
    hidden = [prefill(model, model.embed(ids), key_valid, cache, rope)]
    slots = torch.arange(PROMPT, max_len)
    for k in range(STEPS):
        embed = torch.randn(ROWS, cfg.hidden_size, generator=g)
        hidden.append(step(model, embed, slots[k: k + 1], key_valid, cache, rope))
    return torch.stack(hidden), cache, key_valid


@torch.no_grad()
def test_decode_step_compiles_fullgraph_and_matches_eager() -> None:
    torch.manual_seed(0)
    model = NextStep(NextStepConfig(**CONFIG)).eval()
    want, want_cache, want_valid = run(model, decode_one_token)
    # aot_eager: Dynamo capture plus AOTAutograd functionalization of the in-place cache writes, which is
    # where graph breaks or lost mutations would show. Inductor's C++ build takes ~75 s cold on 2 cores.
    torch._dynamo.reset()
    compiled = torch.compile(decode_one_token, fullgraph=True, backend="aot_eager", dynamic=False)
    # One graph for every position: the slot is a tensor, so shapes never change.
    with torch._dynamo.config.patch(error_on_recompile=True):
        got, got_cache, got_valid = run(model, compiled)
    # Same kernels in the same order, so only float reassociation could differ: 1e-6 is ample for fp32 here.
    assert_close(got, want, atol=1e-6, what="hidden states")
    assert_close(got_cache.k, want_cache.k, atol=1e-6, what="cached keys")
    assert_close(got_cache.v, want_cache.v, atol=1e-6, what="cached values")
    assert torch.equal(got_valid, want_valid)
