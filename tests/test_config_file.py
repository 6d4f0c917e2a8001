"""Config files that start from a base file (`base = "other.toml"`), and the shipped recipes built on them."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from nextstep.cli.train import stage_files
from nextstep.errors import ConfigError
from nextstep.training.config import TrainConfig
from nextstep.training.config_file import merge, read_toml

ROOT = Path(__file__).resolve().parents[1]
RESOLVED = Path(__file__).resolve().parent / "data" / "recipes_resolved.json"


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_merge_tables_key_by_key_and_replace_everything_else():
    base = {"steps": 10, "data": {"batch_size": 8, "sources": [{"kind": "shapes"}, {"kind": "files"}]},
            "model": {"config": {"hidden_size": 64, "num_hidden_layers": 2}}, "seed": 1}
    over = {"steps": 20, "data": {"sources": [{"kind": "shapes", "size": 32}]},
            "model": {"config": {"hidden_size": 128}}, "init_from": "x"}
    assert merge(base, over) == {
        "steps": 20, "seed": 1, "init_from": "x",
        "data": {"batch_size": 8, "sources": [{"kind": "shapes", "size": 32}]},  # the list is replaced whole
        "model": {"config": {"hidden_size": 128, "num_hidden_layers": 2}},       # inline tables merge too
    }
    assert base["data"]["batch_size"] == 8 and base["model"]["config"]["hidden_size"] == 64  # unchanged
    # A table replaces a non-table and the other way round (the checks then name a wrong type).
    assert merge({"a": 1}, {"a": {"b": 2}}) == {"a": {"b": 2}}
    assert merge({"a": {"b": 2}}, {"a": 1}) == {"a": 1}


def test_base_file_is_merged_under_the_stage(tmp_path):
    write(tmp_path, "base.toml", 'steps = 100\nseed = 3\n[data]\nbatch_size = 8\ncaption_dropout = 0.2\n'
          'sources = [{ kind = "shapes", size = 32 }, { kind = "shapes", edits = true }]\n'
          '[optim]\nlr = 1e-3\nschedule = "cosine"\n')
    stage = write(tmp_path, "1-stage.toml", 'base = "base.toml"\nsteps = 7\n[data]\nbatch_size = 4\n'
                  'sources = [{ kind = "shapes", size = 64 }]\n[train]\nlog_every = 5\n')
    assert read_toml(stage) == {"steps": 7, "seed": 3, "optim": {"lr": 1e-3, "schedule": "cosine"},
                                "data": {"batch_size": 4, "caption_dropout": 0.2,
                                         "sources": [{"kind": "shapes", "size": 64}]},
                                "train": {"log_every": 5}}
    config = TrainConfig.from_file(stage)
    assert (config.steps, config.seed, config.data.batch_size, config.data.caption_dropout) == (7, 3, 4, 0.2)
    assert len(config.data.sources) == 1 and config.data.sources[0].size == 64
    assert config.optim.schedule == "cosine" and config.train.log_every == 5
    assert config.source == str(stage)


def test_bases_chain_relative_to_the_file_naming_them(tmp_path):
    write(tmp_path, "shared/root.toml", "steps = 1\nseed = 1\n[optim]\nlr = 1e-3\nwarmup_steps = 5\n")
    write(tmp_path, "shared/middle.toml", 'base = "root.toml"\nseed = 2\n[optim]\nwarmup_steps = 6\n')
    stage = write(tmp_path, "recipe/3-x.toml", 'base = "../shared/middle.toml"\n[optim]\nlr = 2e-3\n')
    config = TrainConfig.from_file(stage)
    assert (config.steps, config.seed, config.optim.lr, config.optim.warmup_steps) == (1, 2, 2e-3, 6)


def test_a_cycle_of_bases_is_named(tmp_path):
    write(tmp_path, "a.toml", 'base = "b.toml"\n')
    write(tmp_path, "b.toml", 'base = "c.toml"\n')
    write(tmp_path, "c.toml", 'base = "a.toml"\n')
    with pytest.raises(ConfigError, match="cycle") as info:
        read_toml(tmp_path / "a.toml")
    chain = " -> ".join(str(tmp_path / n) for n in ("a.toml", "b.toml", "c.toml", "a.toml"))
    assert chain in str(info.value)
    write(tmp_path, "self.toml", 'base = "self.toml"\n')
    with pytest.raises(ConfigError, match="cycle"):
        read_toml(tmp_path / "self.toml")


def test_a_missing_or_malformed_base_is_named(tmp_path):
    stage = write(tmp_path, "1-x.toml", 'base = "no-such-base.toml"\nsteps = 3\n')
    with pytest.raises(ConfigError, match=f"its base file {tmp_path / 'no-such-base.toml'} does not exist"):
        TrainConfig.from_file(stage)
    write(tmp_path, "broken.toml", "steps = = 3\n")
    stage.write_text('base = "broken.toml"\n')
    with pytest.raises(ConfigError, match=f"config file {tmp_path / 'broken.toml'} is not valid TOML"):
        TrainConfig.from_file(stage)
    stage.write_text("base = 3\n")
    with pytest.raises(ConfigError, match="'base' must be the path of another config file"):
        TrainConfig.from_file(stage)


def test_unknown_and_mistyped_keys_in_a_base_fail_by_name(tmp_path):
    write(tmp_path, "base.toml", "[optim]\nlerning_rate = 1e-3\n")
    stage = write(tmp_path, "1-x.toml", 'base = "base.toml"\nsteps = 3\n')
    with pytest.raises(ConfigError, match="unknown config key 'optim.lerning_rate'"):
        TrainConfig.from_file(stage)
    write(tmp_path, "base.toml", '[train]\nlog_every = "often"\n')
    with pytest.raises(ConfigError, match="config key 'train.log_every' must be an integer"):
        TrainConfig.from_file(stage)
    # A base is merged, not a key of the config: `base` may not hide in a table.
    stage.write_text('[data]\nbase = "base.toml"\n')
    with pytest.raises(ConfigError, match="unknown config key 'data.base'"):
        TrainConfig.from_file(stage)


def resolved_stages() -> dict[str, dict]:
    out = {}
    for recipe in sorted(p for p in (ROOT / "recipes").iterdir() if p.is_dir()):
        for f in stage_files(recipe):
            config = dataclasses.asdict(TrainConfig.from_file(f))
            config.pop("source")
            out[f.relative_to(ROOT / "recipes").as_posix()] = json.loads(json.dumps(config))
    return out


def test_recipe_stages_resolve_to_their_recorded_configs():
    """Every stage of the shipped recipes, with its base files merged in, is exactly the config
    recorded in tests/data/recipes_resolved.json. A change to a base file changes every stage on
    it: this test says which, and the expectations are then updated on purpose."""
    expected = json.loads(RESOLVED.read_text())
    got = resolved_stages()
    assert sorted(got) == sorted(expected)
    changed = [name for name in expected if got[name] != expected[name]]
    assert not changed, f"stages whose resolved config changed: {changed}"


def test_recipe_folders_run_only_their_numbered_files():
    for recipe in ("shapes", "nextstep1"):
        folder = ROOT / "recipes" / recipe
        names = [f.name for f in stage_files(folder)]
        assert names and all(n[0].isdigit() for n in names)
        assert (folder / "base.toml").is_file() and "base.toml" not in names
    numbers = [int(f.name.split("-")[0]) for f in stage_files(ROOT / "recipes" / "shapes")]
    # after 16: 17-dpo (then 18- to 21-dpo), or 17-grpo, 17-plan; after 21: 22-plan, 23-plan, 24- to 27-dpo
    assert numbers == list(range(1, 17)) + [17, 17, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 45, 46, 47, 48]
