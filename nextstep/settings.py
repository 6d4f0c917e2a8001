"""GenerationSettings: how an image is sampled, with every default written once.

A pipeline's settings are built in three layers: the defaults below (what the
official examples use), then the model folder's `generation_defaults.json`,
then what the caller sets. The pipeline, the CLI, the server, the benchmarks
and training's sample grids all take a `GenerationSettings`; the official
`generate_image` signature is a thin shim over it.

Every value is checked when a `GenerationSettings` is made, and all problems
are reported together, one per setting. Checks that need the model (sizes
must be multiples of its token size) are the pipeline's.

Not settings: the seed and the number of images belong to a request (image k
of a request with seed s is the image of seed s + k); `cpu_dtype`, which a
model folder may also set in `generation_defaults.json`, says how the weights
are loaded (`dtype=` / `--dtype` override it).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .devices import DTYPE_NAMES
from .errors import CheckpointError
from .sampling.flow import SAMPLERS, STEP_SCHEDULES
from .text import SOURCE_IMAGE_PLACES

DEFAULT_SEED = 42  # the official generate_image's, and the CLI's
SEED_MODULUS = 2**32  # seeds are 32-bit: image k of seed s uses (s + k) mod 2**32
CFG_SCHEDULES = ("constant", "linear")
GENERATION_DEFAULTS_FILE = "generation_defaults.json"
# Keys of generation_defaults.json that are not sampling settings (see the module doc).
LOAD_KEYS = {"cpu_dtype": f"null or one of {list(DTYPE_NAMES)}"}
RENAMED = {"context_noise": "context_noise_std"}  # older generation_defaults.json keys


class InvalidSettings(ValueError):
    """Bad generation settings; `names` are the settings at fault (the message says why for each)."""

    def __init__(self, message: str, names: list[str]) -> None:
        super().__init__(message)
        self.names = names


@dataclass(frozen=True)
class GenerationSettings:
    hw: tuple[int, int] | None = None  # (height, width) in pixels; None: the model's own size
    cfg: float = 7.5  # text guidance scale; 1 means none
    cfg_img: float = 2.0  # image guidance scale (edits only; text to image always uses 1)
    cfg_schedule: str = "constant"  # or "linear" (each family ramps its own way)
    num_sampling_steps: int = 28  # flow steps per image token
    timesteps_shift: float = 1.0  # > 1 spends more of the steps near the noise
    # Flow steps per token: "fixed" (the official), or a preset of fewer
    # (nextstep/sampling/flow.py STEP_SCHEDULE_PRESETS; fewer head evaluations per image)
    step_schedule: str = "fixed"
    sampler: str | None = None  # None: the checkpoint family's own (NextStep-1 euler_maruyama, 1.1 sde)
    noise_level: float = 0.8  # sde and cps samplers only
    use_norm: bool = False  # layer-norm each sampled token (official 1.0 examples: True)
    # Std of the noise on each sampled token where the decoder reads it back (the image gets the
    # clean token): for models trained with `train.context_noise`, whose noise std is drawn up to it.
    context_noise_std: float = 0.0
    source_image: str = "first"  # edits: where the instruction sees its source image
    negative_prompt: str = ""  # the unconditional rows' text
    positive_prompt: str = ""  # appended to every caption
    # Self-CoT (docs/self-cot.md): write a thought with the LM head first, then draw the image from
    # caption + "\nthought: " + thought. `think` is for text to image and `think_edits` for edits (a
    # model may plan one and not the other); the text_* settings say how thought tokens are chosen.
    think: bool = False
    think_edits: bool = False
    thought_max_tokens: int = 48  # a thought ends at a special token or after this many tokens
    # An edit's thought padded with [PAD] (or cut) to exactly this many tokens, so that the target
    # sits a fixed distance after its source whatever the thought says: the offset at which a model
    # trained with `[data] edit_thought_tokens` copies the source. 0: as long as it is written.
    edit_thought_tokens: int = 0
    # An edit's thought followed by its source image once more, so that the target follows a source
    # as closely as without a thought: for models trained with `[data] edit_source_after_thought`.
    edit_source_after_thought: bool = False
    text_temperature: float = 1.0  # 0: greedy (the most likely token)
    text_top_k: int = 0  # keep only the k most likely tokens; 0: all
    text_top_p: float = 1.0  # keep the smallest set of tokens holding this much probability; 1: all

    def __post_init__(self) -> None:
        if isinstance(self.hw, list):  # from JSON
            object.__setattr__(self, "hw", tuple(self.hw))
        for name in ("negative_prompt", "positive_prompt"):
            if getattr(self, name) is None:
                object.__setattr__(self, name, "")
        bad = [name for name, (ok, _) in _CHECKS.items() if not ok(getattr(self, name))]
        if bad:
            problems = [f"{name}={getattr(self, name)!r} (must be {_CHECKS[name][1]})" for name in bad]
            raise InvalidSettings("invalid generation settings: " + "; ".join(problems), bad)
        if self.edit_thought_tokens and self.edit_source_after_thought:
            raise InvalidSettings("invalid generation settings: edit_thought_tokens and edit_source_after_thought "
                                  "are two layouts of an edit's thought; set one",
                                  ["edit_thought_tokens", "edit_source_after_thought"])
        for name in ("cfg", "cfg_img", "timesteps_shift", "noise_level", "context_noise_std", "text_temperature",
                     "text_top_p"):
            object.__setattr__(self, name, float(getattr(self, name)))

    def thinks(self, edit: bool) -> bool:
        """Whether an image of this kind (an edit, or text to image) is drawn after a thought."""
        return self.think_edits if edit else self.think

    def with_overrides(self, **overrides: Any) -> "GenerationSettings":
        """A copy with these settings changed; None leaves a setting as it is (an unset flag)."""
        unknown = sorted(set(overrides) - set(FIELDS))
        if unknown:
            raise TypeError(f"unknown generation setting{'s' if len(unknown) > 1 else ''} {unknown}; "
                            f"known: {list(FIELDS)}")
        given = {k: v for k, v in overrides.items() if v is not None}
        return dataclasses.replace(self, **given) if given else self

    def as_dict(self) -> dict[str, Any]:
        """JSON-able (hw as a list)."""
        d = dataclasses.asdict(self)
        d["hw"] = list(self.hw) if self.hw is not None else None
        return d


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _integer(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


_CHECKS = {
    "hw": (lambda v: v is None or (isinstance(v, tuple) and len(v) == 2 and all(_integer(s) and s > 0 for s in v)),
           "(height, width), positive integers"),
    "cfg": (lambda v: _number(v) and v >= 1, "a number >= 1"),
    "cfg_img": (lambda v: _number(v) and v >= 1, "a number >= 1"),
    "cfg_schedule": (lambda v: v in CFG_SCHEDULES, f"one of {list(CFG_SCHEDULES)}"),
    "num_sampling_steps": (lambda v: _integer(v) and v >= 1, "an integer >= 1"),
    "timesteps_shift": (lambda v: _number(v) and v > 0, "a number > 0"),
    "step_schedule": (lambda v: v in STEP_SCHEDULES, f"one of {list(STEP_SCHEDULES)}"),
    "sampler": (lambda v: v is None or v in SAMPLERS, f"one of {list(SAMPLERS)}"),
    "noise_level": (lambda v: _number(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "use_norm": (lambda v: isinstance(v, bool), "true or false"),
    "context_noise_std": (lambda v: _number(v) and v >= 0, "a number >= 0"),
    "source_image": (lambda v: v in SOURCE_IMAGE_PLACES, f"one of {list(SOURCE_IMAGE_PLACES)}"),
    "negative_prompt": (lambda v: isinstance(v, str), "a string"),
    "positive_prompt": (lambda v: isinstance(v, str), "a string"),
    "think": (lambda v: isinstance(v, bool), "true or false"),
    "think_edits": (lambda v: isinstance(v, bool), "true or false"),
    "thought_max_tokens": (lambda v: _integer(v) and v >= 1, "an integer >= 1"),
    "edit_thought_tokens": (lambda v: _integer(v) and v >= 0, "an integer >= 0 (0: unpadded)"),
    "edit_source_after_thought": (lambda v: isinstance(v, bool), "true or false"),
    "text_temperature": (lambda v: _number(v) and v >= 0, "a number >= 0 (0: greedy)"),
    "text_top_k": (lambda v: _integer(v) and v >= 0, "an integer >= 0 (0: no top-k)"),
    "text_top_p": (lambda v: _number(v) and 0 < v <= 1, "a number in (0, 1]"),
}
FIELDS = tuple(f.name for f in dataclasses.fields(GenerationSettings))
assert set(FIELDS) == set(_CHECKS), "every setting has a check"


def read_generation_defaults(model_dir: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The model folder's `generation_defaults.json` ({} without the file), split into sampling
    settings and load-time keys (`cpu_dtype`). Bad keys or values are a CheckpointError naming all."""
    path = Path(model_dir) / GENERATION_DEFAULTS_FILE
    if not path.is_file():
        return {}, {}
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(d).__name__}")
    renamed = [f"{old} is now {new}" for old, new in RENAMED.items() if old in d]
    if renamed:
        raise CheckpointError(f"{path}: " + "; ".join(renamed))
    unknown = sorted(set(d) - set(FIELDS) - set(LOAD_KEYS))
    if unknown:
        raise CheckpointError(f"{path}: unknown keys {unknown}; expected some of {list(FIELDS) + list(LOAD_KEYS)}")
    settings = {k: v for k, v in d.items() if k in FIELDS}
    load = {k: v for k, v in d.items() if k in LOAD_KEYS}
    if load.get("cpu_dtype") not in (None, *DTYPE_NAMES):
        raise CheckpointError(f"{path}: cpu_dtype={load['cpu_dtype']!r} (must be {LOAD_KEYS['cpu_dtype']})")
    try:
        GenerationSettings(**settings)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    return settings, load


def parse_size(text: str) -> tuple[int, int]:
    """"S" or "WIDTHxHEIGHT" in pixels (OpenAI's order, e.g. "384x256" is 384 wide) -> (height, width)."""
    parts = text.strip().lower().split("x")
    if not 1 <= len(parts) <= 2 or not all(p.isdigit() for p in parts):
        raise ValueError(f"size must look like 256 or 384x256 (WIDTHxHEIGHT), got {text!r}")
    w, h = int(parts[0]), int(parts[-1])
    return h, w
