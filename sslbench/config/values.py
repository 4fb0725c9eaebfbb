"""Typed values for the config: ``key=value`` text and YAML values coerced to a dataclass field's
annotated type (numbers, booleans, tuples, Literal choices, optional fields), one-line errors that
name the key and the expected type, and dataclasses updated from and turned into plain dicts.
Used by :mod:`sslbench.config`."""

from __future__ import annotations

import ast
import dataclasses
import difflib
import math
import types
import typing
from dataclasses import fields, is_dataclass
from typing import Any, Literal, Union

from sslbench.core.errors import UserError


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def parse_literal(text: str) -> Any:
    """Parse a CLI value: numbers, booleans, None, tuples (``16,32,64``), else the plain string."""
    low = text.strip().lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    if low in ("none", "null"):
        return None
    if "," in text and not text.strip().startswith(("[", "(", "{")):
        items = text.split(",")
        if items[-1].strip() == "":
            items.pop()  # "16," is a one-element tuple
        if any(t.strip() == "" for t in items):
            raise UserError(f"{text!r} has an empty item between commas; separate the items by single commas")
        return tuple(parse_literal(t) for t in items)
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert ``value`` (from YAML or the command line) to the field type ``tp`` or raise a
    one-line :class:`UserError` naming the key and the expected type."""
    base, optional = _strip_optional(tp)
    raw = value  # what the user wrote, for messages
    if value is None:
        if optional or base is Any:
            return None
        raise UserError(f"{key} cannot be None")
    if isinstance(value, str) and base is not str:
        try:
            value = parse_literal(value)
        except UserError as exc:
            raise UserError(f"{key}: {exc}") from None
        if value is None and optional:
            return None
    if isinstance(value, str) and optional and value.strip().lower() in ("none", "null"):
        return None  # an optional string field (cache_dir, optimizer, ...) is unset like the others
    bad = UserError(f"{key} expects {_type_name(base)}, got {_shown(raw)}")
    if isinstance(value, float) and not math.isfinite(value) and base in (int, float):
        raise UserError(f"{key} expects a finite {_type_name(base)}, got {value!r}")
    if base is Any:
        return value
    if base is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if base is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise bad
        return int(value)
    if base is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if base is str:
        return str(value)
    origin = typing.get_origin(base)
    if origin is tuple:
        args = typing.get_args(base)
        seq = value if isinstance(value, (list, tuple)) else (value,)
        bad = UserError(f"{key} expects {_type_name(base)}, got {_shown(raw)}")
        try:
            if len(args) == 2 and args[1] is Ellipsis:
                return tuple(coerce(v, args[0], key) for v in seq)
            if len(seq) != len(args):
                raise bad
            return tuple(coerce(v, a, key) for v, a in zip(seq, args))
        except UserError:
            raise bad from None
    if origin is Literal:
        if value not in typing.get_args(base):
            raise UserError(f"{key} must be one of {', '.join(map(str, typing.get_args(base)))}; got {value!r}")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        return dict(value)
    return value


def _type_name(tp: Any) -> str:
    """How a field type reads in a message: ``float``, ``2 comma-separated numbers (e.g. 0.2,1.0)``."""
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        item = args[0] if args else Any
        what = {int: "integers", float: "numbers", str: "names"}.get(item, "values")
        example = {int: "16,32,64", float: "0.2,1.0", str: "a,b"}.get(item, "a,b")
        if len(args) == 2 and args[1] is Ellipsis:
            return f"comma-separated {what} (e.g. {example})"
        example = ",".join(example.split(",")[: len(args)] + ["1"] * max(0, len(args) - 2))
        return f"{len(args)} comma-separated {what} (e.g. {example})"
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _shown(value: Any) -> str:
    """A value as the user would write it: ``0.2,0.5,0.9`` for a tuple, ``'abc'`` for a string."""
    if isinstance(value, (list, tuple)):
        return repr(",".join(str(v) for v in value))
    return repr(value)


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def update_dataclass(obj: Any, values: dict[str, Any], *, prefix: str = "") -> Any:
    """A copy of dataclass ``obj`` with ``values`` coerced to the field types; unknown keys raise a
    :class:`UserError` with close matches."""
    hints = _hints(type(obj))
    names = [f.name for f in fields(obj)]
    changes: dict[str, Any] = {}
    for key, value in values.items():
        if not isinstance(key, str) or key not in hints:
            key = str(key)
            close = difflib.get_close_matches(key, names, n=3, cutoff=0.5)
            hint = f" (did you mean {', '.join(prefix + c for c in close)}?)" if close else ""
            raise UserError(f"unknown config key {prefix + key!r}{hint}")
        cur = getattr(obj, key)
        if is_dataclass(cur) and isinstance(value, dict):
            changes[key] = update_dataclass(cur, value, prefix=f"{prefix}{key}.")
        else:
            changes[key] = coerce(value, hints[key], prefix + key)
    return dataclasses.replace(obj, **changes)


def to_dict(obj: Any) -> Any:
    """Plain YAML-able data (tuples become lists)."""
    if is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def split_set_args(pairs: list[str]) -> list[tuple[str, str]]:
    out = []
    for pair in pairs:
        if "=" not in pair:
            raise UserError(f"--set expects key=value, got {pair!r}")
        k, v = pair.split("=", 1)
        out.append((k.strip(), v))
    return out
