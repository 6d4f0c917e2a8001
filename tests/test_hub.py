"""Hugging Face Hub ids, with no network: a Hub cache is built by hand in the library's layout
(models--org--name/blobs, snapshots/<commit>/, refs/<revision>) from the parity fixtures, and
models load from it offline."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nextstep.cli import main
from nextstep.errors import CheckpointError, ConfigError
from nextstep.hub import MODEL_FILES, VAE_FILES, HubOptions, is_hub_id, resolve_model_dir, resolve_vae_dir
from nextstep.pipeline import NextStepPipeline

from .conftest import REF10, REF11

huggingface_hub = pytest.importorskip("huggingface_hub")
SETTINGS = dict(height=32, width=32, num_inference_steps=2, guidance_scale=3.0)
COMMIT_A, COMMIT_B = "a" * 40, "b" * 40


def cache_repo(cache: Path, repo_id: str, files: dict[str, Path], commit: str = COMMIT_A,
               refs: tuple[str, ...] = ("main",)) -> Path:
    """Put `files` (path in the repository -> source file) into `cache` as huggingface_hub does:
    content-addressed blobs, a snapshot folder of relative symlinks, refs naming the commit."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot = repo / "snapshots" / commit
    for name, source in files.items():
        data = source.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)  # no newline, as the library writes it
    return snapshot


def model_files(fixture: Path, with_vae: bool = True) -> dict[str, Path]:
    files = {p.name: p for p in (fixture / "model").iterdir()}
    if with_vae:
        files.update({f"vae/{p.name}": p for p in (fixture / "vae").iterdir()})
    return files


@pytest.fixture()
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An offline Hub cache with org/tiny (1.0, VAE in vae/) and org/tiny-11 (1.1) at main."""
    cache = tmp_path / "hub"
    cache_repo(cache, "org/tiny", model_files(REF10))
    cache_repo(cache, "org/tiny-11", model_files(REF11))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


def pixels(pipe: NextStepPipeline) -> np.ndarray:
    return np.asarray(pipe("a red circle", generator=3, **SETTINGS).images[0])


@pytest.mark.parametrize("repo_id, fixture", [("org/tiny", REF10), ("org/tiny-11", REF11)])
def test_from_pretrained_loads_a_hub_id_from_the_cache(hub_cache: Path, repo_id: str, fixture: Path) -> None:
    from_hub = NextStepPipeline.from_pretrained(repo_id, device="cpu")
    assert str(hub_cache) in str(from_hub.tokenizer.folder)
    local = NextStepPipeline.from_pretrained(fixture / "model", fixture / "vae", device="cpu")
    assert all(torch.equal(a, b) for a, b in zip(from_hub.model.state_dict().values(),
                                                 local.model.state_dict().values(), strict=True))
    np.testing.assert_array_equal(pixels(from_hub), pixels(local))


def test_cache_dir_and_revision_are_honoured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "elsewhere"
    cache_repo(cache, "org/tiny", model_files(REF10), COMMIT_A)
    # Tag v2 is a commit whose config names an unknown field: loading it shows which commit was read.
    changed = tmp_path / "config.json"
    changed.write_text(json.dumps({**json.loads((REF10 / "model" / "config.json").read_text()), "new_knob": 1}))
    cache_repo(cache, "org/tiny", {**model_files(REF10), "config.json": changed}, COMMIT_B, refs=("v2",))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    main_pipe = NextStepPipeline.from_pretrained("org/tiny", device="cpu", cache_dir=cache, local_files_only=True)
    assert COMMIT_A in str(main_pipe.tokenizer.folder) and "new_knob" not in main_pipe.model.config.extra
    for revision in ("v2", COMMIT_B):
        pipe = NextStepPipeline.from_pretrained("org/tiny", device="cpu", cache_dir=cache, local_files_only=True,
                                                revision=revision)
        assert pipe.model.config.extra["new_knob"] == 1
    with pytest.raises(ConfigError, match="new_knob"):
        NextStepPipeline.from_pretrained("org/tiny", device="cpu", cache_dir=cache, local_files_only=True,
                                         revision="v2", strict_config=True)
    with pytest.raises(CheckpointError) as e:
        NextStepPipeline.from_pretrained("org/tiny", device="cpu", cache_dir=cache, local_files_only=True,
                                         revision="v9")
    assert "'org/tiny' (revision 'v9')" in str(e.value) and "local_files_only=True" in str(e.value)


def test_a_missing_id_offline_is_one_line_naming_it(hub_cache: Path) -> None:
    with pytest.raises(CheckpointError) as e:
        NextStepPipeline.from_pretrained("org/missing-model", device="cpu")
    message = str(e.value)
    assert "\n" not in message
    assert "'org/missing-model'" in message and "HF_HUB_OFFLINE" in message and str(hub_cache) in message


def test_cli_model_takes_a_hub_id(hub_cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out.png"
    args = ["generate", "a red circle", "--size", "32", "--steps", "2", "--cfg", "3", "--seed", "3", "-o", str(out),
            "--device", "cpu"]
    assert main([*args, "--model", "org/tiny"]) == 0
    local = NextStepPipeline.from_pretrained(REF10 / "model", REF10 / "vae", device="cpu")
    np.testing.assert_array_equal(np.asarray(Image.open(out)), pixels(local))
    capsys.readouterr()
    assert main([*args, "--model", "org/nothing-here"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'org/nothing-here'" in err


def test_the_vae_may_come_from_another_repository(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """vae_name_or_path naming a Hub id (the model repository has no vae/), and vae_dir= as a Hub id."""
    cache = tmp_path / "hub"
    config = tmp_path / "config.json"
    config.write_text(json.dumps({**json.loads((REF10 / "model" / "config.json").read_text()),
                                  "vae_name_or_path": "org/tiny-vae"}))
    cache_repo(cache, "org/tiny-no-vae", {**model_files(REF10, with_vae=False), "config.json": config})
    cache_repo(cache, "org/tiny-vae", {p.name: p for p in (REF10 / "vae").iterdir()})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = NextStepPipeline.from_pretrained("org/tiny-no-vae", device="cpu", cache_dir=cache)
    local = NextStepPipeline.from_pretrained(REF10 / "model", REF10 / "vae", device="cpu")
    np.testing.assert_array_equal(pixels(pipe), pixels(local))
    cache_repo(cache, "org/tiny-plain", model_files(REF10, with_vae=False))
    pipe = NextStepPipeline.from_pretrained("org/tiny-plain", "org/tiny-vae", device="cpu", cache_dir=cache)
    np.testing.assert_array_equal(pixels(pipe), pixels(local))
    with pytest.raises(CheckpointError, match=r"no VAE folder at .*tiny-plain.*vae.*pass vae_dir="):
        NextStepPipeline.from_pretrained("org/tiny-plain", device="cpu", cache_dir=cache)


def test_only_the_files_nextstep_reads_are_asked_for() -> None:
    """The download patterns take every file a model folder needs and leave the rest of a repository."""
    from huggingface_hub.utils import filter_repo_objects

    wanted = [*(p.name for p in (REF10 / "model").iterdir() if p.name != "generation_config.json"),
              "model.safetensors.index.json", "model-00001-of-00006.safetensors", "generation_defaults.json",
              *(f"vae/{p.name}" for p in (REF10 / "vae").iterdir())]
    unwanted = ["models/nextstep_model.py", "optimizer.pt", "training_args.bin", "pytorch_model.bin",
                "assets/demo.gif", "README.md", "vae/train_state.pt", "generation_config.json"]
    assert sorted(filter_repo_objects(wanted + unwanted, allow_patterns=list(MODEL_FILES))) == sorted(wanted)
    assert set(VAE_FILES) >= {"config.json", "checkpoint.pt"}


def test_local_folders_and_names(tmp_path: Path) -> None:
    assert is_hub_id("stepfun-ai/NextStep-1-Large") and is_hub_id("org/name.v2")
    assert not any(is_hub_id(s) for s in ("/abs/path", "./org/name", "a/b/c", "name", "org/", "~/x"))
    assert resolve_model_dir(REF10 / "model") == (REF10 / "model", None)
    with pytest.raises(CheckpointError, match="model folder not found.*nowhere/at/all"):
        resolve_model_dir(tmp_path / "nowhere" / "at" / "all")
    with pytest.raises(CheckpointError, match="is not a model folder"):
        resolve_model_dir(REF10 / "model" / "config.json")


def test_without_huggingface_hub_a_hub_id_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails, as when not installed
    with pytest.raises(CheckpointError, match=r"'org/name' is not a local folder.*pip install huggingface_hub"):
        resolve_model_dir("org/name", HubOptions())


def test_cli_strict_config_and_plan_take_hub_ids(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture) -> None:
    cache = tmp_path / "hub"
    config = tmp_path / "config.json"
    config.write_text(json.dumps({**json.loads((REF10 / "model" / "config.json").read_text()), "new_knob": 1}))
    cache_repo(cache, "org/tiny-new", {**model_files(REF10), "config.json": config})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    args = ["generate", "a red circle", "--model", "org/tiny-new", "--size", "32", "--steps", "2", "--device", "cpu",
            "-o", str(tmp_path / "out.png")]
    assert main(args) == 0 and (tmp_path / "out.png").is_file()
    assert main([*args, "--strict-config"]) == 2
    assert "new_knob" in capsys.readouterr().err
    # `nextstep plan` fetches only the config: the same plan as from a local folder.
    assert main(["plan", "--model", "org/tiny-new", "--size", "32", "--json"]) == 0
    from_hub = json.loads(capsys.readouterr().out)
    folder = tmp_path / "local"
    shutil.copytree(REF10 / "model", folder)
    shutil.copytree(REF10 / "vae", folder / "vae")
    assert main(["plan", "--model", str(folder), "--size", "32", "--json"]) == 0
    local = json.loads(capsys.readouterr().out)
    assert from_hub["weights"]["vae"] < 4 * 10**6  # the repository's tiny VAE, not the full-size default
    assert {**from_hub, "model": None} == {**local, "model": None}


def test_a_vae_path_from_another_machine_falls_back_to_the_folders_vae(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    shutil.copytree(REF10 / "model", folder)
    shutil.copytree(REF10 / "vae", folder / "vae")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "vae_name_or_path": "/mnt/authors/vae-f8ch16"}))
    assert resolve_vae_dir(None, folder, "/mnt/authors/vae-f8ch16", None) == folder / "vae"
    assert NextStepPipeline.from_pretrained(folder, device="cpu").vae.config.scaling_factor == 0.3611
    shutil.rmtree(folder / "vae")
    with pytest.raises(CheckpointError, match="no VAE folder at /mnt/authors/vae-f8ch16.*pass vae_dir="):
        NextStepPipeline.from_pretrained(folder, device="cpu")
