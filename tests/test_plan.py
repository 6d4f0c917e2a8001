"""`nextstep plan`: the weight figures against really loaded (and really quantized) models, the
KV cache against a real cache, the full-size preset against the reference's parameter count."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from nextstep.cli import main
from nextstep.config import NextStepConfig
from nextstep.io import load_model
from nextstep.model import KVCache, NextStep
from nextstep.plan import CARDS_GB, CUDA_HEADROOM, GIB, parameter_bytes, plan_memory, preset
from nextstep.quantize import QUANTIZED_LINEARS, quantize_model, weight_bytes
from nextstep.vae.config import VAEConfig

from .conftest import REF10, REF11

CPU = torch.device("cpu")
FIXTURES = pytest.mark.parametrize("fixture", [REF10, REF11], ids=["1.0", "1.1"])
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])


def on_meta(fixture: Path) -> NextStep:
    with torch.device("meta"):
        return NextStep(NextStepConfig.from_pretrained(fixture / "model"))


@FIXTURES
@DTYPES
def test_weights_match_a_loaded_model(fixture: Path, dtype: torch.dtype) -> None:
    measured = weight_bytes(load_model(fixture / "model", CPU, dtype))
    assert parameter_bytes(on_meta(fixture), dtype) == measured


@FIXTURES
@DTYPES
def test_int8_weights_match_a_really_quantized_model(fixture: Path, dtype: torch.dtype) -> None:
    model = load_model(fixture / "model", CPU, dtype)
    quantize_model(model, "int8")  # the CPU's own int8 (no torchao): a float32 scale per row
    measured = weight_bytes(model)
    planned = parameter_bytes(on_meta(fixture), dtype, "int8", device_type="cpu")
    assert planned == measured
    assert planned["decoder_linears"] < parameter_bytes(on_meta(fixture), dtype)["decoder_linears"] / 1.5


@DTYPES
@pytest.mark.parametrize("mode, config", [("int8", "Int8WeightOnlyConfig"), ("fp8", "Float8WeightOnlyConfig")])
def test_gpu_weights_match_torchao(dtype: torch.dtype, mode: str, config: str) -> None:
    """On a GPU torchao stores int8 and fp8 (fp8 only on fp8 GPUs); its layouts are the same on any
    device, so quantize with it directly here and compare with the plan for CUDA."""
    q = pytest.importorskip("torchao.quantization")
    model = load_model(REF10 / "model", CPU, dtype)
    for layer in model.layers:
        for name in QUANTIZED_LINEARS:
            q.quantize_(layer.get_submodule(name), getattr(q, config)(set_inductor_config=False))
    assert parameter_bytes(on_meta(REF10), dtype, mode) == weight_bytes(model)


def test_kv_cache_matches_a_real_cache() -> None:
    config = NextStepConfig.from_pretrained(REF11 / "model")
    plan = plan_memory(config, VAEConfig.from_dict({}, config.family), height=64, width=32, batch=3, cfg=3.0,
                       steps=4, dtype=torch.float32, prompt_tokens=20)
    s = plan.settings
    assert (s["guidance_rows"], s["image_tokens"], s["cache_slots"]) == (6, 8, 27)  # VAE f8 x patch 2: 16 px
    cache = KVCache(config, s["guidance_rows"], s["cache_slots"], CPU, torch.float32)
    assert plan.kv_cache_bytes == cache.k.nbytes + cache.v.nbytes
    no_cfg = plan_memory(config, VAEConfig(), height=64, width=32, batch=3, cfg=1.0, steps=4, prompt_tokens=20)
    assert no_cfg.settings["guidance_rows"] == 3


def test_full_size_preset_has_the_reference_parameter_count() -> None:
    """The fixture README counts NextStep-1-Large on the reference's own classes: 14,953,814,080
    parameters and a 5,242,880-value gen_pos_embed buffer."""
    config = preset("NextStep-1-Large")
    assert preset("nextstep-1-large-edit") == config and preset("NextStep-9") is None
    plan = plan_memory(config, VAEConfig(), height=512, width=512, batch=1, cfg=7.5, steps=28)
    assert plan.weights["total"] - plan.weights["vae"] == 2 * (14_953_814_080 + 5_242_880)
    assert plan.weights["flow_head"] == 2 * 157_228_096
    assert plan.weights["vae"] == 4 * 83_819_683  # the default (f8ch16) VAE, in float32
    assert plan.peak_bytes == max(plan.phases.values()) == plan.phases[plan.peak_phase]
    assert plan.fits == [c for c in CARDS_GB if plan.peak_bytes + CUDA_HEADROOM <= c * GIB]
    # Twice the batch: a cache twice the size (rows double), weights unchanged.
    double = plan_memory(config, VAEConfig(), height=512, width=512, batch=2, cfg=7.5, steps=28)
    assert double.kv_cache_bytes == 2 * plan.kv_cache_bytes and double.weights == plan.weights


def plan_json(capsys: pytest.CaptureFixture, *args: str) -> dict:
    assert main(["plan", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_cli_quantized_large_fits_16_and_24_gb_cards(capsys: pytest.CaptureFixture) -> None:
    base = ["--model", "NextStep-1-Large", "--size", "512", "--batch", "1", "--cfg", "7.5"]
    bf16, int8, int4 = (plan_json(capsys, *base, *q) for q in ([], ["--quantize", "int8"], ["--quantize", "int4"]))
    assert bf16["peak_bytes"] > int8["peak_bytes"] > int4["peak_bytes"]
    assert int4["peak_bytes"] + int4["headroom_bytes"] <= 16 * GIB and 16 in int4["fits_gb"]
    assert int8["peak_bytes"] + int8["headroom_bytes"] <= 24 * GIB and 24 in int8["fits_gb"]
    assert 24 not in bf16["fits_gb"] and 40 in bf16["fits_gb"]
    # The text form says the same.
    assert main(["plan", *base, "--quantize", "int4"]) == 0
    text = capsys.readouterr().out
    assert f"peak: {int4['peak_bytes'] / GIB:.2f} GiB" in text and "16 GB" in text


def test_cli_reads_folders_and_config_files(capsys: pytest.CaptureFixture) -> None:
    folder = plan_json(capsys, "--model", str(REF10 / "model"), "--size", "64", "--dtype", "float32")
    file = plan_json(capsys, "--model", str(REF10 / "model" / "config.json"), "--size", "64", "--dtype", "float32")
    measured = weight_bytes(load_model(REF10 / "model", CPU, torch.float32))
    assert {k: folder["weights"][k] for k in measured if k != "total"} == {k: v for k, v in measured.items()
                                                                           if k != "total"}
    assert folder == {**file, "model": folder["model"]}


def test_cli_bad_input(capsys: pytest.CaptureFixture) -> None:
    assert main(["plan", "--model", "no-such-model"]) == 2
    assert "no-such-model" in capsys.readouterr().err
    assert main(["plan", "--model", "NextStep-1-Large", "--size", "500"]) == 2
    assert "multiples of 16" in capsys.readouterr().err
    assert main(["plan", "--model", "NextStep-1-Large", "--quantize", "int4", "--dtype", "float32"]) == 2
    assert "int4 needs bfloat16" in capsys.readouterr().err
    assert main(["plan", "--model", str(REF10 / "model"), "--quantize", "int4", "--size", "64"]) == 2
    assert "divisible by 128" in capsys.readouterr().err
