"""Model options given as text (`--model-option KEY=VALUE`), typed by the module's own fields.

The registry knows each architecture's options (the module's dataclass fields); their type
hints say how a value is read: `true`/`false` for booleans, numbers, one of a `Literal`'s
choices, or comma-separated integers for sequences (`features=16,32,64`). Values that are
already typed (from Python) are checked the same way, so a notebook and the command line
get the same errors.
"""

from __future__ import annotations

import functools
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

from flaxcnn.models.registry import _module_fields, get_spec

# Set by whoever builds the model (the trainer, the summary), never by a user's option.
RESERVED = ("num_classes", "dtype", "axis_name")
_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


def user_options(name: str) -> list[str]:
    """The options of architecture `name` a user may set, sorted."""
    return sorted(k for k in _module_fields(get_spec(name).builder) if k not in RESERVED)


def parse_assignments(values: Sequence[str] | None, flag: str = "--model-option") -> dict[str, str]:
    """Repeated `KEY=VALUE` texts -> {KEY: VALUE} (still text; `parse_options` types them)."""
    options: dict[str, str] = {}
    for value in values or ():
        key, sep, text = value.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"{flag} takes KEY=VALUE, got {value!r}")
        if key in options:
            raise ValueError(f"{flag} {key} is given twice")
        options[key] = text.strip()
    return options


def describe(name: str) -> list[tuple[str, str, str]]:
    """(option, default, what it accepts) for each user option of architecture `name`."""
    builder = get_spec(name).builder
    cls = builder.func if isinstance(builder, functools.partial) else builder
    hints = typing.get_type_hints(cls)
    defaults = _module_fields(builder)
    rows = []
    for key in user_options(name):
        field = defaults[key]
        default = field.default
        if isinstance(builder, functools.partial) and key in builder.keywords:
            default = builder.keywords[key]
        rows.append((key, _show(default), _accepts(hints[key])))
    return rows


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple | list):
        return ",".join(map(str, value))
    return str(value)


def _accepts(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return " | ".join(map(str, args))
    if origin is typing.Union or isinstance(hint, types.UnionType):
        return " | ".join("none" if a is type(None) else _accepts(a) for a in args)
    if hint is bool:
        return "true | false"
    if origin in (tuple, Sequence, list) or origin is typing.Sequence:
        return f"comma-separated {_accepts(args[0]) if args else 'values'}"
    return getattr(hint, "__name__", str(hint))


def parse_options(name: str, raw: Mapping[str, Any]) -> dict[str, Any]:
    """`raw` options of architecture `name`, typed; ValueError (one line) for a bad one.

    An unknown key names the valid ones; a bad value names the key, the value and what the
    option accepts.
    """
    spec = get_spec(name)
    builder = spec.builder
    cls = builder.func if isinstance(builder, functools.partial) else builder
    hints = typing.get_type_hints(cls)
    valid = user_options(name)
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in valid:
            raise ValueError(
                f"{name} has no option {key!r}; its options are: {', '.join(valid) or 'none'}"
            )
        try:
            out[key] = _coerce(value, hints[key])
        except (TypeError, ValueError) as e:
            raise ValueError(f"{name} option {key}={value!r}: {e}") from None
    return out


def _coerce(value: Any, hint: Any) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union or isinstance(hint, types.UnionType):
        is_none = value is None or (isinstance(value, str) and value.lower() == "none")
        if is_none and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg)
            except (TypeError, ValueError) as e:
                errors.append(str(e))
        raise ValueError("; ".join(errors))
    if origin is typing.Literal:
        for choice in args:
            if value == choice or (isinstance(value, str) and value == str(choice)):
                return choice
        raise ValueError(f"expected one of {', '.join(map(str, args))}")
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE + _FALSE:
            return value.lower() in _TRUE
        raise ValueError("expected true or false")
    if hint in (int, float):
        return _number(value, hint)
    if hint is str:
        if isinstance(value, str):
            return value
        raise ValueError("expected text")
    if origin in (tuple, Sequence, list) or origin is typing.Sequence:
        item = args[0] if args else Any
        parts = value.split(",") if isinstance(value, str) else value
        if not isinstance(parts, list | tuple) or not parts:
            raise ValueError("expected comma-separated values")
        return tuple(_coerce(p.strip() if isinstance(p, str) else p, item) for p in parts)
    raise ValueError(f"cannot be set from text (its type is {hint})")


def _number(value: Any, kind: type) -> int | float:
    """An int or float option: a number of that kind, or its text (never a bool)."""
    expected = "an integer" if kind is int else "a number"
    if isinstance(value, bool):
        raise ValueError(f"expected {expected}")
    if isinstance(value, int) or (kind is float and isinstance(value, float)):
        return kind(value)
    if isinstance(value, str):
        try:
            return kind(value)
        except ValueError:
            pass
    raise ValueError(f"expected {expected}")
