"""Bad input gets a clear error that names the problem (type and message), and the reference's
documented crashes now work."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from nextstep.config import NextStepConfig
from nextstep.errors import CheckpointError, ConfigError
from nextstep.io import load_model
from nextstep.io.checkpoint import INDEX, WEIGHTS
from nextstep.pipeline import NextStepPipeline

CPU = torch.device("cpu")


# --------------------------------------------------------------------------- loaders


@pytest.fixture()
def model_dir(ref10: Path, tmp_path: Path) -> Path:
    """A writable copy of the fixture's config.json and weights (the fixture is read-only)."""
    dst = tmp_path / "model"
    dst.mkdir()
    for name in ("config.json", WEIGHTS):
        shutil.copyfile(ref10 / "model" / name, dst / name)
    return dst


def load(folder: Path):
    return load_model(folder, CPU, torch.float32)


def edit_config(folder: Path, **changes) -> None:
    d = json.loads((folder / "config.json").read_text())
    d.update(changes)
    (folder / "config.json").write_text(json.dumps(d))


def edit_weights(folder: Path, edit) -> None:
    sd = load_file(str(folder / WEIGHTS))
    edit(sd)
    (folder / WEIGHTS).unlink()
    save_file(sd, str(folder / WEIGHTS))


def test_copy_loads(model_dir: Path) -> None:
    assert load(model_dir).config.hidden_size == 64


def test_missing_model_folder(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="model folder not found.*nowhere"):
        load(tmp_path / "nowhere")


def test_missing_config(model_dir: Path) -> None:
    (model_dir / "config.json").unlink()
    with pytest.raises(ConfigError, match="no config.json"):
        load(model_dir)


def test_config_not_json(model_dir: Path) -> None:
    (model_dir / "config.json").write_text('{"hidden_size": 64,')
    with pytest.raises(ConfigError, match="config.json: not valid JSON"):
        load(model_dir)


def test_config_not_an_object(model_dir: Path) -> None:
    (model_dir / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="must be a JSON object, got list"):
        load(model_dir)


def test_unknown_model_type(model_dir: Path) -> None:
    edit_config(model_dir, model_type="llama")
    with pytest.raises(ConfigError, match="unknown model_type 'llama'"):
        load(model_dir)


def test_unknown_config_field_with_strict_config(model_dir: Path) -> None:
    edit_config(model_dir, frobnicate_heads=3)
    with pytest.raises(ConfigError, match=r"not understood.*frobnicate_heads"):
        load_model(model_dir, CPU, torch.float32, strict_config=True)


def test_config_field_of_wrong_type(model_dir: Path) -> None:
    edit_config(model_dir, hidden_size="64")
    with pytest.raises(ConfigError, match=r"wrong type.*hidden_size='64'"):
        load(model_dir)


@pytest.mark.parametrize("changes, fragment", [
    (dict(num_key_value_heads=0), "num_key_value_heads=0"),
    (dict(num_key_value_heads=3), "multiple of num_key_value_heads"),
    (dict(hidden_act="gelu"), "hidden_act='gelu'"),
    (dict(rope_scaling={"type": "linear", "factor": 2.0}), "rope_scaling"),
    (dict(use_sliding_window=True), "use_sliding_window"),
    (dict(image_placeholder_id=576), "image_placeholder_id=576 is outside the vocabulary"),
    (dict(head_dim=15), "even head_dim"),
])
def test_unsupported_config_values(model_dir: Path, changes: dict, fragment: str) -> None:
    edit_config(model_dir, **changes)
    with pytest.raises(ConfigError, match="unsupported values") as e:
        load(model_dir)
    assert fragment in str(e.value)


def test_config_bookkeeping_kept_and_newer_keys_accepted(ref10: Path) -> None:
    d = json.loads((ref10 / "model" / "config.json").read_text())
    d.update(dtype="float32", layer_types=["full_attention"] * 2)
    config = NextStepConfig.from_dict(d)
    assert config.extra["layer_types"] == ["full_attention"] * 2
    with pytest.raises(ConfigError, match="layer_types"):
        NextStepConfig.from_dict({**d, "layer_types": ["sliding_attention"] * 2})


def test_missing_weights(model_dir: Path) -> None:
    (model_dir / WEIGHTS).unlink()
    with pytest.raises(CheckpointError, match=f"no {WEIGHTS} or {INDEX}"):
        load(model_dir)


@pytest.mark.parametrize("keep", [0.5, 0.001])
def test_truncated_weights(model_dir: Path, keep: float) -> None:
    data = (model_dir / WEIGHTS).read_bytes()
    (model_dir / WEIGHTS).write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CheckpointError, match=f"{WEIGHTS}: cannot read safetensors file"):
        load(model_dir)


def test_index_lists_missing_shard(model_dir: Path) -> None:
    sd = load_file(str(model_dir / WEIGHTS))
    (model_dir / WEIGHTS).unlink()
    keys = sorted(sd)
    save_file({k: sd[k] for k in keys[:10]}, str(model_dir / "model-00001-of-00002.safetensors"))
    weight_map = {k: f"model-0000{1 if i < 10 else 2}-of-00002.safetensors" for i, k in enumerate(keys)}
    (model_dir / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    with pytest.raises(CheckpointError, match=r"model-00002-of-00002\.safetensors: shard listed in .* is missing"):
        load(model_dir)


@pytest.mark.parametrize("text", ['{"weight_map": ["a"]}', '{"metadata": {}}', "not json", "[]"])
def test_malformed_index(model_dir: Path, text: str) -> None:
    (model_dir / INDEX).write_text(text)
    with pytest.raises(CheckpointError, match=INDEX.replace(".", r"\.")):
        load(model_dir)


def test_tensor_in_two_shards(model_dir: Path) -> None:
    sd = load_file(str(model_dir / WEIGHTS))
    (model_dir / WEIGHTS).unlink()
    a, b = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    save_file(sd, str(model_dir / a))
    save_file({"norm.weight": sd["norm.weight"]}, str(model_dir / b))
    weight_map = {k: a for k in sd} | {"norm.weight": b}
    (model_dir / INDEX).write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match="'norm.weight' appears in more than one shard"):
        load(model_dir)


def test_tensor_of_wrong_shape(model_dir: Path) -> None:
    def edit(sd):
        sd["layers.1.self_attn.k_proj.weight"] = torch.zeros(16, 64)
    edit_weights(model_dir, edit)
    with pytest.raises(CheckpointError, match=r"'layers.1.self_attn.k_proj.weight' has shape \(16, 64\), "
                                              r"the config expects \(32, 64\)"):
        load(model_dir)


def test_checkpoint_lacks_a_tensor(model_dir: Path) -> None:
    edit_weights(model_dir, lambda sd: sd.pop("image_head.net.final_layer.linear.bias"))
    with pytest.raises(CheckpointError, match=r"lacks 1 tensors.*image_head\.net\.final_layer\.linear\.bias"):
        load(model_dir)


@pytest.mark.parametrize("key", ["layers.7.mlp.up_proj.weight", "norm.bias", "model.embed_tokens.weight"])
def test_unexpected_extra_tensor(model_dir: Path, key: str) -> None:
    edit_weights(model_dir, lambda sd: sd.__setitem__(key, torch.zeros(4)))
    with pytest.raises(CheckpointError, match=f"unexpected tensor '{key}'"):
        load(model_dir)


def test_config_shape_mismatch_names_the_tensor(model_dir: Path) -> None:
    edit_config(model_dir, intermediate_size=96)
    with pytest.raises(CheckpointError, match=r"mlp\.\w+_proj\.weight' has shape"):
        load(model_dir)


# --------------------------------------------------------------------------- pipeline


@pytest.fixture(scope="module")
def pipe(ref10: Path) -> NextStepPipeline:
    return NextStepPipeline.from_pretrained(ref10 / "model", ref10 / "vae", device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def source(ref10: Path) -> Image.Image:
    return Image.open(ref10 / "png" / "input_edit_image.png").convert("RGB").resize((32, 32))


def gen(pipe: NextStepPipeline, captions="A red fox", **kw):
    kw = {"hw": (32, 32), "num_sampling_steps": 2, "progress": False, **kw}
    return pipe.generate_image(captions, **kw)


@pytest.mark.parametrize("kw, fragment", [
    (dict(hw=(40, 40)), "hw=(40, 40): height and width must be positive integer multiples of 16"),
    (dict(hw=(32, 24)), "multiples of 16"),
    (dict(hw=(0, 32)), "hw=(0, 32) (must be (height, width), positive integers)"),
    (dict(hw=(32,)), "hw=(32,)"),
    (dict(cfg=0.5), "cfg=0.5"),
    (dict(cfg_img=2.0), "cfg_img guides by a source image"),
    (dict(num_sampling_steps=0), "num_sampling_steps=0 (must be an integer >= 1)"),
    (dict(num_sampling_steps=1), "num_sampling_steps must be an integer >= 2 for the euler_maruyama sampler, got 1"),
    (dict(num_sampling_steps=0, sde_type="ode"), "num_sampling_steps=0 (must be an integer >= 1)"),
    (dict(cfg_schedule="cosine"), "cfg_schedule='cosine' (must be one of"),
    (dict(sde_type="heun"), "sampler='heun' (must be one of"),
    (dict(num_images_per_caption=0), "images per caption must be an integer >= 1, got 0"),
    (dict(timesteps_shift=0.0), "timesteps_shift=0.0 (must be a number > 0)"),
    (dict(captions=[]), "captions is empty"),
    (dict(captions="<image> a fox"), "contains <image> but no images were given"),
])
def test_pipeline_rejects(pipe: NextStepPipeline, kw: dict, fragment: str) -> None:
    with pytest.raises(ValueError) as e:
        gen(pipe, **kw)
    assert fragment in str(e.value)


def test_pipeline_rejects_non_string_captions(pipe: NextStepPipeline) -> None:
    with pytest.raises(TypeError, match="captions must be strings"):
        gen(pipe, captions=["a fox", 3])


@pytest.mark.parametrize("captions, n_images, fragment", [
    ("A fox, no tag", 1, "exactly one <image> (counts: [0])"),
    ("<image> and <image>", 1, "exactly one <image> (counts: [2])"),
    ("<image> a fox", 2, "2 images for 1 captions"),
    (["<image> a", "<image> b"], 1, "1 images for 2 captions"),
])
def test_pipeline_image_count_mismatch(pipe, source, captions, n_images: int, fragment: str) -> None:
    with pytest.raises(ValueError) as e:
        gen(pipe, captions, images=[source] * n_images)
    assert fragment in str(e.value)


def test_pipeline_source_image_size(pipe: NextStepPipeline, source: Image.Image) -> None:
    with pytest.raises(ValueError, match="source image of size 40x24: width and height must be multiples of 16"):
        gen(pipe, "<image> a fox", images=source.resize((40, 24)))


def test_pipeline_source_image_type(pipe: NextStepPipeline) -> None:
    with pytest.raises(TypeError, match="images must be PIL images, got ndarray"):
        gen(pipe, "<image> a fox", images=[np.zeros((32, 32, 3), np.uint8)])


def test_ode_sampler_with_one_step(pipe: NextStepPipeline) -> None:
    (image,) = gen(pipe, num_sampling_steps=1, sde_type="ode")
    assert image.size == (32, 32) and image.mode == "RGB"
    assert np.asarray(image).std() > 0  # an image, not a constant


# --------------------------------------------------------------------------- reference crashes that now work


def test_edit_with_cfg1_and_cfg_img2(pipe: NextStepPipeline, source: Image.Image) -> None:
    kw = dict(images=source, cfg=1.0, num_images_per_caption=2)
    guided = gen(pipe, "<image> add a hat", cfg_img=2.0, **kw)
    plain = gen(pipe, "<image> add a hat", cfg_img=1.0, **kw)
    assert len(guided) == 2 and all(im.size == (32, 32) for im in guided)
    # Image guidance changes the result (same seed, same noise).
    assert not np.array_equal(np.asarray(guided[0]), np.asarray(plain[0]))


@pytest.mark.parametrize("hw", [(32, 64), (64, 32)])
def test_non_square_t2i(pipe: NextStepPipeline, hw: tuple[int, int]) -> None:
    images = gen(pipe, hw=hw, cfg=2.0)
    assert len(images) == 1
    assert images[0].size == (hw[1], hw[0])  # PIL size is (width, height)


def test_two_captions_two_images_each(pipe: NextStepPipeline) -> None:
    caps = ["A red fox in the snow", "A tiny robot on the moon"]
    both = gen(pipe, caps, num_images_per_caption=2, cfg=1.0)
    assert len(both) == 4 and all(im.size == (32, 32) for im in both)
    # Caption-major order: the first two are the first caption's, as when it is generated alone.
    alone = gen(pipe, caps[0], num_images_per_caption=2, cfg=1.0)
    for a, b in zip(alone, both[:2]):
        assert np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max() <= 2
    assert not np.array_equal(np.asarray(both[0]), np.asarray(both[2]))


# --------------------------------------------------------------------------- known gaps (pipeline.py)


def test_float_hw_is_rejected(pipe: NextStepPipeline) -> None:
    with pytest.raises(ValueError, match=r"hw=\(32.0, 32.0\) \(must be \(height, width\), positive integers\)"):
        gen(pipe, hw=(32.0, 32.0))


def test_nan_cfg_is_rejected(pipe: NextStepPipeline) -> None:
    with pytest.raises(ValueError, match="cfg"):
        gen(pipe, cfg=float("nan"))


def test_float_num_sampling_steps_is_rejected(pipe: NextStepPipeline) -> None:
    with pytest.raises(ValueError, match="num_sampling_steps"):
        gen(pipe, num_sampling_steps=2.5)


def test_save_pretrained_leaves_live_config_alone(pipe: NextStepPipeline, tmp_path) -> None:
    before = pipe.model.config.vae_name_or_path
    pipe.save_pretrained(tmp_path / "saved")
    assert pipe.model.config.vae_name_or_path == before
    assert '"vae_name_or_path": "vae"' in (tmp_path / "saved" / "config.json").read_text()
