"""Typed configuration: dataclasses filled from YAML files and ``key=value`` overrides.

A config is a (possibly nested) dataclass. :func:`load_config` reads a YAML file, applies
dotted command-line overrides (``optim.lr=1e-5``), and builds the dataclass, checking every
value against the field's type hint. Unknown keys, wrong types and missing required values
raise :class:`ConfigError`, whose message names the dotted key and where the value came from
(the file, or the override that set it).

Supported field types: ``bool``, ``int``, ``float``, ``str``, ``pathlib.Path``, ``Literal[...]``,
``X | None``, ``list[X]``, ``tuple[X, ...]``, ``tuple[X, Y]``, ``dict[str, X]``, ``Any`` and
nested dataclasses.

YAML is read with the YAML 1.2 core schema, not PyYAML's YAML 1.1: only ``true``/``false`` are
booleans (1.1 also reads ``no``, ``yes``, ``on``, ``off`` as booleans, so accelerate's own
``mixed_precision: no`` became ``False``), ``1e-4`` is a float, ``010`` is 10. And a value meets
its field's type before it is interpreted:

- a string, path or string-literal field takes an unquoted value as it is written (``no``,
  ``0.10``, ``1984``, ``2024_01``), in files and overrides alike;
- a bool field takes ``true``/``false`` and, as YAML 1.1 users write them, ``yes``/``no``/``on``/``off``;
- a float field takes an int or a numeric string, and refuses NaN and infinities;
- an override's value is parsed as YAML, except for ``str`` fields, which take the text as is
  (so ``name=123`` sets the string ``"123"``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import math
import re
import sys
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

T = TypeVar("T")

__all__ = [
    "AT_LEAST_ONE",
    "NON_NEGATIVE",
    "POSITIVE",
    "UNIT",
    "ConfigError",
    "Range",
    "add_config_arguments",
    "build",
    "check_ranges",
    "claim_settings",
    "config_from_args",
    "declared_ranges",
    "describe",
    "load_config",
    "packaged_config",
    "parse_overrides",
    "to_dict",
]


class ConfigError(ValueError):
    """A configuration value is missing, unknown or of the wrong type."""


@dataclasses.dataclass(frozen=True)
class Range:
    """The valid values of a numeric setting: between ``low`` and ``high`` (None: unbounded), each
    bound included unless marked open. A class declares its settings' ranges in a class attribute
    ``ranges: ClassVar[dict[str, Range]]`` (merged with its bases') and calls
    :func:`check_ranges` from ``__post_init__``, so that a value that would make a loss constant
    or invert it (a beta of 0, a negative temperature) is refused when the object is built."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return bool(above and below)  # NaN: neither

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        if self.low is None:
            return f"{'<' if self.high_open else '<='} {self.high:g}"
        left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
        return f"in {left}{self.low:g}, {self.high:g}{right}"


POSITIVE = Range(0, low_open=True)
NON_NEGATIVE = Range(0)
AT_LEAST_ONE = Range(1)
UNIT = Range(0, 1)


def declared_ranges(cls: type) -> dict[str, Range]:
    """The ``ranges`` of ``cls`` and its bases, a subclass's overriding its bases'."""
    out: dict[str, Range] = {}
    for klass in reversed(cls.__mro__):
        out.update(vars(klass).get("ranges", {}))
    return out


def check_ranges(obj: Any) -> None:
    """Raise ``ValueError`` naming the first setting of ``obj`` outside its declared range (each
    element of a tuple or list is checked; None, an unset value, passes)."""
    for name, allowed in declared_ranges(type(obj)).items():
        value = getattr(obj, name)
        for v in value if isinstance(value, (tuple, list)) else [value]:
            if v is not None and v not in allowed:
                raise ValueError(f"{name} must be {allowed}, got {value}")


@dataclasses.dataclass(frozen=True)
class _Scalar:
    """An unquoted YAML scalar: its text, kept until the field's type says how to read it."""

    text: str

    @property
    def value(self) -> Any:
        """The YAML 1.2 core-schema value: None, bool, int, float or the text itself."""
        t = self.text
        if t in ("", "~", "null", "Null", "NULL"):
            return None
        if t in ("true", "True", "TRUE", "false", "False", "FALSE"):
            return t.lower() == "true"
        if re.fullmatch(r"[-+]?[0-9]+", t):
            return int(t)
        if re.fullmatch(r"0o[0-7]+|0x[0-9a-fA-F]+", t):
            return int(t[2:], 8 if t[1] == "o" else 16)
        if re.fullmatch(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?", t):
            return float(t)
        if re.fullmatch(r"[-+]?\.(inf|Inf|INF)|\.(nan|NaN|NAN)", t):
            return float(t.replace(".", ""))
        return t


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with no implicit typing: every unquoted scalar becomes a ``_Scalar``."""

    yaml_implicit_resolvers: dict = {}  # noqa: RUF012 (PyYAML's class-level registry)

    def construct_yaml_str(self, node: yaml.Node) -> Any:
        text = self.construct_scalar(node)
        return _Scalar(text) if node.style is None else text

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict:
        mapping = super().construct_mapping(node, deep=deep)
        return {k.text if isinstance(k, _Scalar) else k: v for k, v in mapping.items()}


_Loader.add_constructor("tag:yaml.org,2002:str", _Loader.construct_yaml_str)
_Loader.add_implicit_resolver("tag:yaml.org,2002:merge", re.compile(r"^(?:<<)$"), ["<"])  # anchors' <<


def _read_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # a SafeLoader subclass: safe


def _plain(value: Any) -> Any:
    """``value`` with every ``_Scalar`` replaced by its YAML 1.2 value (for untyped ``Any`` fields)."""
    if isinstance(value, _Scalar):
        return value.value
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _takes_text(tp: Any) -> bool:
    """Whether a field of type ``tp`` reads an unquoted scalar as the text written."""
    if tp in (str, Path):
        return True
    args = typing.get_args(tp)
    return typing.get_origin(tp) is Literal and all(isinstance(a, str) for a in args)


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


def _override_mapping(value: _Override) -> dict | None:
    """The mapping an override's value spells, or None (another value, or no valid YAML)."""
    try:
        parsed = _read_yaml(value.raw)
    except yaml.YAMLError:
        return None
    return parsed if isinstance(parsed, dict) else None


def _nest_overrides(data: dict[str, Any], overrides: Mapping[str, _Override]) -> dict[str, Any]:
    data = dict(data)
    for dotted, value in overrides.items():
        node = data
        parts = dotted.split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if isinstance(child, _Override):  # `objective={name: ipo} objective.beta=2` refines it
                child = _override_mapping(child) or child
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


def packaged_config(*parts: str) -> Path:
    """A YAML config shipped with diffalign (``configs/`` in a checkout, ``diffalign.configs`` in
    an installed wheel), e.g. ``packaged_config("demo", "diffusion_dpo.yaml")``.

    Raises:
        FileNotFoundError: naming the configs that exist beside it.
    """
    from importlib.resources import files

    root = Path(str(files("diffalign.configs")))
    path = root.joinpath(*parts)
    if not path.is_file():
        folder = path.parent
        known = sorted(p.name for p in folder.glob("*.yaml")) if folder.is_dir() else []
        raise FileNotFoundError(
            f"no packaged config {'/'.join(parts)} (in {folder}: {', '.join(known) or 'none'})"
        )
    return path


def _packaged_hint(path: Path) -> str:
    """Where diffalign ships a config of that name (``configs/...`` of a checkout, when installed)."""
    parts = path.parts[1:] if path.parts[:1] == ("configs",) else path.parts
    try:
        return f" (diffalign ships one at {packaged_config(*parts).resolve()})" if parts else ""
    except (FileNotFoundError, ValueError):
        return ""


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Build ``cls`` from a YAML file and ``key=value`` overrides (either may be absent)."""
    data: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}{_packaged_hint(path)}")
        try:
            loaded = _read_yaml(path.read_text())
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from err
        if loaded is None or (isinstance(loaded, _Scalar) and loaded.value is None):
            loaded = {}
        if not isinstance(loaded, dict):
            kind = type(_plain(loaded)).__name__
            raise ConfigError(f"{path}: the top level must be a mapping of keys, got {kind}")
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
            value = _read_yaml(value.raw) if value.raw.strip() else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"{where}: cannot parse value for '{key}': {err}") from err
    if isinstance(value, _Scalar) and typing.get_origin(tp) not in (Union, types.UnionType):
        value = value.text if _takes_text(tp) and value.value is not None else _plain(value)

    def wrong(expected: str | None = None) -> ConfigError:
        shown = _plain(value)
        return ConfigError(
            f"{where}: '{key}' must be {expected or _type_name(tp)}, got {shown!r} ({type(shown).__name__})"
        )

    if tp is Any:  # nested mappings may hold overrides of their own keys (`a.b.c=1` into a dict field)
        if isinstance(value, Mapping):
            return {k: _convert(v, Any, f"{key}.{k}", where) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [_convert(v, Any, f"{key}[{i}]", where) for i, v in enumerate(value)]
        return _plain(value)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Union or origin is types.UnionType:
        if _plain(value) is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return _convert(value, option, key, where)
            except ConfigError as err:
                errors.append(err)
        if len(options) == 1:  # X | None: X's own message says what is wrong (a nested key, say)
            raise errors[0]
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
        if isinstance(value, str) and value.lower() in _YAML11_BOOLEANS:
            return _YAML11_BOOLEANS[value.lower()]
        raise wrong("true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and re.fullmatch(r"[-+]?[0-9][0-9_]*", value):
            return int(value)  # 1_000: YAML 1.1 and Python read it as an integer, YAML 1.2 does not
        raise wrong("an integer")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            with contextlib.suppress(ValueError):
                number = float(value)
        if number is not None and math.isfinite(number):
            return number
        raise wrong("a finite number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise wrong("a string")
    if tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
        raise wrong("a path")
    raise ConfigError(f"{where}: '{key}' has unsupported type {tp!r} in the config schema")


_YAML11_BOOLEANS = {"true": True, "false": False, "yes": True, "no": False, "on": True, "off": False}


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


def claim_settings(folder: Path, name: str, settings: dict[str, Any], what: str) -> bool:
    """Record the ``settings`` that decide what a resumable run writes into ``folder`` (the JSON file
    ``name``), or check a restart against the recorded ones. Returns True on a restart whose
    settings match (the caller then reuses what is there), False when the file was written now.

    Raises:
        ConfigError: ``folder`` holds ``what`` made with other settings, naming each that differs
            and its earlier value.
    """
    import json

    settings = json.loads(json.dumps(settings, default=str))  # as the file holds them
    path = Path(folder) / name
    if path.is_file():
        earlier = json.loads(path.read_text())
        changed = sorted(k for k in settings.keys() | earlier.keys() if settings.get(k) != earlier.get(k))
        if changed:
            raise ConfigError(
                f"{folder} holds {what} made with other settings ({', '.join(changed)} differ: "
                f"{', '.join(f'{k}={earlier.get(k)!r}' for k in changed)}); use a new output_dir or the "
                "same settings"
            )
        return True
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{name}.tmp")
    tmp.write_text(json.dumps(settings, indent=2) + "\n")
    tmp.replace(path)
    return False
