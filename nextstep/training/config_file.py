"""Training configs as nested dataclasses, read from TOML with every key and type checked.

A config file is only useful if a typo fails loudly: `lerning_rate = 1e-3`
silently ignored would train with the default for hours. So unknown keys are
rejected by their dotted name (`loss.l3`), missing required keys likewise,
and each value must have its field's type (an int is accepted for a float).

A file may start from another: `base = "base.toml"` (a path relative to the
file that names it) reads that file first and merges this one's tables over
it, key by key; any other value, a list included, replaces the base's. Bases
may chain. The keys are checked on the merged result, so a typo in a base
fails like one in the file itself.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

from ..errors import ConfigError

T = TypeVar("T")


BASE_KEY = "base"


def read_toml(path: str | os.PathLike) -> dict[str, Any]:
    """The TOML file at `path` as a dict, merged over its `base` file (and that one's, ...) if it
    names one; a ConfigError names the file and the problem."""
    return _read_with_bases(Path(path), [])


def _read_with_bases(path: Path, chain: list[Path]) -> dict[str, Any]:
    data = _read_one(path)
    if BASE_KEY not in data:
        return data
    base = data.pop(BASE_KEY)
    if not isinstance(base, str) or not base:
        raise ConfigError(f"config file {path}: {BASE_KEY!r} must be the path of another config file "
                          f"(relative to this one), got {base!r}")
    chain = chain + [path]
    base_path = path.parent / base
    if not base_path.is_file():
        raise ConfigError(f"config file {path}: its base file {base_path} does not exist")
    if any(base_path.resolve() == p.resolve() for p in chain):
        names = " -> ".join(str(p) for p in chain + [base_path])
        raise ConfigError(f"config files base themselves on each other in a cycle: {names}")
    return merge(_read_with_bases(base_path, chain), data)


def _read_one(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` merged over `base` (neither changed): tables in both merge key by key, recursively;
    any other value of `over` (a list too) replaces the base's."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def build(cls: type[T], data: Any, where: str = "") -> T:
    """Make dataclass `cls` from a dict, recursing into dataclass-typed fields.

    `where` is the dotted prefix used in error messages ("" at the top level).
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'the config'} must be a table, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        names = ", ".join(repr(_dotted(where, k)) for k in unknown)
        raise ConfigError(f"unknown config key{'s' if len(unknown) > 1 else ''} {names}; "
                          f"{where or 'the top level'} accepts {sorted(fields)}")
    kwargs = {}
    for name, f in fields.items():
        key = _dotted(where, name)
        if name not in data:
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            if required:
                raise ConfigError(f"missing required config key {key!r}")
            continue
        kwargs[name] = _check(hints[name], data[name], key)
    return cls(**kwargs)


def _dotted(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _check(tp: Any, value: Any, key: str) -> Any:
    """`value` converted to type `tp` (int -> float only), or a ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _check(option, value, key)
            except ConfigError:
                pass
        raise ConfigError(f"config key {key!r} must be {_type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key)
    if origin in (dict,):
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r} must be a table, got {value!r}")
        return dict(value)
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise ConfigError(f"config key {key!r} must be a list, got {value!r}")
        (item,) = typing.get_args(tp)[:1]
        return origin(_check(item, v, f"{key}[{i}]") for i, v in enumerate(value))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    # bool is a subclass of int: `steps = true` must not pass as 1.
    if tp in (int, float) and isinstance(value, bool):
        raise ConfigError(f"config key {key!r} must be {_type_name(tp)}, got {value!r}")
    if tp in (int, float, bool, str) and not isinstance(value, tp):
        raise ConfigError(f"config key {key!r} must be {_type_name(tp)}, got {value!r}")
    return value


def _type_name(tp: Any) -> str:
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string", type(None): "absent"}
    args = typing.get_args(tp)
    if args and typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args if a is not type(None))
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def to_dict(obj: Any) -> dict[str, Any]:
    """A config dataclass as plain JSON-able data (tuples become lists)."""
    def plain(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(obj))
