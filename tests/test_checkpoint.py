"""Checkpoints: the full-size layout on meta, official names, save/load round trips, dtypes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from nextstep.config import NextStepConfig
from nextstep.io import load_model, save_model
from nextstep.io.checkpoint import INDEX, WEIGHTS
from nextstep.model import NextStep
from nextstep.pipeline import NextStepPipeline

CPU = torch.device("cpu")
SHARD = "model-{:05d}-of-{:05d}.safetensors"


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def safetensors_keys(path: Path) -> set[str]:
    with safe_open(str(path), framework="pt") as f:
        return set(f.keys())


@pytest.fixture(scope="module")
def model(ref10: Path) -> NextStep:
    return load_model(ref10 / "model", CPU, torch.float32)


# --------------------------------------------------------------------------- full size on meta

LARGE = dict(vocab_size=152064, hidden_size=5120, num_hidden_layers=48, num_attention_heads=40,
             num_key_value_heads=8, head_dim=128, intermediate_size=13824, fm_head_dim=1536, fm_head_layers=12)


@pytest.fixture(scope="module")
def large_on_meta() -> NextStep:
    with torch.device("meta"):
        return NextStep(NextStepConfig(**LARGE))


def test_default_config_is_nextstep1_large() -> None:
    config = NextStepConfig()
    for name, value in LARGE.items():
        assert getattr(config, name) == value, name
    assert (config.attention_bias, config.o_attention_bias, config.tie_word_embeddings) == (True, False, False)
    assert (config.boi, config.eoi, config.image_placeholder_id) == (151667, 151668, 151669)
    assert config.token_dim == 64


def test_full_size_parameter_counts(large_on_meta: NextStep) -> None:
    m = large_on_meta
    assert all(p.is_meta for p in m.parameters())
    assert n_params(m) == 14_953_814_080
    assert n_params(m.image_head) == 157_228_096
    assert n_params(m.embed_tokens) == 778_567_680
    assert n_params(m.lm_head) == 778_567_680
    assert len(m.layers) == 48
    assert {n_params(layer) for layer in m.layers} == {275_268_608}
    assert n_params(m.norm) == 5_120
    assert n_params(m.image_out_projector) == 26_219_520
    assert n_params(m.image_in_projector) == 332_800
    assert m.gen_pos_embed.numel() == 5_242_880
    # The README's backbone line: embed + layers + norm (+ lm_head).
    backbone = n_params(m.embed_tokens) + sum(n_params(layer) for layer in m.layers) + n_params(m.norm)
    assert backbone == 13_991_465_984
    assert backbone + n_params(m.lm_head) == 14_770_033_664


def test_full_size_with_tokenizer_vocab() -> None:
    with torch.device("meta"):
        m = NextStep(NextStepConfig(**{**LARGE, "vocab_size": 151674}))
    assert n_params(m) == 14_949_820_480


def test_full_size_defaults_build_the_same_model(large_on_meta: NextStep) -> None:
    with torch.device("meta"):
        m = NextStep(NextStepConfig())
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes == {k: tuple(v.shape) for k, v in large_on_meta.state_dict().items()}


def test_large_partial_config_parses(ref10: Path) -> None:
    d = json.loads((ref10 / "large-config.partial.json").read_text())
    d.pop("_note")
    config = NextStepConfig.from_dict(d, source="large-config.partial.json")
    assert (config.hidden_size, config.num_attention_heads, config.head_dim) == (5120, 40, 128)
    assert (config.fm_head_dim, config.fm_head_layers, config.latent_size) == (1536, 12, 64)
    # HF bookkeeping is kept for the round trip, not dropped.
    assert config.extra["architectures"] == ["LlamaForCausalLM"]
    assert config.extra["auto_map"]["AutoModel"] == "models/nextstep_model.NextStep"
    assert config.extra["max_window_layers"] == 48
    out = config.to_dict()
    assert {k: out[k] for k in d} == d


# --------------------------------------------------------------------------- official names


def test_state_dict_names_are_the_checkpoint_names(ref10: Path, model: NextStep) -> None:
    assert set(model.state_dict()) == safetensors_keys(ref10 / "model" / WEIGHTS)


def test_loaded_tensors_equal_the_file(ref10: Path, model: NextStep) -> None:
    sd = model.state_dict()
    with safe_open(str(ref10 / "model" / WEIGHTS), framework="pt") as f:
        for key in f.keys():
            assert torch.equal(sd[key], f.get_tensor(key)), key
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    assert not model.training


# --------------------------------------------------------------------------- round trips


def assert_same_state(a: NextStep, b: NextStep) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert torch.equal(sa[k], sb[k]), k


def state_bytes(model: NextStep) -> int:
    return sum(v.numel() * v.element_size() for v in model.state_dict().values())


def test_sharded_round_trip(model: NextStep, tmp_path: Path) -> None:
    out = tmp_path / "nested" / "sharded"
    save_model(model, out, max_shard_bytes=state_bytes(model) // 4)
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    n = len(shards)
    assert n >= 4
    assert shards == [SHARD.format(i, n) for i in range(1, n + 1)]
    assert not (out / WEIGHTS).exists()
    index = json.loads((out / INDEX).read_text())
    weight_map = index["weight_map"]
    assert set(weight_map) == set(model.state_dict())
    assert set(weight_map.values()) == set(shards)
    assert index["metadata"]["total_size"] == state_bytes(model)
    for name in shards:  # each shard holds exactly what the index says
        assert safetensors_keys(out / name) == {k for k, v in weight_map.items() if v == name}
    assert_same_state(model, load_model(out, CPU, torch.float32))


def test_unsharded_save_removes_stale_index_and_shards(model: NextStep, tmp_path: Path) -> None:
    out = tmp_path / "m"
    save_model(model, out, max_shard_bytes=state_bytes(model) // 3)
    assert (out / INDEX).is_file() and len(list(out.glob("model-*.safetensors"))) >= 3
    save_model(model, out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", WEIGHTS]
    assert_same_state(model, load_model(out, CPU, torch.float32))
    # Back to shards, then to fewer shards: the old layout's files go.
    save_model(model, out, max_shard_bytes=state_bytes(model) // 6)
    assert not (out / WEIGHTS).exists()
    save_model(model, out, max_shard_bytes=state_bytes(model) // 2)
    names = sorted(p.name for p in out.glob("model-*.safetensors"))
    n = len(names)
    assert names == [SHARD.format(i, n) for i in range(1, n + 1)]
    assert set(json.loads((out / INDEX).read_text())["weight_map"].values()) == set(names)
    assert not list(out.glob(".*.tmp"))  # no temp files left behind
    assert_same_state(model, load_model(out, CPU, torch.float32))


def test_config_round_trip_keeps_every_key(ref10: Path, model: NextStep, tmp_path: Path) -> None:
    save_model(model, tmp_path)
    original = json.loads((ref10 / "model" / "config.json").read_text())
    saved = json.loads((tmp_path / "config.json").read_text())
    assert {k: saved.get(k, "<missing>") for k in original} == original
    # Anything added is a NextStep field written at its default value.
    defaults = NextStepConfig().to_dict()
    added = {k: v for k, v in saved.items() if k not in original}
    assert added == {k: defaults[k] for k in added}
    assert NextStepConfig.from_pretrained(tmp_path) == model.config


def test_saved_config_records_the_weights_dtype(ref10: Path, tmp_path: Path) -> None:
    m = load_model(ref10 / "model", CPU, torch.bfloat16)
    save_model(m, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert m.config.extra["torch_dtype"] == "float32"  # the live config is not changed
    with safe_open(str(tmp_path / WEIGHTS), framework="pt") as f:
        assert f.get_tensor("norm.weight").dtype == torch.bfloat16


def test_load_in_bfloat16(ref10: Path, model: NextStep) -> None:
    m = load_model(ref10 / "model", CPU, torch.bfloat16)
    assert m.dtype == torch.bfloat16
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}
    assert m.gen_pos_embed.dtype == torch.bfloat16
    assert torch.equal(m.norm.weight, model.norm.weight.to(torch.bfloat16))


def test_missing_gen_pos_embed_is_rebuilt(ref10: Path, model: NextStep, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    sd = {k: v for k, v in model.state_dict().items() if k != "gen_pos_embed"}
    save_file(sd, str(tmp_path / WEIGHTS))
    (tmp_path / "config.json").write_text((ref10 / "model" / "config.json").read_text())
    m = load_model(tmp_path, CPU, torch.float32)
    torch.testing.assert_close(m.gen_pos_embed, model.gen_pos_embed, atol=1e-6, rtol=0)


def tiny_config(**kw) -> NextStepConfig:
    base = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, max_position_embeddings=256, fm_head_dim=16, fm_head_layers=1,
                base_image_grid_size=4, boi=60, eoi=61, image_placeholder_id=62, pad_token_id_added=59,
                bos_token_id=None, eos_token_id=None)
    return NextStepConfig(**{**base, **kw})


def test_tied_embeddings_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    m = NextStep(tiny_config(tie_word_embeddings=True)).eval()
    assert m.lm_head.weight is m.embed_tokens.weight
    save_model(m, tmp_path)
    assert "lm_head.weight" not in safetensors_keys(tmp_path / WEIGHTS)
    loaded = load_model(tmp_path, CPU, torch.float32)
    assert loaded.lm_head.weight is loaded.embed_tokens.weight
    assert_same_state(m, loaded)
    ids = torch.tensor([[1, 2, 3]])
    h = loaded.forward_hidden(ids)
    torch.testing.assert_close(loaded.lm_head(h), m.lm_head(m.forward_hidden(ids)))


# --------------------------------------------------------------------------- pipeline


def test_pipeline_save_and_reload_generates_the_same_image(ref10: Path, tmp_path: Path) -> None:
    pipe = NextStepPipeline.from_pretrained(ref10 / "model", ref10 / "vae", device="cpu", dtype=torch.float32)
    kw = dict(hw=(32, 64), cfg=1.0, num_sampling_steps=2, seed=7, progress=False)
    before = pipe.generate_image("A red fox in the snow", **kw)
    pipe.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["vae_name_or_path"] == "vae"
    for name in ("tokenizer.json", "tokenizer_config.json", WEIGHTS, "vae/config.json"):
        assert (tmp_path / name).is_file(), name
    reloaded = NextStepPipeline.from_pretrained(tmp_path, device="cpu", dtype=torch.float32)
    assert_same_state(pipe.model, reloaded.model)
    after = reloaded.generate_image("A red fox in the snow", **kw)
    assert len(after) == len(before) == 1
    assert after[0].size == before[0].size == (64, 32)
    assert np.array_equal(np.asarray(after[0]), np.asarray(before[0]))


def test_load_language_model_from_a_qwen_layout(tmp_path, ref10):
    """The decoder can start from a Qwen2-style checkpoint (`model.` prefix, its own vocabulary size)."""
    from safetensors.torch import save_file

    from nextstep.io.checkpoint import load_language_model

    source = load_model(ref10 / "model", CPU, torch.float32)
    qwen = {("" if k.startswith("lm_head") else "model.") + k: v.clone()
            for k, v in source.state_dict().items() if not k.startswith(("image_", "gen_pos"))}
    qwen["model.embed_tokens.weight"] = qwen["model.embed_tokens.weight"][:500]  # a smaller vocabulary
    folder = tmp_path / "qwen"
    folder.mkdir()
    save_file(qwen, str(folder / "model.safetensors"))

    target = NextStep(source.config)
    target.init_weights(generator=torch.Generator().manual_seed(0))
    head_before = target.image_head.net.input_proj.weight.clone()
    missing = load_language_model(target, folder)
    assert missing == []
    assert torch.equal(target.layers[1].mlp.up_proj.weight, source.layers[1].mlp.up_proj.weight)
    assert torch.equal(target.embed_tokens.weight[:500], source.embed_tokens.weight[:500])
    assert not torch.equal(target.embed_tokens.weight[500:], source.embed_tokens.weight[500:])
    assert torch.equal(target.image_head.net.input_proj.weight, head_before)
