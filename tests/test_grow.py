"""Block expansion (`nextstep.training.grow`): a deeper model that starts out computing what the trained one does."""

from __future__ import annotations

import pytest
import torch

from nextstep.io import load_model
from nextstep.pipeline import SHIPPED_MODEL
from nextstep.training.grow import grow, main


def test_grown_model_computes_the_same_and_its_new_layers_learn(tmp_path) -> None:
    out = tmp_path / "grown"
    assert main([str(SHIPPED_MODEL), str(out)]) == 0
    model = load_model(SHIPPED_MODEL, torch.device("cpu"), torch.float32)
    grown = load_model(out, torch.device("cpu"), torch.float32)
    n = model.config.num_hidden_layers
    assert grown.config.num_hidden_layers == len(grown.layers) == 2 * n
    assert (out / "vae").is_dir() and (out / "tokenizer.json").is_file()
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        torch.testing.assert_close(grown.forward_hidden(ids, mask), model.forward_hidden(ids, mask), rtol=0, atol=1e-6)
    # A new layer (odd index) adds nothing yet; its output projections get gradients at once, the
    # rest of it only once they have left zero.
    grown.forward_hidden(ids, mask).pow(2).mean().backward()
    new = grown.layers[1]
    assert not new.self_attn.o_proj.weight.any() and new.self_attn.o_proj.weight.grad.abs().sum() > 0
    assert new.mlp.down_proj.weight.grad.abs().sum() > 0
    assert not new.self_attn.q_proj.weight.grad.any() and not new.mlp.up_proj.weight.grad.any()
    assert grown.layers[0].mlp.up_proj.weight.grad.abs().sum() > 0  # the copied layers learn as before
    with pytest.raises(SystemExit):
        main([str(SHIPPED_MODEL), str(out)])  # an existing folder is never overwritten
    assert len(grow(model, every=3).layers) == n + n // 3
