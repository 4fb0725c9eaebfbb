"""Result rows -> leaderboard tables (Markdown, CSV, HTML) and a bar chart.

:func:`aggregate` and :func:`render` are pure functions of the rows (as written by
:func:`sslbench.results.make_row` and read by :func:`sslbench.results.read_rows`).

Aggregation rules:

- Rows are grouped by (data, backbone, budget kind, budget, image size): only results trained
  under the same budget on the same data are compared. Within a group, rows are grouped by
  method and training configuration (the row's ``train_config``,
  :func:`sslbench.config.training_identity`: everything but the seed and operational settings),
  and each metric is aggregated over seeds. Runs of one method that trained differently (another
  backbone width, lr, projector, ...) are separate entries, labelled with the settings in which
  they differ (``simclr [backbone_kwargs.channels=8,16,32,64]``); rows written before
  ``train_config`` existed form one entry per method, as before.
- Duplicates: when several rows carry the same metric for the same (group, method,
  configuration, seed) -- an evaluation that was re-run -- only the most recent one counts: the latest ``time`` wins, and
  rows with equal times are ordered by their position in the input (later wins). The run fields
  ``images_per_s`` and ``epochs`` come from the most recent row of each seed that has them.
- A metric's mean is over its seeds; its standard deviation is the sample one (``ddof=1``) and
  exists only for two seeds or more. A non-finite value (stored as ``null``) counts as NaN, so
  a diverged seed shows up as ``nan`` rather than silently vanishing.
- Rows without a ``method`` or a ``metrics`` object are ignored.
- Collapse: a row whose training was judged collapsed (its ``health.collapse``, written by
  :mod:`sslbench.core.health` into ``results.json`` and every row) marks its entry: the method cell
  reads ``simclr (collapsed: complete)`` (``, 1/3 seeds`` when not every seed collapsed) and the
  CSV gains a ``collapse`` column. Rows without a verdict (written before it existed, or by a
  method that gives no health figures) render as before.
- Feature depth: a row scored at another depth than the encoder's output ``h`` (its
  ``protocol.features``, e.g. ``z`` or ``proj1``; or a fine-tuning row's
  ``protocol.from_projector_layer``) is its own entry, so the probe on ``z`` never merges with the
  probe on ``h``; tables then show a ``features`` column.
- Ablation grids (``sslbench compare --vary``): rows carry their grid setting as ``vary``
  (``{"method_cfg.temperature": 0.1}``). A group with such rows shows one column per varied key
  and one table row per (method, setting, depth), ordered by the setting's values (numbers in
  numeric order, other values in the order the grid ran them); the method's label then names only
  the other settings in which its entries differ.
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sslbench.core.errors import UserError
from sslbench.results import protocol_depth

GROUP_FIELDS = ("data", "backbone", "budget_kind", "budget", "image_size")
FORMATS = ("md", "csv", "html")
MISSING = "-"

Row = Mapping[str, Any]


def _order(value: Any) -> tuple[int, Any]:
    """Sort key that orders numbers numerically, then strings, then ``None``, without ever
    comparing a number with a string."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, value)
    if value is None:
        return (2, "")
    return (1, str(value))


def _group_order(group: tuple[Any, ...]) -> tuple[tuple[int, Any], ...]:
    return tuple(_order(v) for v in group)


def _as_float(value: Any) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return math.nan  # null (a non-finite value) or junk


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _stats(values: Sequence[float]) -> dict[str, Any]:
    """Mean, sample standard deviation (None below two values) and count."""
    mean = sum(values) / len(values)
    std = None
    if len(values) >= 2:
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return {"mean": mean, "std": std, "n": len(values)}


def aggregate(rows: Iterable[Row]) -> list[dict[str, Any]]:
    """One entry per (group, method, training configuration, feature depth), sorted by group,
    method, grid setting, depth and configuration.

    Each entry has the :data:`GROUP_FIELDS`, ``method``, ``config`` (the label of its settings),
    ``settings`` (its ``--vary`` grid setting, ``{}`` outside a grid), ``features`` (its depth,
    ``None`` for ``h``), ``n_seeds``, ``metrics`` (name -> ``{"mean", "std", "n"}``, names
    sorted), ``images_per_s`` and ``epochs`` (means over seeds; ``None`` when unknown). See the
    module docstring for the rules.
    """
    indexed = list(enumerate(rows))
    # Oldest first, so that later assignments (more recent rows) win.
    indexed.sort(key=lambda item: (str(item[1].get("time") or ""), item[0]))
    values: dict[tuple[Any, ...], dict[Any, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
    run_info: dict[tuple[Any, ...], dict[Any, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
    settings: dict[tuple[Any, ...], dict[str, Any]] = {}
    collapse: dict[tuple[Any, ...], dict[Any, str]] = defaultdict(dict)
    for _, row in indexed:
        metrics = row.get("metrics")
        if row.get("method") is None or not isinstance(metrics, Mapping):
            continue
        key = (*(_hashable(row.get(f)) for f in GROUP_FIELDS), str(row["method"]), _variant(row), row_features(row))
        seed = _hashable(row.get("seed"))
        for name, value in metrics.items():
            values[key][seed][str(name)] = _as_float(value)
        for field in ("images_per_s", "epochs"):
            if isinstance(row.get(field), (int, float)):
                run_info[key][seed][field] = float(row[field])
        if isinstance(row.get("vary"), Mapping):
            settings[key] = dict(row["vary"])
        health = row.get("health")
        if isinstance(health, Mapping) and "collapse" in health:
            if health["collapse"]:
                collapse[key][seed] = str(health["collapse"])
            else:
                collapse[key].pop(seed, None)

    variants: dict[tuple[Any, ...], list[tuple[tuple[str, str], ...] | None]] = defaultdict(list)
    for key in values:
        if key[-2] not in variants[key[:-2]]:
            variants[key[:-2]].append(key[-2])
    entries = []
    for key in values:
        per_seed = values[key]
        names = sorted({name for seed_values in per_seed.values() for name in seed_values})
        info = run_info[key]
        setting = settings.get(key, {})
        entries.append(
            {
                **dict(zip(GROUP_FIELDS, key[:-3])),
                "method": key[-3],
                "config": _difference(key[-2], variants[key[:-2]], exclude=set(setting)),
                "settings": setting,
                "features": key[-1],
                "n_seeds": len(per_seed),
                "metrics": {name: _stats([v[name] for v in per_seed.values() if name in v]) for name in names},
                "images_per_s": _mean([i["images_per_s"] for i in info.values() if "images_per_s" in i]),
                "epochs": _mean([i["epochs"] for i in info.values() if "epochs" in i]),
                "collapse": sorted(set(collapse[key].values())),
                "collapsed_seeds": len(collapse[key]),
            }
        )
    # grid settings: numbers in numeric order, other values in the order the grid ran them (first row)
    first_seen: dict[tuple[str, str], int] = {}
    for i, (_, row) in enumerate(indexed):
        for k, v in (row.get("vary") or {}).items() if isinstance(row.get("vary"), Mapping) else ():
            first_seen.setdefault((str(k), json.dumps(v, sort_keys=True)), i)

    def setting_order(settings: Mapping[str, Any]) -> tuple[tuple[int, Any], ...]:
        return tuple(
            (0, v) if isinstance(v, (int, float)) and not isinstance(v, bool) else (1, first_seen.get((k, json.dumps(v, sort_keys=True)), 0))
            for k, v in settings.items()
        )

    entries.sort(
        key=lambda e: (
            _group_order(tuple(_hashable(e[f]) for f in GROUP_FIELDS)),
            e["method"],
            setting_order(e["settings"]),
            _depth_order(e["features"]),
            e["config"],
        )
    )
    return entries


def row_features(row: Row) -> str | None:
    """The feature depth a row was scored at, ``None`` for the encoder's output ``h``: the
    protocol's ``features`` (``z``, ``proj1``, ...), or for a fine-tuning row its
    ``from_projector_layer`` (K > 0: ``projK``)."""
    protocol = row.get("protocol")
    if not isinstance(protocol, Mapping):
        return None
    depth = protocol_depth(protocol)
    if depth is not None and depth != "h":
        return depth
    layer = protocol.get("from_projector_layer")
    if depth is None and layer not in (None, 0):
        return "z" if layer == "z" else f"proj{layer}"
    return None


def _depth_order(depth: str | None) -> tuple[int, int]:
    """h first, then proj1, proj2, ..., then z (then anything else)."""
    if depth is None:
        return (0, 0)
    if depth.startswith("proj") and depth[4:].isdigit():
        return (1, int(depth[4:]))
    return (2, 0) if depth == "z" else (3, 0)


def _hashable(value: Any) -> Any:
    """A group or seed value as stored, or its JSON text when it is a list or mapping (a hand-edited row)."""
    return json.dumps(value, sort_keys=True) if isinstance(value, (list, dict)) else value


def _variant(row: Row) -> tuple[tuple[str, str], ...] | None:
    """The row's training configuration as a sortable, hashable key (``None``: not recorded)."""
    cfg = row.get("train_config")
    if not isinstance(cfg, Mapping):
        return None
    return tuple(sorted((str(k), json.dumps(v, sort_keys=True)) for k, v in cfg.items()))


def _difference(
    variant: tuple[tuple[str, str], ...] | None, others: list[tuple[tuple[str, str], ...] | None], exclude: set[str] | None = None
) -> str:
    """The settings in which ``variant`` differs from the other configurations of its method in
    its group, e.g. ``backbone_kwargs.channels=8,16,32,64, lr=0.5``; ``''`` when it is the only one
    (or differs only in the ``exclude`` keys, which a grid's table shows as columns)."""
    if len(others) < 2:
        return ""
    if variant is None:
        return "config not recorded"
    mine = dict(variant)
    known = [dict(v) for v in others if v is not None]
    keys = sorted({k for v in known for k in v})
    differ = [k for k in keys if len({v.get(k) for v in known}) > 1]
    shown = [k for k in differ if k not in (exclude or set())]
    if differ and not shown:
        return ""
    return ", ".join(f"{k}={_show(mine.get(k))}" for k in shown) or "config recorded"


def _show(encoded: str | None) -> str:
    """A JSON-encoded config value for a label: lists as ``8,16,32,64``, strings bare."""
    if encoded is None:
        return MISSING
    value = json.loads(encoded)
    if isinstance(value, list):
        return ",".join(_show(json.dumps(v)) for v in value)
    return value if isinstance(value, str) else json.dumps(value)


def entry_name(entry: Mapping[str, Any]) -> str:
    """``method`` or, when the method has several configurations in the group, ``method [settings]``."""
    return f"{entry['method']} [{entry['config']}]" if entry.get("config") else str(entry["method"])


def collapse_note(entry: Mapping[str, Any]) -> str:
    """``collapsed: uniform`` (``, 1/3 seeds`` when not all) for an entry whose training collapsed, else ``''``."""
    kinds, n = entry.get("collapse") or [], int(entry.get("collapsed_seeds") or 0)
    if not kinds or n < 1:
        return ""
    seeds = "" if n >= entry["n_seeds"] else f", {n}/{entry['n_seeds']} seeds"
    return f"collapsed: {'/'.join(kinds)}{seeds}"


def _label(entry: Mapping[str, Any]) -> str:
    note = collapse_note(entry)
    return f"{entry_name(entry)} ({note})" if note else entry_name(entry)


def _groups(entries: list[dict[str, Any]]) -> list[tuple[tuple[Any, ...], list[dict[str, Any]]]]:
    """Entries (already sorted by :func:`aggregate`) split by group, order kept."""
    out: list[tuple[tuple[Any, ...], list[dict[str, Any]]]] = []
    for entry in entries:
        group = tuple(entry[f] for f in GROUP_FIELDS)
        if not out or out[-1][0] != group:
            out.append((group, []))
        out[-1][1].append(entry)
    return out


def group_title(group: Sequence[Any]) -> str:
    """``data / backbone / budget kind=budget / image size px``, e.g.
    ``cifar10 / resnet18 / epochs=100 / 32px``."""
    data, backbone, budget_kind, budget, image_size = group
    return f"{data} / {backbone} / {budget_kind}={budget} / {image_size}px"


def _num(x: float) -> str:
    """Two decimals (metrics are percentages); small non-zero values keep two significant
    digits so that e.g. a learning rate of 0.001 does not print as 0.00."""
    if math.isfinite(x) and x != 0 and abs(x) < 0.01:
        return f"{x:.2g}"
    return f"{x:.2f}"


def _metric_cell(stats: Mapping[str, Any] | None, n_seeds: int) -> str:
    if stats is None:
        return MISSING
    text = _num(stats["mean"])
    if stats["std"] is not None:
        text += f" ± {_num(stats['std'])}"
    if stats["n"] != n_seeds:
        text += f" (n={stats['n']})"
    return text


def _count(x: float | None) -> str:
    if x is None:
        return MISSING
    return f"{x:.0f}" if float(x).is_integer() else f"{x:.1f}"


def setting_keys(entries: Iterable[Mapping[str, Any]]) -> list[str]:
    """The grid keys of ``entries`` (their ``settings``), in order of first appearance."""
    keys: list[str] = []
    for e in entries:
        keys += [k for k in e.get("settings") or {} if k not in keys]
    return keys


def _setting_cell(entry: Mapping[str, Any], key: str) -> str:
    from sslbench.results.grid import value_text

    setting = entry.get("settings") or {}
    return value_text(setting[key]) if key in setting else MISSING


def _table(entries: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Header and text cells of one group's table: the method, the grid's keys and the feature
    depth (when there are any), the metrics, seeds, epochs and images/s."""
    names = sorted({name for e in entries for name in e["metrics"]})
    keys = setting_keys(entries)
    depth = ["features"] if any(e.get("features") for e in entries) else []
    header = ["method", *keys, *depth, *names, "seeds", "epochs", "images/s"]
    body = [
        [
            _label(e),
            *(_setting_cell(e, k) for k in keys),
            *([e.get("features") or "h"] if depth else []),
            *(_metric_cell(e["metrics"].get(name), e["n_seeds"]) for name in names),
            str(e["n_seeds"]),
            _count(e["epochs"]),
            MISSING if e["images_per_s"] is None else f"{e['images_per_s']:.0f}",
        ]
        for e in entries
    ]
    return header, body


def _render_md(groups: list[tuple[tuple[Any, ...], list[dict[str, Any]]]]) -> str:
    if not groups:
        return "_No results._\n"
    blocks = []
    for group, entries in groups:
        header, body = _table(entries)
        cells = [[c.replace("|", "\\|") for c in row] for row in [header, *body]]
        widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
        lines = [f"### {group_title(group)}", ""]
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(cells[0], widths)) + " |")
        # Method column left-aligned, numbers right-aligned.
        rule = [":" + "-" * (widths[0] - 1)] + ["-" * (w - 1) + ":" for w in widths[1:]]
        lines.append("| " + " | ".join(rule) + " |")
        for row in cells[1:]:
            lines.append("| " + row[0].ljust(widths[0]) + " | " + " | ".join(c.rjust(w) for c, w in zip(row[1:], widths[1:])) + " |")
        blocks.append("\n".join(lines) + "\n")
    return "\n".join(blocks)


def _render_html(groups: list[tuple[tuple[Any, ...], list[dict[str, Any]]]]) -> str:
    if not groups:
        return "<p>No results.</p>\n"
    out = []
    for group, entries in groups:
        header, body = _table(entries)
        out.append(f"<h3>{html.escape(group_title(group))}</h3>")
        out.append("<table>")
        out.append("<thead>")
        out.append("<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>")
        out.append("</thead>")
        out.append("<tbody>")
        for row in body:
            out.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>")
        out.append("</tbody>")
        out.append("</table>")
    return "\n".join(out) + "\n"


def _csv_number(x: float | None) -> str:
    return "" if x is None else f"{x:.6g}"


def _render_csv(entries: list[dict[str, Any]]) -> str:
    """One flat machine-readable table: the group fields are columns (and, when present, each
    grid key and ``features``), and each metric has a mean column ``NAME``, a standard-deviation
    column ``NAME_std`` (empty below two seeds) and a seed-count column ``NAME_n``; numbers have
    six significant digits."""
    names = sorted({name for e in entries for name in e["metrics"]})
    keys = setting_keys(entries)
    depth = ["features"] if any(e.get("features") for e in entries) else []
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    metric_cols = [c for name in names for c in (name, f"{name}_std", f"{name}_n")]
    flagged = ["collapse"] if any(collapse_note(e) for e in entries) else []
    writer.writerow([*GROUP_FIELDS, "method", "config", *keys, *depth, *flagged, "seeds", "epochs", "images_per_s", *metric_cols])
    for e in entries:
        cells = ["" if e[f] is None else str(e[f]) for f in GROUP_FIELDS]
        cells += [e["method"], e["config"], *(_setting_cell(e, k) for k in keys), *([e.get("features") or "h"] if depth else [])]
        cells += [collapse_note(e)] if flagged else []
        cells += [str(e["n_seeds"]), _csv_number(e["epochs"]), _csv_number(e["images_per_s"])]
        for name in names:
            s = e["metrics"].get(name)
            if s is None:
                cells += ["", "", ""]
            else:
                cells += [_csv_number(s["mean"]), _csv_number(s["std"]), str(s["n"])]
        writer.writerow(cells)
    return buf.getvalue()


def render(rows: Iterable[Row], fmt: str = "md") -> str:
    """The leaderboard of ``rows`` as text.

    ``md`` and ``html``: one table per group under a heading naming data, backbone, budget and
    image size; columns method, each metric as ``mean ± std`` (std from two seeds on, and
    ``(n=k)`` when only k of the method's seeds have that metric), seeds, epochs, images/s.
    ``html`` is a fragment (headings and tables) to embed in a page. ``csv``: one flat table
    with numeric columns (see :func:`_render_csv`). Groups and methods are sorted, so equal
    rows always give equal text.
    """
    if fmt not in FORMATS:
        raise UserError(f"leaderboard format must be one of {', '.join(FORMATS)}; got {fmt!r}")
    entries = aggregate(rows)
    if fmt == "csv":
        return _render_csv(entries)
    if fmt == "html":
        return _render_html(_groups(entries))
    return _render_md(_groups(entries))
