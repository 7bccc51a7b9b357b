"""Typed, frozen configuration from plain dicts: unknown keys, wrong types, values out of
their choices or ranges are errors that name the key (the sections live in
:mod:`pipeline.config`)."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, ClassVar, TypeVar

T = TypeVar("T")


class UserError(Exception):
    """Something the user fixes (a file, a param, a network setting), not a bug: command
    lines print its message as one line."""


class ConfigError(UserError, ValueError):
    """A parameter is unknown, missing, of the wrong type or out of range."""


class Checked:
    """Checks a config section at construction: ``CHOICES`` (key -> allowed values) and
    ``RANGES`` (key -> (low, high), inclusive; None = open)."""

    SECTION: ClassVar[str] = ""
    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {}
    RANGES: ClassVar[dict[str, tuple[float | None, float | None]]] = {}

    def __post_init__(self) -> None:
        for key, allowed in self.CHOICES.items():
            self.check_choice(key, allowed)
        for key, (low, high) in self.RANGES.items():
            value = getattr(self, key)
            if not math.isfinite(value) or (low is not None and value < low) or \
                    (high is not None and value > high):
                span = f"[{'-inf' if low is None else low}, {'inf' if high is None else high}]"
                raise ConfigError(f"{self.SECTION}.{key}: {value!r} is outside {span}")

    def check_choice(self, key: str, allowed: tuple[str, ...]) -> None:
        """Raise a ConfigError naming ``key`` unless its value is one of ``allowed``."""
        if getattr(self, key) not in allowed:
            shown = ", ".join(allowed[:12]) + (f", ... ({len(allowed)} in all)" if len(allowed) > 12 else "")
            raise ConfigError(f"{self.SECTION}.{key}: {getattr(self, key)!r} is not one of {shown}")


def from_dict(cls: type[T], data: dict[str, Any] | None, where: str = "") -> T:
    """Build dataclass ``cls`` from ``data``, recursing into nested dataclasses.

    Raises:
        ConfigError: on an unknown key, naming it and the known ones.
    """
    data = dict(data or {})
    where = where or cls.__name__
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown key(s) {unknown} in '{where}'; known keys: {sorted(names)}"
        )
    kwargs = {}
    for key, value in data.items():
        kwargs[key] = _coerce(hints[key], value, f"{where}.{key}")
    try:
        return cls(**kwargs)
    except TypeError as exc:  # missing required field
        raise ConfigError(f"{where}: {exc}") from None


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"'{where}' must be a mapping, got {value!r}")
        return from_dict(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(tp):
            return None
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
        return _coerce(tp, value, where)
    if origin is tuple:
        return tuple(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"'{where}' must be a mapping, got {value!r}")
        item = typing.get_args(tp)[1]
        return {k: _coerce(item, v, f"{where}.{k}") for k, v in value.items()}
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and not isinstance(value, tp):
        raise ConfigError(f"'{where}' must be {tp.__name__}, got {value!r}")
    if tp is int and isinstance(value, bool):
        raise ConfigError(f"'{where}' must be int, got {value!r}")
    return value


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain-dict view of a config, for logging to MLflow."""
    return dataclasses.asdict(cfg)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested dicts into dotted keys (``augment.hflip``)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
