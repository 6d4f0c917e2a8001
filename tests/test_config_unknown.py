"""Config fields we have never seen: a warning naming them and the load goes on; strict refuses.
Known fields keep their checks either way."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from nextstep.config import NextStepConfig
from nextstep.errors import ConfigError
from nextstep.io import load_model, save_model
from nextstep.pipeline import NextStepPipeline

from .conftest import REF10, REF11

CPU = torch.device("cpu")
UNKNOWN = {"zz_future_knob": 3, "aa_router_mode": "dense"}  # two fields no NextStep config has


def copy_model(fixture: Path, tmp_path: Path, **changes) -> Path:
    """The fixture's model folder with `changes` written into a copy of its config.json."""
    dst = tmp_path / fixture.name
    shutil.copytree(fixture / "model", dst)
    d = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**d, **changes}))
    return dst


def config_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "nextstep.config" and r.levelno == logging.WARNING]


@pytest.mark.parametrize("fixture", [REF10, REF11], ids=["1.0", "1.1"])
def test_two_unknown_fields_give_one_warning_naming_both(fixture: Path, tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    folder = copy_model(fixture, tmp_path, **UNKNOWN)
    with caplog.at_level(logging.WARNING, logger="nextstep.config"):
        model = load_model(folder, CPU, torch.float32)
    messages = config_warnings(caplog)
    assert len(messages) == 1 and "\n" not in messages[0]
    assert "zz_future_knob" in messages[0] and "aa_router_mode" in messages[0]
    # The model is the fixture's: same config fields, same weights.
    plain = load_model(fixture / "model", CPU, torch.float32)
    assert model.config.hidden_size == plain.config.hidden_size
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), plain.state_dict().values(), strict=True))
    # The fields travel on: a save writes them back untouched.
    save_model(model, tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert {k: saved[k] for k in UNKNOWN} == UNKNOWN


@pytest.mark.parametrize("fixture", [REF10, REF11], ids=["1.0", "1.1"])
def test_strict_config_refuses_unknown_fields(fixture: Path, tmp_path: Path) -> None:
    folder = copy_model(fixture, tmp_path, **UNKNOWN)
    with pytest.raises(ConfigError, match=r"not understood.*\['aa_router_mode', 'zz_future_knob'\]"):
        load_model(folder, CPU, torch.float32, strict_config=True)
    with pytest.raises(ConfigError, match="zz_future_knob"):
        NextStepPipeline.from_pretrained(folder, fixture / "vae", device="cpu", strict_config=True)


def test_known_fields_keep_their_checks_with_unknown_ones(tmp_path: Path) -> None:
    """Sliding-window attention switched on stays an error, next to unknown fields and without strict."""
    folder = copy_model(REF11, tmp_path, use_sliding_window=True, sliding_window=64, **UNKNOWN)
    with pytest.raises(ConfigError, match="use_sliding_window=true"):
        load_model(folder, CPU, torch.float32)
    with pytest.raises(ConfigError, match=r"wrong type.*hidden_size='64'"):
        NextStepConfig.from_dict({**json.loads((REF10 / "model" / "config.json").read_text()),
                                  "hidden_size": "64", **UNKNOWN})


def test_known_fields_give_no_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="nextstep.config"):
        for fixture in (REF10, REF11):
            NextStepConfig.from_pretrained(fixture / "model")
    assert config_warnings(caplog) == []


def test_pipeline_loads_with_unknown_fields(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = copy_model(REF10, tmp_path, **UNKNOWN)
    with caplog.at_level(logging.WARNING, logger="nextstep.config"):
        pipe = NextStepPipeline.from_pretrained(folder, REF10 / "vae", device="cpu")
    assert pipe.model.config.extra["zz_future_knob"] == 3
    assert len(config_warnings(caplog)) == 1
