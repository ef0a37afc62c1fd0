"""Typed construction of the config dataclasses (k2jax/config.py) from plain data.

A mapping from YAML, JSON or a checkpoint becomes a dataclass whose every field was checked
against its type hint; a wrong name or type raises ConfigError naming the dotted key. Generic
over the dataclass, so the schema module imports this one, never the other way round.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Literal, Union

from k2jax.errors import ConfigError


def check_type(key: str, value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return check_type(key, value, arg)
            except ConfigError:
                pass
        raise ConfigError(key, f"expected {describe_type(hint)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(key, f"expected one of {list(args)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, f"expected a list, got {value!r}")
        return [check_type(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping, got {value!r}")
        return {k: check_type(f"{key}.{k}", v, args[1]) for k, v in value.items()}
    if dataclasses.is_dataclass(hint):
        return build_section(hint, value, key)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, f"expected a number, got {value!r}")
        if not math.isfinite(value):  # an inf learning rate trained NaN parameters, exit 0
            raise ConfigError(key, f"expected a finite number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {hint} for {key}")


def describe_type(hint: Any) -> str:
    """'int or 'auto' or null' for Optional[Union[int, Literal['auto']]]: a Literal is
    spelled as its values, never as the word Literal."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    names = []
    for arg in args:
        if typing.get_origin(arg) is Literal:
            names += [repr(v) for v in typing.get_args(arg)]
        else:
            names.append(getattr(arg, "__name__", str(arg)))
    return " or ".join(names) + (" or null" if type(None) in typing.get_args(hint) else "")


def build_section(cls: type, data: Any, prefix: str) -> Any:
    """An instance of the dataclass `cls` from a mapping (None: all defaults); `prefix` is the
    dotted key of the section ('model', '' for the root) that errors name. Not validated."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(prefix or "<root>", f"expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else key
        if key not in names:
            raise ConfigError(dotted, f"unknown key (known: {', '.join(sorted(names))})")
        kwargs[key] = check_type(dotted, value, hints[key])
    return cls(**kwargs)
