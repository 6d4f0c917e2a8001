"""The VAE's config.json: the reference's `AutoEncoderParams`, plus which official family it is for."""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import FAMILIES
from ..errors import ConfigError

CONFIG_NAME = "config.json"

# What the NextStep-1.1 loader assumes for keys its config.json omits (1.0's are the field defaults).
FAMILY_DEFAULTS = {"nextstep-1.1": dict(scaling_factor=1.0, shift_factor=0.0, deterministic=True,
                                        encoder_norm=True, psz=1)}


@dataclass
class VAEConfig:
    """The reference's `AutoEncoderParams`, with the same defaults.

    `family` says which official code the folder was made for: NextStep-1.1
    wraps the same weights in diffusers' AutoencoderKL, whose encoder widens
    to `ch * ch_mult[0]` at `conv_in` (Flux's stays at `ch`; they agree when
    ch_mult[0] == 1, as in the released tokenizer), applies `encoder_norm`
    only with `psz` set, and has other defaults for missing keys.
    """

    resolution: int = 256  # only informational: no layer depends on it
    in_channels: int = 3
    ch: int = 128
    out_ch: int = 3
    ch_mult: tuple[int, ...] = field(default=(1, 2, 4, 4))
    num_res_blocks: int = 2
    z_channels: int = 16
    scaling_factor: float = 0.3611
    shift_factor: float = 0.1159
    deterministic: bool = False
    encoder_norm: bool = False
    psz: int | None = None
    family: str = "nextstep-1"

    def __post_init__(self) -> None:
        # JSON gives lists; a tuple keeps the config hashable and immutable-looking.
        self.ch_mult = tuple(int(m) for m in self.ch_mult)
        if self.family not in FAMILIES:
            raise ConfigError(f"unknown VAE family {self.family!r}; expected one of {tuple(FAMILIES)}")

    @classmethod
    def from_dict(cls, d: dict[str, Any], family: str | None = None) -> "VAEConfig":
        """`family` (or a "family" key) picks the defaults for missing keys; see the class doc."""
        family = family or d.get("family", "nextstep-1")
        d = {**FAMILY_DEFAULTS.get(family, {}), **d, "family": family}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            # The reference ignores these with a log line; we do the same, but loudly enough to notice.
            warnings.warn(f"VAEConfig: ignoring unknown config keys {unknown}", stacklevel=2)
        try:
            return cls(**{k: v for k, v in d.items() if k in known})
        except (TypeError, ValueError) as e:
            raise ConfigError(f"invalid VAE config: {e}") from e

    @classmethod
    def from_pretrained(cls, folder_or_json: str | os.PathLike, family: str | None = None) -> "VAEConfig":
        path = Path(folder_or_json)
        if path.is_dir():
            path = path / CONFIG_NAME
        try:
            d = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot read VAE config {path}: {e}") from e
        if not isinstance(d, dict):
            raise ConfigError(f"VAE config {path} must hold a JSON object, got {type(d).__name__}")
        return cls.from_dict(d, family)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["ch_mult"] = list(self.ch_mult)
        if self.family == "nextstep-1":
            del d["family"]  # the official layout; official loaders ignore the key for 1.1
        return d
