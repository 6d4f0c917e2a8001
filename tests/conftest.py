"""Shared test helpers: where the reference fixtures live and how to read them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
REF10 = FIXTURES / "reference-tiny"
REF11 = FIXTURES / "reference-1.1-tiny"

# Tiny models: one thread is faster, and immune to OpenMP spinning on a busy shared machine.
torch.set_num_threads(1)


def _require(folder: Path) -> Path:
    # The fixtures ship with the repository: a missing folder is a broken checkout, not a reason to skip.
    if not (folder / "cases.json").exists():
        raise FileNotFoundError(f"reference fixtures missing at {folder} (they are part of the repository)")
    return folder


@pytest.fixture(scope="session")
def ref10() -> Path:
    return _require(REF10)


@pytest.fixture(scope="session")
def cases10(ref10: Path) -> dict:
    return json.loads((ref10 / "cases.json").read_text())


@pytest.fixture(scope="session")
def expected10(ref10: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(ref10 / "expected.safetensors"))


@pytest.fixture(scope="session")
def ref11() -> Path:
    return _require(REF11)


@pytest.fixture(scope="session")
def cases11(ref11: Path) -> dict:
    return {c["name"]: c for c in json.loads((ref11 / "cases.json").read_text())["cases"]}


@pytest.fixture(scope="session")
def expected11(ref11: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(ref11 / "expected.safetensors"))


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, what: str = "tensor") -> None:
    """Max-abs-diff check with a message that says how far off we are."""
    assert tuple(actual.shape) == tuple(expected.shape), f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    diff = (actual.float() - expected.float()).abs().max().item() if actual.numel() else 0.0
    assert diff <= atol, f"{what}: max abs diff {diff:.3g} > {atol}"
