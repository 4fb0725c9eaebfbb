"""Ablation grids for ``sslbench compare --vary KEY=V1,V2,...``.

A ``--vary`` flag names one config key (any key ``--set`` accepts: ``lr``, ``batch_size``,
``method_cfg.temperature`` or just ``temperature``, ``aug.jitter_p``, ``backbone_kwargs.channels``)
and the values it takes; several flags make a grid, their Cartesian product. Values are separated
by commas; a value that itself holds commas (a tuple) is written in brackets:
``--vary "aug.crop_scale=[0.08,1.0],[0.5,1.0]"``.

Every grid point is one setting: ``{canonical key: value}`` with keys spelled as in
:func:`sslbench.config.training_identity` (``method_cfg.temperature``, ``aug.jitter_p``) and
values as the resolved config holds them. Its run directories are named by the settings whose
value differs within the grid (keys with one value are recorded, not named):
``simclr-temperature=0.1-seed0``, ``simclr-aug.jitter_p=0-batch_size=64-seed1``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import fields
from typing import Any

from sslbench.core.errors import UserError

SECTIONS = ("method_cfg", "aug", "backbone_kwargs")
MAX_NAME = 120  # characters of a run directory name before it is shortened with a hash
_UNSAFE = re.compile(r"[^A-Za-z0-9._+=-]+")


def split_values(text: str) -> list[str]:
    """``'0.1,0.5'`` -> ``['0.1', '0.5']``; ``'[0.08,1.0],(0.5,1)'`` -> ``['[0.08,1.0]', '(0.5,1)']``:
    commas inside brackets or parentheses belong to the value."""
    values, depth, current = [], 0, ""
    for ch in text:
        if ch in "[(":
            depth += 1
        elif ch in ")]":
            depth -= 1
        if ch == "," and depth == 0:
            values.append(current.strip())
            current = ""
        else:
            current += ch
    values.append(current.strip())
    if depth != 0:
        raise UserError(f"unbalanced brackets in {text!r}")
    return values


def parse_vary(specs: list[str]) -> list[tuple[str, list[str]]]:
    """``['temperature=0.1,0.5', 'aug.jitter_p=0,0.8']`` -> ``[(key, [raw values])]`` in order.
    Checks the form only; :func:`resolve_grid` checks keys and values against the config."""
    out: list[tuple[str, list[str]]] = []
    for spec in specs:
        if "=" not in spec:
            raise UserError(f"--vary expects KEY=V1,V2,... (e.g. --vary method_cfg.temperature=0.1,0.5), got {spec!r}")
        key, _, raw = spec.partition("=")
        key = key.strip()
        try:
            values = split_values(raw)
        except UserError as exc:
            raise UserError(f"--vary {key}: {exc}") from None
        if not key or any(v == "" for v in values):
            raise UserError(f"--vary {spec!r}: give a key and non-empty comma-separated values, e.g. --vary batch_size=64,256")
        out.append((key, values))
    return out


def canonical_key(key: str, method: str) -> str:
    """The dotted spelling of a ``--set`` key for ``method``: ``temperature`` -> ``method_cfg.temperature``,
    ``jitter_p`` -> ``aug.jitter_p``; top-level and dotted keys are returned as given (an unknown
    key is reported by :func:`sslbench.config.build_config`)."""
    from sslbench.config import TrainConfig
    from sslbench.core.augment import AugmentConfig
    from sslbench.core.registry import get_method

    head, _, rest = key.partition(".")
    if rest and head in SECTIONS:
        return key
    if key in {f.name for f in fields(TrainConfig)} and key not in SECTIONS:
        return key
    if key in {f.name for f in fields(get_method(method).Config)}:
        return f"method_cfg.{key}"
    if key in {f.name for f in fields(AugmentConfig)}:
        return f"aug.{key}"
    return key


def config_value(cfg: Any, key: str) -> Any:
    """The value at the canonical ``key`` of a resolved config, as plain JSON data (tuples as lists)."""
    from sslbench.config import to_dict

    value: Any = to_dict(cfg)
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def setting_text(key: str, value: Any) -> str:
    """One setting in a run name: ``temperature=0.1``, ``aug.jitter_p=0``,
    ``backbone_kwargs.channels=8_16_32_64`` (file-system safe: letters, digits and ``._+=-``)."""
    short = key.removeprefix("method_cfg.")
    return _UNSAFE.sub("_", f"{short}={value_text(value)}")


def value_text(value: Any) -> str:
    """A setting's value for names and table cells: ``0.1``, ``0``, ``true``, ``none``, ``8_16_32_64``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "_".join(value_text(v) for v in value)
    return str(value)


def run_name(method: str, seed: int, settings: dict[str, Any], named: list[str]) -> str:
    """``<method>[-<setting>...]-seed<seed>`` naming the settings of the keys in ``named``; a name
    longer than :data:`MAX_NAME` keeps its start and a hash of the whole."""
    parts = [method, *(setting_text(k, settings[k]) for k in named), f"seed{seed}"]
    name = "-".join(parts)
    if len(name) > MAX_NAME:
        digest = hashlib.sha1(name.encode()).hexdigest()[:10]
        name = f"{name[: MAX_NAME - 22]}-{digest}-seed{seed}"
    return name


def grid_points(axes: list[tuple[str, list[Any]]]) -> list[dict[str, Any]]:
    """The Cartesian product of ``axes`` (``[(key, values)]``) as settings, first axis outermost."""
    if not axes:
        return [{}]
    keys = [k for k, _ in axes]
    return [dict(zip(keys, combo)) for combo in itertools.product(*(values for _, values in axes))]


def varying_keys(points: list[dict[str, Any]]) -> list[str]:
    """The keys whose value differs between ``points`` (in key order): what run names show."""
    if not points:
        return []
    keys = list(points[0])
    return [k for k in keys if len({json.dumps(p[k], sort_keys=True) for p in points}) > 1]
