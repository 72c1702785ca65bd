"""Typed configuration: dataclasses filled from YAML files and ``key=value`` overrides.

A config is a (possibly nested) dataclass. :func:`load_config` reads a YAML file, applies
dotted command-line overrides (``optim.lr=1e-5``), and builds the dataclass, checking every
value against the field's type hint. Unknown keys, wrong types and missing required values
raise :class:`ConfigError`, whose message names the dotted key and where the value came from
(the file, or the override that set it).

Supported field types: ``bool``, ``int``, ``float``, ``str``, ``pathlib.Path``, ``Literal[...]``,
``X | None``, ``list[X]``, ``tuple[X, ...]``, ``tuple[X, Y]``, ``dict[str, X]``, ``Any`` and
nested dataclasses.

Two conveniences, both because YAML and shells make them necessary:
- a float field accepts an int and a numeric string (PyYAML reads ``1e-4`` as a string);
- an override's value is parsed as YAML, except for ``str`` fields, which take the text as is
  (so ``name=123`` sets the string ``"123"``).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import sys
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

T = TypeVar("T")

__all__ = [
    "ConfigError",
    "add_config_arguments",
    "build",
    "config_from_args",
    "describe",
    "load_config",
    "parse_overrides",
    "to_dict",
]


class ConfigError(ValueError):
    """A configuration value is missing, unknown or of the wrong type."""


@dataclasses.dataclass(frozen=True)
class _Override:
    """A value set on the command line: kept raw until the field's type is known."""

    raw: str
    text: str  # the whole ``key=value`` argument, for error messages


def parse_overrides(args: Sequence[str]) -> dict[str, _Override]:
    """Parse ``key.sub=value`` arguments into a dotted-key mapping."""
    out: dict[str, _Override] = {}
    for arg in args:
        key, sep, raw = arg.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {arg!r} is not of the form key=value (dotted keys allowed)")
        out[key] = _Override(raw=raw, text=arg)
    return out


def _nest_overrides(data: dict[str, Any], overrides: Mapping[str, _Override]) -> dict[str, Any]:
    data = dict(data)
    for dotted, value in overrides.items():
        node = data
        parts = dotted.split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = {}
            elif not isinstance(child, dict):
                raise ConfigError(
                    f"override {value.text!r}: '{'.'.join(parts[: i + 1])}' is a value, not a section"
                )
            else:
                child = dict(child)
            node[part] = child
            node = child
        node[parts[-1]] = value
    return data


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Build ``cls`` from a YAML file and ``key=value`` overrides (either may be absent)."""
    data: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from err
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(loaded).__name__}")
        data = loaded
    return build(cls, _nest_overrides(data, parse_overrides(overrides)), source=source)


def build(cls: type[T], data: Mapping[str, Any], source: str = "<dict>", prefix: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, checking keys and types.

    ``source`` names where ``data`` came from and ``prefix`` the dotted path of ``cls`` within
    the whole config; both only serve error messages.
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: '{prefix.rstrip('.') or '<root>'}' must be a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = unknown[0]
        where = data[key].text if isinstance(data[key], _Override) else source
        close = difflib.get_close_matches(str(key), list(fields), n=1)
        hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; known keys: {', '.join(fields)}"
        raise ConfigError(f"{where}: unknown key '{prefix}{key}'{hint}")
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        key = f"{prefix}{name}"
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{source}: missing required key '{key}'")
            continue
        value = data[name]
        where = value.text if isinstance(value, _Override) else source
        kwargs[name] = _convert(value, hints[name], key, where)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"{source}: invalid '{prefix.rstrip('.') or cls.__name__}': {err}") from err


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str, where: str) -> Any:
    if isinstance(value, _Override):
        if tp is str or (_is_optional(tp) and str in typing.get_args(tp)):
            return None if _is_optional(tp) and value.raw.strip() in ("null", "~") else value.raw
        try:
            value = yaml.safe_load(value.raw) if value.raw.strip() else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"{where}: cannot parse value for '{key}': {err}") from err

    def wrong(expected: str | None = None) -> ConfigError:
        return ConfigError(
            f"{where}: '{key}' must be {expected or _type_name(tp)}, got {value!r} ({type(value).__name__})"
        )

    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Union or origin is types.UnionType:
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return _convert(value, option, key, where)
            except ConfigError as err:
                errors.append(err)
        raise wrong(" or ".join(_type_name(a) for a in args)) from errors[0]
    if origin is Literal:
        if value in args and not isinstance(value, bool):
            return value
        raise wrong("one of " + ", ".join(repr(a) for a in args))
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise wrong(f"a mapping (section {_type_name(tp)})")
        return build(tp, value, source=where, prefix=f"{key}.")
    if origin in (list, tuple, Sequence):
        if not isinstance(value, (list, tuple)):
            raise wrong(f"a list ({_type_name(tp)})")
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise wrong(f"a list of {len(args)} items")
            items = [
                _convert(v, a, f"{key}[{i}]", where) for i, (v, a) in enumerate(zip(value, args, strict=True))
            ]
        else:
            item_tp = args[0] if args else Any
            items = [_convert(v, item_tp, f"{key}[{i}]", where) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise wrong("a mapping")
        val_tp = args[1] if args else Any
        return {str(k): _convert(v, val_tp, f"{key}.{k}", where) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise wrong("true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise wrong("an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise wrong("a number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise wrong("a string")
    if tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
        raise wrong("a path")
    raise ConfigError(f"{where}: '{key}' has unsupported type {tp!r} in the config schema")


def _is_optional(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType) and type(None) in typing.get_args(tp)


def to_dict(config: Any) -> dict[str, Any]:
    """A config as plain data (for logging and saving next to checkpoints)."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v) if f.init}
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(config)


def describe(cls: type, prefix: str = "") -> str:
    """One line per key of a config dataclass: dotted name, type, default, and its ``help``
    metadata (for ``--help`` epilogs, so that every option is documented where it is used)."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            lines.append(describe(tp, f"{prefix}{f.name}."))
            continue
        if f.default is not dataclasses.MISSING:
            default = f"default {f.default!r}"
        elif f.default_factory is not dataclasses.MISSING:
            default = f"default {f.default_factory()!r}"
        else:
            default = "required"
        name = _type_name(tp).replace("pathlib.", "")
        lines.append(f"  {prefix}{f.name} ({name}; {default}): {f.metadata.get('help', '')}".rstrip(": "))
    return "\n".join(lines)


def add_config_arguments(parser: argparse.ArgumentParser, cls: type, required: bool = False) -> None:
    """``--config FILE`` and ``key=value`` overrides for ``cls``, with every key in ``--help``."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = "config keys (YAML or key=value):\n" + describe(cls)
    parser.add_argument("--config", required=required, default=None, help="YAML config file (keys below)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, dotted keys allowed (a.b=1)")


def config_from_args(cls: type[T], args: argparse.Namespace, prog: str) -> T:
    """The config named by parsed ``add_config_arguments``; a config error exits with status 2."""
    try:
        return load_config(cls, args.config, args.overrides)
    except ConfigError as err:
        print(f"{prog}: config error: {err}", file=sys.stderr)
        raise SystemExit(2) from err
