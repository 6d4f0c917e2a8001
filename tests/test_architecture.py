"""The shape of the package: one owner for generation defaults, small modules, one seed rule."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "nextstep"
SETTINGS = PACKAGE / "settings.py"
# Where a seed is a generation seed (elsewhere `seed` seeds the shapes world, a data order or a training run).
FRONT_ENDS = ["pipeline.py", "prepare.py", "serving", "cli/common.py", "cli/generate.py", "cli/edit.py",
              "cli/eval.py", "shapes/benchmark.py"]
NAMES = r"cfg|num_sampling_steps|num_inference_steps|guidance_scale|sample_cfg|sample_steps"
LITERAL = r"-?\d[\d.]*"
# A parameter or field with a literal default (`cfg: float = 3.0`, `cfg=3.0`), a dict entry
# (`"cfg": 3.0`), or a command-line flag with a literal default.
PATTERNS = [rf"\b({{names}})\s*(:[^=,)\n]*)?=\s*{LITERAL}\b", rf"[\"']({{names}})[\"']\s*:\s*{LITERAL}\b",
            rf"[\"']--({{flags}})[\"'][^)]*default\s*=\s*{LITERAL}"]


def literal_defaults(path: Path, names: str, flags: str) -> list[str]:
    text = path.read_text()
    found = []
    for pattern in PATTERNS:
        for m in re.finditer(pattern.format(names=names, flags=flags), text):
            line = text.count("\n", 0, m.start()) + 1
            found.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {m.group(0)}")
    return found


def python_files(*where: str) -> list[Path]:
    out = []
    for w in where:
        p = PACKAGE / w
        out += sorted(p.rglob("*.py")) if p.is_dir() else [p]
    return out


def test_the_grep_finds_a_second_definition(tmp_path: Path) -> None:
    """The check below would catch each way of writing a default a second time."""
    sample = tmp_path / "x.py"
    sample.write_text('def f(cfg: float = 3.0, seed=7): ...\nD = {"num_sampling_steps": 20}\n'
                            'p.add_argument("--steps", type=int, default=20)\n')
    found = [m for pattern in PATTERNS for m in re.findall(pattern.format(names=NAMES + "|seed", flags="steps"),
                                                            sample.read_text())]
    assert len(found) == 4


def test_generation_defaults_are_written_once() -> None:
    """cfg, the number of sampling steps and the seed have their defaults in settings.py only."""
    assert literal_defaults(SETTINGS, NAMES + "|seed", "cfg|steps|seed")  # the one place
    found = []
    for path in python_files("."):
        if path != SETTINGS:
            found += literal_defaults(path, NAMES, "cfg|cfg-img|steps")
    for path in python_files(*FRONT_ENDS):
        found += literal_defaults(path, "seed", "seed")
    assert not found, "literal defaults outside nextstep/settings.py:\n" + "\n".join(found)


@pytest.mark.parametrize("path", python_files("."), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_modules_can_be_read_whole(path: Path) -> None:
    assert len(path.read_text().splitlines()) <= 400
