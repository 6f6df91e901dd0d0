"""The one configuration loader: YAML or TOML files into nested dataclasses, plus CLI overrides.

A job's configuration is a dataclass whose fields may themselves be dataclasses. A file gives any
subset of the fields (the rest keep their documented defaults); ``--set a.b=value`` overrides one
field after the file is read (the value is parsed as YAML, so ``1e-5``, ``true`` and ``[1, 2]``
work). Unknown keys and wrong types are errors that name the field.

Values are then checked, all at once, and every problem is listed in one error: numbers must be
finite, strings at most ``MAX_STRING_CHARS`` characters, lists at most ``MAX_LIST_ITEMS`` items,
and each field in the :class:`Range` its dataclass gives it in ``LIMITS`` (a class attribute).
The command line and the trainer service build configs here, so both refuse the same values.
"""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

from rlhf.errors import ConfigError

T = TypeVar("T")

MAX_STRING_CHARS = 4096  # a path or a version id; longer is a mistake (or an attack), not a config
MAX_LIST_ITEMS = 1024


@dataclass(frozen=True)
class Range:
    """The values a number may take: ``lo``..``hi`` (None: unbounded), each end open or closed."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def __str__(self) -> str:
        lo = "-inf" if self.lo is None else f"{self.lo:g}"
        hi = "inf" if self.hi is None else f"{self.hi:g}"
        return f"{'(' if self.lo_open or self.lo is None else '['}{lo}, {hi}{')' if self.hi_open or self.hi is None else ']'}"

    def contains(self, v: float) -> bool:
        if self.lo is not None and (v < self.lo or (self.lo_open and v == self.lo)):
            return False
        if self.hi is not None and (v > self.hi or (self.hi_open and v == self.hi)):
            return False
        return True


# common ranges
POSITIVE = Range(0, None, lo_open=True)
NON_NEGATIVE = Range(0, None)
UNIT = Range(0, 1)  # a share or a coefficient in [0, 1]
SEED = Range(0, 2**63 - 1)


def count(lo: int = 1, hi: int = 10_000_000) -> Range:
    """Whole numbers of things: ``lo``..``hi``."""
    return Range(lo, hi)


def limits_problems_of_field(obj: Any, name: str) -> bool:
    """Whether field ``name`` of ``obj`` (not a section) is outside its limits."""
    v = getattr(obj, name, None)
    return not dataclasses.is_dataclass(v) and bool(_value_problem(type(obj), name, v, name))


def _value_problem(cls, name: str, v: Any, at: str) -> str | None:
    if isinstance(v, float) and not math.isfinite(v):
        return f"{at}: must be a finite number, got {v}"
    if isinstance(v, str) and len(v) > MAX_STRING_CHARS:
        return f"{at}: {len(v)} characters, at most {MAX_STRING_CHARS}"
    if isinstance(v, (list, tuple, dict)) and len(v) > MAX_LIST_ITEMS:
        return f"{at}: {len(v)} items, at most {MAX_LIST_ITEMS}"
    r = getattr(cls, "LIMITS", {}).get(name)
    if r is not None and isinstance(v, (int, float)) and not isinstance(v, bool) and not r.contains(v):
        return f"{at}: must be in {r}, got {v:g}"
    return None


def limits_problems(obj: Any, where: str = "") -> list[str]:
    """Every value of config ``obj`` (and its sections) outside what it may be."""
    problems = []
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        at = f"{where}.{f.name}" if where else f.name
        if dataclasses.is_dataclass(v):
            problems += limits_problems(v, at)
        elif (p := _value_problem(type(obj), f.name, v, at)) is not None:
            problems.append(p)
    return problems


def read_config_file(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file does not exist: {p}")
    text = p.read_text(encoding="utf-8")
    try:
        data = tomllib.loads(text) if p.suffix == ".toml" else yaml.safe_load(text)
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{p}: cannot parse: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of field names to values")
    return data


def split_override(item: str) -> tuple[str, str]:
    """``a.b=value`` -> (``a.b``, ``value``), the value still a string; ConfigError otherwise."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value")
    key, raw = item.split("=", 1)
    return key, raw


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b=value`` strings onto a nested dict (values parsed as YAML scalars/lists)."""
    out = dict(data)
    for item in overrides:
        key, raw = split_override(item)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {key}: cannot parse {raw!r}: {e}") from e
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.get(part)
            node[part] = dict(child) if isinstance(child, dict) else {}
            node = node[part]
        node[parts[-1]] = value
    return out


def _coerce(value: Any, tp: Any, where: str, problems: list[str] | None = None) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where, problems)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return from_dict(tp, value, where, problems)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        inner = args[0] if args else Any
        items = [_coerce(v, inner, f"{where}[{i}]", problems) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict, where: str = "", problems: list[str] | None = None) -> T:
    """Build dataclass ``cls`` from ``data``, checking every key, type and value.

    Unknown keys and wrong types raise at once; values a dataclass rejects (its ``__post_init__``)
    and values outside their limits are collected over the whole config and raised together.
    """
    top = problems is None
    problems = [] if top else problems
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(f"unknown field {prefix}{unknown[0]} (known: {', '.join(sorted(names))})")
    kwargs = {}
    for k, v in data.items():
        kwargs[k] = _coerce(v, hints[k], f"{where}.{k}" if where else k, problems)
    try:
        obj = cls(**kwargs)
    except (TypeError, ValueError) as e:  # ConfigError too: its __post_init__ refused a value
        obj = _unchecked(cls, kwargs)  # so that the other fields are checked too
        msg = str(e)
        # said better by the limits (which name the value), unless it is about other fields
        out_of_limits = {f.name for f in dataclasses.fields(cls) if limits_problems_of_field(obj, f.name)}
        if not any(re.search(rf"\b{re.escape(n)}\b", msg) for n in out_of_limits):
            problems.append(msg if where and msg.startswith(where) else f"{where or cls.__name__}: {msg}")
    if not top:
        return obj
    problems += [p for p in limits_problems(obj) if p not in problems]
    if problems:
        n = len(problems)
        raise ConfigError(f"{n} invalid value{'s' if n > 1 else ''}: " + "; ".join(problems))
    return obj


def _unchecked(cls: type[T], kwargs: dict) -> T:
    """An instance of ``cls`` without running its ``__post_init__`` (only to check the rest)."""
    obj = cls.__new__(cls)
    for f in dataclasses.fields(cls):
        if f.name in kwargs:
            v = kwargs[f.name]
        elif f.default is not dataclasses.MISSING:
            v = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            v = f.default_factory()  # type: ignore[misc]
        else:
            continue
        object.__setattr__(obj, f.name, v)
    return obj


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Read a YAML/TOML file (optional) into ``cls`` with ``key=value`` overrides applied."""
    data = read_config_file(path) if path else {}
    data = apply_overrides(data, overrides or [])
    return from_dict(cls, data)


def to_dict(obj: Any) -> Any:
    """A dataclass config as plain data (for manifests and summaries)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj
