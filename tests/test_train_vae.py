"""VAE tokenizer training: the loss falls, resume is exact, the export is normalised, bad configs fail early."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import nextstep.training.vae as vae_training
from nextstep.cli import main
from nextstep.errors import ConfigError
from nextstep.shapes.dataset import ShapesDataset
from nextstep.training.blend import check_same_latents
from nextstep.training.config_file import to_dict
from nextstep.training.vae import train_vae
from nextstep.training.vae_config import RENAMED, DataConfig, VAETrainConfig, resume_conflicts
from nextstep.vae import AutoencoderKL

# encoder_norm is off on purpose: the raw posterior means are then far from unit scale,
# so mean ~0 / std ~1 after export can only come from the stored factors.
TINY_TOML = """
out_dir = "{out_dir}"
steps = 30
heldout = 32
threads = 1

[optim]
lr = 5e-3
warmup_steps = 5
min_lr_ratio = 1.0

[train]
checkpoint_every = 10
keep_last = 2

[vae]
ch = 32
ch_mult = [1, 1, 1, 1]
num_res_blocks = 1
z_channels = 16

[data]
source = "shapes"
image_size = 32
batch_size = 8

[loss]
l1 = 1.0
mse = 0.0
kl = 1e-6
noise_max = 0.3
"""


def write_config(tmp: Path, out_dir: Path, extra: str = "", name: str = "vae.toml") -> Path:
    path = tmp / name
    path.write_text(extra + TINY_TOML.format(out_dir=out_dir))
    return path


def load(tmp: Path, out_dir: Path) -> VAETrainConfig:
    return VAETrainConfig.from_file(write_config(tmp, out_dir))


def metrics(out_dir: Path) -> list[dict]:
    """metrics.jsonl without the timing field (the one value that may differ between runs)."""
    lines = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    for line in lines:
        del line["samples_per_s"]
    return lines


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted 30-step run."""
    tmp = tmp_path_factory.mktemp("full")
    train_vae(load(tmp, tmp / "run"), progress=False)
    return tmp / "run"


def test_reconstruction_loss_falls(full_run: Path) -> None:
    lines = json.loads("[" + ",".join((full_run / "metrics.jsonl").read_text().splitlines()) + "]")
    assert [m["step"] for m in lines] == list(range(1, 31))
    assert set(lines[0]) == {"step", "loss", "rec_loss", "kl_loss", "anchor_loss", "lr", "grad_norm", "samples_per_s"}
    assert lines[0]["lr"] == pytest.approx(5e-3 / 5) and lines[4]["lr"] == pytest.approx(5e-3)
    first = np.mean([m["rec_loss"] for m in lines[:5]])
    last = np.mean([m["rec_loss"] for m in lines[-5:]])
    assert last < 0.75 * first, f"reconstruction loss fell only from {first:.4f} (steps 1-5) to {last:.4f} (26-30)"
    report = json.loads((full_run / "report.json").read_text())
    assert report["step"] == 30 and report["heldout_images"] == 32
    assert 10 < report["psnr_db"] < 60, report
    # keep_last = 2: the step-10 checkpoint was dropped.
    assert sorted(p.name for p in (full_run / "checkpoints").iterdir()) == ["step_00000020", "step_00000030"]


def test_resume_after_interruption_is_bit_identical(full_run: Path, tmp_path: Path) -> None:
    config = load(tmp_path, tmp_path / "run")

    def interrupt(step: int, line: dict) -> None:
        if step == 25:  # past the step-20 checkpoint: steps 21-25 must be redone and their lines replaced
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_vae(config, progress=False, on_step=interrupt)
    assert len(metrics(tmp_path / "run")) == 25
    assert not (tmp_path / "run" / "export").exists()

    train_vae(config, resume=True, progress=False)
    assert metrics(tmp_path / "run") == metrics(full_run)
    a = AutoencoderKL.from_pretrained(full_run / "export").state_dict()
    b = AutoencoderKL.from_pretrained(tmp_path / "run" / "export").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "run" / "report.json").read_text())["scaling_factor"] == \
        json.loads((full_run / "report.json").read_text())["scaling_factor"]


def test_export_carries_the_latent_normalisation(full_run: Path) -> None:
    vae = AutoencoderKL.from_pretrained(full_run / "export")
    report = json.loads((full_run / "report.json").read_text())
    assert (vae.config.shift_factor, vae.config.scaling_factor) == (report["shift_factor"], report["scaling_factor"])
    raw_mean, raw_std = report["latent_mean_std"]
    assert abs(raw_mean) > 0.05 or abs(raw_std - 1) > 0.2, "raw latents already unit-scale: the test proves nothing"

    def images(seed: int, n: int) -> torch.Tensor:
        stream = iter(ShapesDataset(size=32, seed=seed))
        return torch.stack([next(stream)["pixels"] for _ in range(n)])

    with torch.no_grad():
        heldout = vae.to_latents(images(1, 32), sample=False)  # the images the factors were measured on
        fresh = vae.to_latents(images(7, 32), sample=False)  # images neither trained on nor measured
    assert abs(heldout.mean().item()) < 1e-4 and abs(heldout.std().item() - 1) < 1e-4
    assert abs(fresh.mean().item()) < 0.15 and abs(fresh.std().item() - 1) < 0.15, \
        f"fresh images: latent mean {fresh.mean().item():.3f}, std {fresh.std().item():.3f}"


def test_trains_on_an_image_folder_and_resumes_at_an_epoch_end(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for folder, n in (("train", 6), ("heldout", 3)):
        (tmp_path / folder).mkdir()
        for i in range(n):  # non-square images: they are centre-cropped and resized to 32 px
            Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(tmp_path / folder / f"{i}.png")
            (tmp_path / folder / f"{i}.txt").write_text("noise")
    text = TINY_TOML.replace("steps = 30", "steps = 5").replace("batch_size = 8", "batch_size = 3").replace(
        "checkpoint_every = 10", "checkpoint_every = 2").replace(
        'source = "shapes"', f'source = "{tmp_path / "train"}"\nheldout_source = "{tmp_path / "heldout"}"')
    configs = []
    for name in ("full", "cut"):
        (tmp_path / f"{name}.toml").write_text(text.format(out_dir=tmp_path / name))
        configs.append(VAETrainConfig.from_file(tmp_path / f"{name}.toml"))
    export = train_vae(configs[0], progress=False)
    assert len(metrics(tmp_path / "full")) == 5  # 15 samples from 6 images: the epochs wrap around
    assert json.loads((tmp_path / "full" / "report.json").read_text())["heldout_images"] == 3
    assert AutoencoderKL.from_pretrained(export).config.resolution == 32

    def interrupt(step: int, line: dict) -> None:
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # the step-2 checkpoint sits exactly at the end of epoch 0
        train_vae(configs[1], progress=False, on_step=interrupt)
    train_vae(configs[1], resume=True, progress=False)
    assert metrics(tmp_path / "cut") == metrics(tmp_path / "full")


@pytest.mark.parametrize("edit, message", [
    (lambda t: "lerning_rate = 1e-3\n" + t, "'lerning_rate'"),
    (lambda t: t.replace("noise_max = 0.3", "noise_max = 0.3\nl3 = 1.0"), "'loss.l3'"),
    (lambda t: t.replace("steps = 30", "steps = 0"), "'steps' must be positive"),
    (lambda t: t.replace("steps = 30", 'steps = "30"'), "'steps' must be an integer"),
    (lambda t: t.replace('source = "shapes"', 'source = "/no/such/images"\nheldout_source = "/no/such/h"'),
     "/no/such/images does not exist"),
    (lambda t: t.replace('source = "shapes"', 'source = "/no/such/images"'), "'data.heldout_source' is required"),
    (lambda t: t.replace("ch = 32", "ch = 16"), "multiple of 32"),
    (lambda t: t.replace("image_size = 32", "image_size = 36"), "data.image_size 36 must be a multiple of 8"),
    (lambda t: t.replace("z_channels = 16", "z_channels = 16\nscaling_factor = 0.5"), "computed"),
    (lambda t: t.replace("min_lr_ratio = 1.0", 'min_lr_ratio = 1.0\nschedule = "linear"'),
     "optim.schedule='linear' (constant or cosine)"),
    (lambda t: t.replace("min_lr_ratio = 1.0", "min_lr_ratio = 1.0\ngrad_accum = 2"), "the VAE's loop takes 1 only"),
])
def test_bad_config_fails_before_any_compute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, edit,
                                             message: str) -> None:
    def no_model(*args, **kwargs):
        raise AssertionError("a model was built for a bad config")

    monkeypatch.setattr(vae_training, "AutoencoderKL", no_model)
    path = tmp_path / "bad.toml"
    path.write_text(edit(TINY_TOML.format(out_dir=tmp_path / "run")))
    with pytest.raises(ConfigError, match=re.escape(message)):
        train_vae(VAETrainConfig.from_file(path), progress=False)
    assert main(["train-vae", str(path)]) == 2  # the CLI: one line naming the problem, no traceback
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_refuses_to_overwrite_or_resume_a_changed_run(full_run: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vae_training, "AutoencoderKL", None)  # any use of it would fail loudly
    with pytest.raises(ConfigError, match="already holds a run"):
        train_vae(load(tmp_path, full_run), progress=False)
    changed = VAETrainConfig.from_file(write_config(tmp_path, full_run).rename(tmp_path / "x.toml"))
    changed.optim.lr = 1e-4
    with pytest.raises(ConfigError, match=r"config changed since its checkpoint in \['optim.lr'\]"):
        train_vae(changed, resume=True, progress=False)


def test_freeze_encoder_keeps_the_latent_space_and_trains_the_decoder(full_run: Path, tmp_path: Path) -> None:
    base = AutoencoderKL.from_pretrained(full_run / "export")
    extra = f'init_from = "{full_run / "export"}"\nfreeze_encoder = true\n'
    toml = write_config(tmp_path, tmp_path / "run", extra).read_text().replace("steps = 30", "steps = 5")
    (tmp_path / "vae.toml").write_text(toml)
    tuned = AutoencoderKL.from_pretrained(train_vae(VAETrainConfig.from_file(tmp_path / "vae.toml"),
                                                    progress=False))
    a, b = base.state_dict(), tuned.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith("encoder."))
    assert not all(torch.equal(a[k], b[k]) for k in a if k.startswith("decoder."))
    # The scaled latents, what a generator was trained on, are the base's bit for bit.
    assert (tuned.config.shift_factor, tuned.config.scaling_factor) == \
        (base.config.shift_factor, base.config.scaling_factor)
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["scaling_factor"] == base.config.scaling_factor
    # Shipping accepts it in place of the base; a VAE with another encoder or scaling is refused.
    check_same_latents(base, tuned)
    with pytest.raises(ValueError, match="encoder tensors differ"):
        check_same_latents(base, AutoencoderKL(base.config))
    rescaled = AutoencoderKL.from_pretrained(full_run / "export")
    rescaled.config = dataclasses.replace(rescaled.config, scaling_factor=2 * base.config.scaling_factor)
    with pytest.raises(ValueError, match="shift, scale"):
        check_same_latents(base, rescaled)


def test_freeze_encoder_needs_a_base(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="'freeze_encoder' needs 'init_from'"):
        VAETrainConfig.from_file(write_config(tmp_path, tmp_path / "run", "freeze_encoder = true\n"))


def test_shapes_recipe_vae_stages_parse() -> None:
    """The recipe's tokenizer stages read cleanly; the decoder stages keep their base's latent space."""
    root = Path(__file__).resolve().parents[1] / "recipes" / "shapes"
    configs = {p.name: VAETrainConfig.from_file(p) for p in sorted(root.glob("vae*.toml"))}
    assert {"vae.toml", "vae-decoder.toml"} <= set(configs)
    assert not configs["vae.toml"].freeze_encoder
    decoder = configs["vae-decoder.toml"]
    assert decoder.freeze_encoder and decoder.init_from == configs["vae.toml"].out_dir + "/export"
    # The dark-image stage fine-tunes the shipped VAE (first encoder, tuned decoder) whole, anchored.
    dark = configs["vae-dark.toml"]
    assert dark.init_from == decoder.out_dir + "/export" and not dark.freeze_encoder
    assert dark.loss.anchor > 0 and dark.data.dark_prob > 0.2
    # The shipped decoder: the dark VAE's, trained on alone, so the model's latents stay the same.
    dark_decoder = configs["vae-dark-decoder.toml"]
    assert dark_decoder.freeze_encoder and dark_decoder.init_from == dark.out_dir + "/export"
    assert dark_decoder.data.dark_prob >= dark.data.dark_prob
    # Its second and third passes: the same stage from the previous pass's export, so only the start differs.
    previous = dark_decoder
    for name in ("vae-dark-decoder-2.toml", "vae-dark-decoder-3.toml"):
        again = configs[name]
        assert again.freeze_encoder and again.init_from == previous.out_dir + "/export"
        assert again.out_dir not in (previous.out_dir, dark_decoder.out_dir)
        assert (again.steps, again.data, again.loss, again.optim) == (
            dark_decoder.steps, dark_decoder.data, dark_decoder.loss, dark_decoder.optim)
        previous = again


def test_anchor_holds_a_fine_tuned_encoder_near_its_base(full_run: Path, tmp_path: Path) -> None:
    """`loss.anchor` pulls the posterior means toward the init_from encoder's: with it the held-out
    latents move less in the same steps, and the logged anchor_loss is that distance."""
    base = AutoencoderKL.from_pretrained(full_run / "export")
    heldout = vae_training.load_heldout(load(tmp_path, tmp_path / "x").data, 16)
    before = vae_training.latent_means(base, heldout, 8)
    moved = {}
    for anchor in (0.0, 50.0):
        run = tmp_path / f"anchor-{anchor}"
        extra = f'init_from = "{full_run / "export"}"\n'
        toml = write_config(tmp_path, run, extra).read_text().replace("steps = 30", "steps = 6")
        (tmp_path / "vae.toml").write_text(toml.replace("noise_max = 0.3", f"noise_max = 0.3\nanchor = {anchor}"))
        tuned = AutoencoderKL.from_pretrained(train_vae(VAETrainConfig.from_file(tmp_path / "vae.toml"),
                                                        progress=False))
        moved[anchor] = (vae_training.latent_means(tuned, heldout, 8) - before).pow(2).mean().item()
        logged = [m["anchor_loss"] for m in metrics(run)]
        assert (max(logged) > 0) == (anchor > 0)
    assert moved[50.0] < 0.5 * moved[0.0], moved


def test_anchor_needs_a_trainable_base(tmp_path: Path) -> None:
    anchored = TINY_TOML.format(out_dir=tmp_path / "run").replace("noise_max = 0.3", "noise_max = 0.3\nanchor = 1.0")
    for extra in ("", f'init_from = "{tmp_path}"\nfreeze_encoder = true\n'):
        (tmp_path / "a.toml").write_text(extra + anchored)
        with pytest.raises(ConfigError, match="'loss.anchor' holds a trained encoder near its init_from"):
            VAETrainConfig.from_file(tmp_path / "a.toml")


def test_dark_prob_reaches_the_shapes_stream() -> None:
    config = DataConfig(dark_prob=1.0, image_size=32)
    images = vae_training.load_heldout(config, 4)
    dark = (25 / 127.5) - 1  # the dark background, in [-1, 1]
    assert torch.allclose(images[:, :, 0, 0], torch.full((4, 3), dark), atol=1e-3)


def test_the_earlier_vocabulary_fails_naming_the_new_keys(tmp_path: Path, capsys) -> None:
    path = tmp_path / "old.toml"
    path.write_text(f'run_dir = "{tmp_path / "run"}"\nlr = 1e-3\nbatch_size = 4\nkeep_last = 2\n')
    with pytest.raises(ConfigError) as error:
        VAETrainConfig.from_file(path)
    for moved in ("'run_dir' is now 'out_dir'", "'lr' is now 'optim.lr'", "'batch_size' is now 'data.batch_size'",
                  "'keep_last' is now 'train.keep_last'"):
        assert moved in str(error.value)
    assert main(["train-vae", str(path)]) == 2 and "'lr' is now 'optim.lr'" in capsys.readouterr().err


def test_a_checkpoint_of_the_earlier_vocabulary_still_resumes(tmp_path: Path) -> None:
    """A checkpoint saved before the rename holds its config in the old words: it compares as the same config."""
    config = load(tmp_path, tmp_path / "run")
    new = to_dict(config)
    old = {k: v for k, v in new.items() if k not in ("out_dir", "optim", "train")}
    old["data"] = {k: v for k, v in new["data"].items() if k != "batch_size"}
    for key, where in RENAMED.items():
        table, _, name = where.rpartition(".")
        old[key] = (new[table] if table else new)[name]
    assert resume_conflicts(old, config) == []
    old["lr"] = 1.0
    assert resume_conflicts(old, config) == ["optim.lr"]
