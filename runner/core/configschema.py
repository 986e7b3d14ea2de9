"""Plugin configs: JSON text checked against a typed declaration, once, at PrepareConf.

A plugin declares its config as a dataclass (or any supported type: str, int, float,
bool, None, list[T], tuple[T, ...], dict[str, T], unions, Literal, Enum, nested
dataclasses, Any). ``load_config`` parses the gateway's JSON string and builds that type,
or raises ConfigError with the path of the offending field. A dataclass's
``__post_init__`` may reject a value: ``raise ConfigError("field", "why")`` names the
field (nested dataclasses get the full dotted path); a plain ValueError/TypeError keeps
its message and names no field.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin


class ConfigError(ValueError):
    """A plugin config does not match its declaration. ``field`` is a dotted path."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"field {field!r}: {reason}" if field else reason)
        self.field = field
        self.reason = reason


def load_config(declared: Any, raw: str) -> Any:
    """Parse ``raw`` (the gateway's JSON string) into the ``declared`` type.

    An empty string is not JSON: a plugin that declares a config refuses it like any
    other invalid JSON (an auth plugin must not run on its defaults because an operator
    left its config blank). Only a plugin without config takes ``""``.

    Error messages name the field and what was expected, never the value given: they
    end up in the gateway's error log, and a config value may be a secret.
    """
    text = raw.strip()
    no_config = declared is None or declared is type(None)
    if not text:
        if no_config:
            return None
        raise ConfigError("", "invalid JSON: the config is empty (write {} for the defaults)")
    try:
        data = json.loads(text)
    except ValueError as exc:
        # json's message gives a position, never the text around it.
        raise ConfigError("", f"invalid JSON: {exc}") from None
    if no_config:
        # A plugin without config: the gateway's schema forces a string, so accept the
        # spellings of "nothing" an operator is likely to write.
        if data not in (None, {}):
            raise ConfigError("", f"this plugin takes no config, got {_kind(data)}")
        return None
    return convert(declared, data)


def convert(declared: Any, value: Any, path: str = "") -> Any:
    """Build ``declared`` from a decoded JSON value, checking every field."""
    if declared is Any or declared is object:
        return value
    if declared is None or declared is type(None):
        if value is not None:
            raise ConfigError(path, f"expected null, got {_kind(value)}")
        return None
    if dataclasses.is_dataclass(declared) and isinstance(declared, type):
        return _convert_dataclass(declared, value, path)
    origin = get_origin(declared)
    if origin is Union or origin is types.UnionType:
        return _convert_union(declared, value, path)
    if origin is Literal:
        if value not in get_args(declared):
            choices = ", ".join(repr(a) for a in get_args(declared))
            raise ConfigError(path, f"expected one of {choices}")
        return value
    if origin in (list, tuple, typing.Sequence) or declared in (list, tuple):
        return _convert_sequence(declared, origin, value, path)
    if origin is dict or declared is dict:
        return _convert_mapping(declared, value, path)
    if isinstance(declared, type) and issubclass(declared, enum.Enum):
        try:
            return declared(value)
        except ValueError:
            choices = ", ".join(repr(m.value) for m in declared)
            raise ConfigError(path, f"expected one of {choices}") from None
    if declared is bool:
        if not isinstance(value, bool):
            raise ConfigError(path, f"expected true or false, got {_kind(value)}")
        return value
    if declared is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(path, f"expected an integer, got {_kind(value)}")
        return value
    if declared is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(path, f"expected a number, got {_kind(value)}")
        return float(value)
    if declared is str:
        if not isinstance(value, str):
            raise ConfigError(path, f"expected a string, got {_kind(value)}")
        return value
    raise TypeError(f"config type {declared!r} is not supported (at {path or 'top level'})")


def describe(declared: Any) -> str:
    """A one-line summary of a config declaration, for ``a6-runner plugins``."""
    if dataclasses.is_dataclass(declared) and isinstance(declared, type):
        hints = typing.get_type_hints(declared)
        parts = []
        for f in dataclasses.fields(declared):
            if not f.init:
                continue
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            default = "" if required else f" = {_default_of(f)!r}"
            parts.append(f"{f.name}: {_type_name(hints[f.name])}{default}")
        return "{" + ", ".join(parts) + "}"
    return _type_name(declared)


def _default_of(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()  # type: ignore[operator]


def _type_name(declared: Any) -> str:
    if declared is Any:
        return "any"
    if declared is type(None):
        return "null"
    if isinstance(declared, type) and not get_args(declared):
        return declared.__name__
    return str(declared).replace("typing.", "")


def _convert_dataclass(declared: type, value: Any, path: str) -> Any:
    if not isinstance(value, dict):
        raise ConfigError(path, f"expected an object, got {_kind(value)}")
    hints = typing.get_type_hints(declared)
    fields = {f.name: f for f in dataclasses.fields(declared) if f.init}
    unknown = sorted(set(value) - set(fields))
    if unknown:
        known = ", ".join(fields) or "none"
        raise ConfigError(_join(path, unknown[0]), f"unknown field (known fields: {known})")
    kwargs = {}
    for name, f in fields.items():
        sub = _join(path, name)
        if name in value:
            kwargs[name] = convert(hints[name], value[name], sub)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(sub, "required field is missing")
    try:
        return declared(**kwargs)
    except ConfigError as exc:
        # Raised by __post_init__ with a field name relative to its own dataclass.
        raise ConfigError(_join(path, exc.field) if exc.field else path, exc.reason) from None
    except (ValueError, TypeError) as exc:
        raise ConfigError(path, str(exc)) from None


def _convert_union(declared: Any, value: Any, path: str) -> Any:
    members = get_args(declared)
    if value is None and type(None) in members:
        return None
    errors = []
    for member in members:
        if member is type(None):
            continue
        try:
            return convert(member, value, path)
        except ConfigError as exc:
            errors.append(exc.reason)
    raise ConfigError(path, " or ".join(dict.fromkeys(errors)))


def _convert_sequence(declared: Any, origin: Any, value: Any, path: str) -> Any:
    if not isinstance(value, list):
        raise ConfigError(path, f"expected an array, got {_kind(value)}")
    args = get_args(declared)
    if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
        if len(value) != len(args):
            raise ConfigError(path, f"expected an array of {len(args)} items, got {len(value)}")
        pairs = enumerate(zip(args, value, strict=True))
        return tuple(convert(a, v, f"{path}[{i}]") for i, (a, v) in pairs)
    item = args[0] if args else Any
    items = [convert(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
    return tuple(items) if origin is tuple or declared is tuple else items


def _convert_mapping(declared: Any, value: Any, path: str) -> Any:
    if not isinstance(value, dict):
        raise ConfigError(path, f"expected an object, got {_kind(value)}")
    args = get_args(declared)
    item = args[1] if len(args) == 2 else Any
    return {k: convert(item, v, _join(path, k)) for k, v in value.items()}


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _kind(value: Any) -> str:
    """What sort of JSON value was given, never the value: it may be a secret."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"
