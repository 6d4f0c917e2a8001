"""The VAE against the reference fixtures, plus loading/saving and bad-input behaviour."""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from nextstep.errors import CheckpointError
from nextstep.vae import AutoencoderKL, DiagonalGaussian, VAEConfig

TOL = dict(atol=1e-5, rtol=1e-5)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    assert actual.shape == expected.shape, name
    diff = (actual - expected).abs().max().item()
    assert torch.allclose(actual, expected, **TOL), f"{name}: max abs diff {diff:.3g}"


@pytest.fixture(scope="module")
def vae(ref10: Path) -> AutoencoderKL:
    return AutoencoderKL.from_pretrained(ref10 / "vae")


@pytest.fixture()
def vae_copy(ref10: Path, tmp_path: Path) -> Path:
    """A writable copy of the tiny VAE folder."""
    dst = tmp_path / "vae"
    shutil.copytree(ref10 / "vae", dst)
    return dst


# --------------------------------------------------------------------------- parity


def test_vae_encode(vae: AutoencoderKL, expected10: dict) -> None:
    exp = {k.split("/", 1)[1]: v for k, v in expected10.items() if k.startswith("vae_encode/")}
    image = exp["image"]
    cfg = vae.config
    with torch.no_grad():
        assert_close(vae.encoder(image), exp["moments"], "moments")
        post = vae.encode(image)
        sample = post.sample(torch.Generator().manual_seed(0))
        latents = vae.to_latents(image, generator=torch.Generator().manual_seed(0))
        mode_scaled = vae.to_latents(image, sample=False)
    assert_close(post.mean, exp["mean"], "mean")
    assert_close(post.logvar, exp["logvar"], "logvar")
    assert_close(post.std, exp["std"], "std")
    assert_close(sample, exp["sample"], "sample")
    assert_close((sample - cfg.shift_factor) * cfg.scaling_factor, exp["latents_pipeline"], "latents_pipeline")
    assert_close(latents, exp["latents_pipeline"], "to_latents")
    assert_close(mode_scaled, exp["latents_mode_scaled"], "latents_mode_scaled")


def test_sample_uses_global_rng_like_reference(vae: AutoencoderKL, expected10: dict) -> None:
    with torch.no_grad():
        post = vae.encode(expected10["vae_encode/image"])
    torch.manual_seed(0)
    assert_close(post.sample(), expected10["vae_encode/sample"], "sample (global RNG)")


def test_deterministic_still_draws() -> None:
    post = DiagonalGaussian(torch.ones(1, 2, 2, 2), torch.zeros(1, 2, 2, 2), deterministic=True)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(post.sample(g), post.mean)
    # The RNG advanced by exactly one draw of mean's shape.
    ref = torch.Generator().manual_seed(0)
    torch.randn(post.mean.shape, generator=ref)
    assert torch.equal(torch.randn(3, generator=g), torch.randn(3, generator=ref))


def test_vae_encode_norm_variants(ref10: Path, expected10: dict) -> None:
    vae = AutoencoderKL.from_pretrained(ref10 / "vae")  # own instance: the config is switched below
    image = expected10["vae_encode_norm_variants/image"]
    with torch.no_grad():
        vae.config.encoder_norm = False
        mean_raw = vae.encode(image).mean
        vae.config.encoder_norm, vae.config.psz = True, None
        mean_ln = vae.encode(image).mean
    assert_close(mean_raw, expected10["vae_encode_norm_variants/mean_raw"], "mean_raw")
    assert_close(mean_ln, expected10["vae_encode_norm_variants/mean_encoder_norm_psz_none"], "psz None")


def test_vae_decode(vae: AutoencoderKL, expected10: dict) -> None:
    z = expected10["vae_decode/z"]
    with torch.no_grad():
        assert_close(vae.decode(z), expected10["vae_decode/decoded"], "decoded")
        latents = (z - vae.config.shift_factor) * vae.config.scaling_factor
        assert_close(vae.from_latents(latents), expected10["vae_decode/decoded"], "from_latents")


# --------------------------------------------------------------------------- config / save / load


def test_full_size_parameter_count() -> None:
    with torch.device("meta"):
        model = AutoencoderKL(VAEConfig())
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert (count(model), count(model.encoder), count(model.decoder)) == (83_819_683, 34_274_208, 49_545_475)
    assert model.down_factor == 8


def test_channel_change_shapes() -> None:
    # ch_mult with a change in width exercises the 1x1 nin_shortcut the tiny fixture lacks.
    torch.manual_seed(0)
    model = AutoencoderKL(VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4))
    assert "encoder.down.1.block.0.nin_shortcut.weight" in model.state_dict()
    assert "decoder.up.0.block.0.nin_shortcut.weight" in model.state_dict()
    with torch.no_grad():
        post = model.encode(torch.rand(1, 3, 16, 16) * 2 - 1)
        assert post.mean.shape == (1, 4, 8, 8)
        assert model.decode(post.mode()).shape == (1, 3, 16, 16)


def test_config_round_trip_and_unknown_keys() -> None:
    cfg = VAEConfig(ch_mult=[1, 1], psz=2)
    assert cfg.ch_mult == (1, 1)
    assert VAEConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.warns(UserWarning, match="mystery_key"):
        assert VAEConfig.from_dict({**cfg.to_dict(), "mystery_key": 1}) == cfg


def test_save_pretrained_round_trip(vae: AutoencoderKL, expected10: dict, tmp_path: Path) -> None:
    out = tmp_path / "saved"
    vae.save_pretrained(out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]  # no temp leftovers
    loaded = AutoencoderKL.from_pretrained(out)
    assert loaded.config == vae.config
    z, image = expected10["vae_decode/z"], expected10["vae_encode/image"]
    with torch.no_grad():
        assert torch.equal(loaded.decode(z), vae.decode(z))
        assert torch.equal(loaded.encode(image).mean, vae.encode(image).mean)
    # Overwriting in place works and still leaves no temp files.
    loaded.save_pretrained(out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]


def test_safetensors_preferred_over_pickle(vae: AutoencoderKL, vae_copy: Path) -> None:
    vae.save_pretrained(vae_copy)
    (vae_copy / "checkpoint.pt").write_bytes(b"garbage")  # would fail if it were read
    AutoencoderKL.from_pretrained(vae_copy)


def test_from_pretrained_dtype(ref10: Path) -> None:
    model = AutoencoderKL.from_pretrained(ref10 / "vae", dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not any(p.is_meta for p in model.parameters())


# --------------------------------------------------------------------------- bad input


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="nope"):
        AutoencoderKL.from_pretrained(tmp_path / "nope")


def test_missing_config(vae_copy: Path) -> None:
    (vae_copy / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        AutoencoderKL.from_pretrained(vae_copy)


def test_missing_weights(vae_copy: Path) -> None:
    (vae_copy / "checkpoint.pt").unlink()
    with pytest.raises(CheckpointError, match="checkpoint.pt"):
        AutoencoderKL.from_pretrained(vae_copy)


def test_truncated_checkpoint(vae_copy: Path) -> None:
    path = vae_copy / "checkpoint.pt"
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="checkpoint.pt"):
        AutoencoderKL.from_pretrained(vae_copy)


def test_truncated_safetensors(vae: AutoencoderKL, vae_copy: Path) -> None:
    vae.save_pretrained(vae_copy)
    path = vae_copy / "model.safetensors"
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        AutoencoderKL.from_pretrained(vae_copy)


def test_wrong_key(vae_copy: Path) -> None:
    path = vae_copy / "checkpoint.pt"
    sd = torch.load(path, weights_only=True)
    sd["encoder.conv_in.wieght"] = sd.pop("encoder.conv_in.weight")
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match="checkpoint.pt") as info:
        AutoencoderKL.from_pretrained(vae_copy)
    assert "encoder.conv_in.weight" in str(info.value) and "encoder.conv_in.wieght" in str(info.value)


def test_wrong_shape(vae_copy: Path) -> None:
    cfg_path = vae_copy / "config.json"
    cfg_path.write_text(cfg_path.read_text().replace('"z_channels": 16', '"z_channels": 8'))
    with pytest.raises(CheckpointError, match="shape mismatch") as info:
        AutoencoderKL.from_pretrained(vae_copy)
    assert "checkpoint.pt" in str(info.value)


def test_non_tensor_pickle(vae_copy: Path) -> None:
    torch.save({"encoder.conv_in.weight": 3}, vae_copy / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="checkpoint.pt"):
        AutoencoderKL.from_pretrained(vae_copy)


class _Exploit:
    """Unpickling this runs a shell command (what weights_only=True must refuse)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_malicious_pickle_is_not_executed(vae_copy: Path, tmp_path: Path, writer: str) -> None:
    marker = tmp_path / "pwned"
    payload = {"encoder.conv_in.weight": _Exploit(marker)}
    if writer == "pickle":  # legacy (non-zip) format
        (vae_copy / "checkpoint.pt").write_bytes(pickle.dumps(payload, protocol=2))
    else:
        torch.save(payload, vae_copy / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="checkpoint.pt"):
        AutoencoderKL.from_pretrained(vae_copy)
    assert not marker.exists()


def _to_diffusers_layout(sd: dict, n_levels: int) -> dict:
    """The renaming NextStep-1.1's VAE wrapper applies (fixture README), written out independently."""
    import re as _re

    out = {}
    for k, v in sd.items():
        k = _re.sub(r"^decoder\.up\.(\d+)\.", lambda m: f"decoder.up_blocks.{n_levels - 1 - int(m.group(1))}.", k)
        for a, b in [(".nin_shortcut.", ".conv_shortcut."), (".norm_out.", ".conv_norm_out."),
                     (".down.", ".down_blocks."), (".block.", ".resnets."), (".downsample.", ".downsamplers.0."),
                     (".mid.block_1.", ".mid_block.resnets.0."), (".mid.block_2.", ".mid_block.resnets.1."),
                     (".mid.attn_1.norm.", ".mid_block.attentions.0.group_norm."),
                     (".mid.attn_1.q.", ".mid_block.attentions.0.to_q."),
                     (".mid.attn_1.k.", ".mid_block.attentions.0.to_k."),
                     (".mid.attn_1.v.", ".mid_block.attentions.0.to_v."),
                     (".mid.attn_1.proj_out.", ".mid_block.attentions.0.to_out.0."),
                     (".upsample.", ".upsamplers.0.")]:
            k = k.replace(a, b)
        if ".attentions.0." in k and k.endswith(".weight") and v.dim() == 4:
            v = v[:, :, 0, 0]
        out[k] = v.contiguous()
    return out


def test_loads_diffusers_layout(ref10, tmp_path):
    """A VAE saved under diffusers' names (as NextStep-1.1's wrapper holds it) loads to the same model."""
    from safetensors.torch import save_file

    original = AutoencoderKL.from_pretrained(ref10 / "vae")
    sd = torch.load(ref10 / "vae" / "checkpoint.pt", map_location="cpu", weights_only=True)
    folder = tmp_path / "diffusers_vae"
    folder.mkdir()
    shutil.copy(ref10 / "vae" / "config.json", folder / "config.json")
    renamed = _to_diffusers_layout(sd, len(original.config.ch_mult))
    assert "decoder.up_blocks.0.upsamplers.0.conv.weight" in renamed  # the lowest resolution level
    save_file(renamed, str(folder / "diffusion_pytorch_model.safetensors"))
    loaded = AutoencoderKL.from_pretrained(folder)
    for key, value in original.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
