"""Operating-point knobs: type-checked overrides of an implementation's ``Config`` dataclass.

Used by ``run --set key=value`` and by the ``operating_points`` of an entry. Pure functions; errors
name the knob and say what was expected.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any

import yaml


class KnobError(ValueError):
    """A knob that the Config does not have, or a value of the wrong type."""


def knob_types(cfg_cls: type) -> dict[str, Any]:
    """Field name -> annotated type of a Config dataclass."""
    if not dataclasses.is_dataclass(cfg_cls):
        raise TypeError(f"{cfg_cls!r} is not a dataclass")
    hints = typing.get_type_hints(cfg_cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cfg_cls)}


def _describe(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def coerce(name: str, value: Any, tp: Any) -> Any:
    """Check `value` against the annotation `tp`; ints widen to floats, lists become tuples."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return coerce(name, value, option)
            except KnobError:
                continue
        raise KnobError(f"{name}: expected {_describe(tp)}, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
        raise KnobError(f"{name}: expected None, got {value!r}")
    if origin is typing.Literal:
        if value in typing.get_args(tp):
            return value
        raise KnobError(f"{name}: expected one of {', '.join(map(repr, typing.get_args(tp)))}, got {value!r}")
    if origin in (tuple, list):
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            value = [value]
        item = args[0] if args else Any
        if len(args) == 2 and args[1] is Ellipsis or len(args) == 1 or not args:
            items = [coerce(f"{name}[{i}]", v, item) for i, v in enumerate(value)]
        else:
            if len(value) != len(args):
                raise KnobError(f"{name}: expected {len(args)} values, got {len(value)}")
            items = [coerce(f"{name}[{i}]", v, t) for i, (v, t) in enumerate(zip(value, args, strict=True))]
        return tuple(items) if origin is tuple else items
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise KnobError(f"{name}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise KnobError(f"{name}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise KnobError(f"{name}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise KnobError(f"{name}: expected a string, got {value!r}")
    if isinstance(value, tp):
        return value
    raise KnobError(f"{name}: expected {_describe(tp)}, got {value!r}")


def parse_assignments(items: Iterable[str]) -> dict[str, Any]:
    """`["k=v", ...]` -> `{k: v}` with YAML scalars (`0.5`, `true`, `[1, 2]`)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise KnobError(f"--set {item!r}: expected key=value")
        try:
            out[key] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            out[key] = raw
    return out


def apply(cfg_cls: type, overrides: Mapping[str, Any], base: Any | None = None) -> Any:
    """A Config with `overrides` applied to `base` (default: the Config's defaults)."""
    types_ = knob_types(cfg_cls)
    clean: dict[str, Any] = {}
    for name, value in overrides.items():
        if name not in types_:
            raise KnobError(f"{name}: unknown knob; known: {', '.join(types_)}")
        clean[name] = coerce(name, value, types_[name])
    cfg = base if base is not None else cfg_cls()
    try:
        return dataclasses.replace(cfg, **clean)
    except (ValueError, TypeError) as exc:  # a Config's own __post_init__ checks
        raise KnobError(str(exc)) from None


def as_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-friendly view of a Config (tuples become lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}
