"""Leaderboard plots: the results of a store drawn with matplotlib (an optional part of rendering;
the tables are :mod:`sslbench.results.leaderboard`). A pure function of the rows, like the tables."""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from sslbench.core.errors import UserError
from sslbench.results.leaderboard import Row, _groups, aggregate, entry_name, group_title, setting_keys

__all__ = ["plot", "plot_formats"]


def plot_formats() -> list[str]:
    """The image formats :func:`plot` can write (a :class:`UserError` without matplotlib)."""
    try:
        from matplotlib.figure import Figure  # imported here: plotting is optional
    except ImportError as e:
        raise UserError("plotting needs matplotlib: pip install matplotlib (or the sslbench[plot] extra)") from e
    return sorted(Figure().canvas.get_supported_filetypes())


def plot(rows: Iterable[Row], path: str | os.PathLike[str]) -> None:
    """Draw the results of ``rows`` to ``path`` (the format follows its suffix, PNG by default).

    Without a grid: one panel per group, a bar per method of its first metric (by name), with the
    standard deviation over seeds as error bars (two seeds or more). For an ablation grid (rows
    with ``vary``): per group, one panel per metric drawing it against the first varied key
    (a log axis for positive numbers spanning 8x or more, categories for other values), one line
    per method, other setting and feature depth, with the standard deviation over seeds as error bars.
    """
    formats = plot_formats()
    from matplotlib.figure import Figure

    suffix = Path(path).suffix.lstrip(".").lower()
    if suffix not in formats:
        raise UserError(f"--plot {path}: name the image with one of the suffixes {', '.join(formats)} (e.g. board.png)")
    groups = _groups(aggregate(rows))
    if not groups:
        raise UserError("no results to plot")
    if any(setting_keys(entries) for _, entries in groups):
        fig = _grid_figure(groups)
    else:
        widest = max(len(entries) for _, entries in groups)
        # A Figure without pyplot renders with the Agg canvas and leaves no global state behind.
        fig = Figure(figsize=(max(4.0, 1.5 + 0.9 * widest), 3.2 * len(groups)), layout="constrained")
        axes = fig.subplots(len(groups), 1, squeeze=False)[:, 0]
        for ax, (group, entries) in zip(axes, groups):
            metric = sorted({name for e in entries for name in e["metrics"]})[0]
            stats = [e["metrics"].get(metric) for e in entries]
            methods = [entry_name(e) + (f" @{e['features']}" if e.get("features") else "") for e in entries]
            ax.bar(methods, [math.nan if s is None else s["mean"] for s in stats], color="tab:blue")
            # Error bars only where there is a standard deviation (two seeds or more).
            spread = [(m, s["mean"], s["std"]) for m, s in zip(methods, stats) if s and s["std"] is not None]
            if spread:
                xs, ys, errs = zip(*spread)
                ax.errorbar(xs, ys, yerr=errs, fmt="none", ecolor="black", capsize=4)
            ax.set_title(group_title(group), fontsize=10)
            ax.set_ylabel(metric)
            ax.grid(axis="y", alpha=0.3)
    from sslbench.core.rundir import write_atomic

    # atomic: a failed write (disk full) leaves no half image and keeps an earlier one
    write_atomic(path, lambda tmp: fig.savefig(os.fspath(tmp), dpi=100, format=suffix), "free some space or pass another --plot")


def _grid_figure(groups: list[tuple[tuple[Any, ...], list[dict[str, Any]]]]) -> Any:
    """Each metric of each group against its first varied key (see :func:`plot`)."""
    from matplotlib.figure import Figure

    from sslbench.results.grid import value_text

    panels = [(group, entries, metric) for group, entries in groups for metric in sorted({n for e in entries for n in e["metrics"]})]
    cols = min(3, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(4.6 * cols, 3.4 * nrows), layout="constrained")
    axes = fig.subplots(nrows, cols, squeeze=False).ravel()
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    for ax, (group, entries, metric) in zip(axes, panels):
        keys = setting_keys(entries)
        varied = [k for k in keys if len({json.dumps(e["settings"].get(k), sort_keys=True) for e in entries}) > 1] or keys
        x_key = varied[0] if varied else None
        xs_all: list[Any] = [e["settings"].get(x_key) for e in entries] if x_key else [entry_name(e) for e in entries]
        numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs_all)
        categories: list[str] = []
        if not numeric:
            for x in xs_all:
                categories += [value_text(x)] if value_text(x) not in categories else []
        lines: dict[str, list[tuple[Any, float, float]]] = defaultdict(list)
        depths = any(e.get("features") for e in entries)
        for e, x in zip(entries, xs_all):
            stats = e["metrics"].get(metric)
            if stats is None:
                continue
            others = ", ".join(f"{k.removeprefix('method_cfg.')}={value_text(v)}" for k, v in e["settings"].items() if k != x_key)
            label = " ".join(part for part in (entry_name(e), others, f"@{e.get('features') or 'h'}" if depths else "") if part)
            position = x if numeric else categories.index(value_text(x))
            lines[label].append((position, stats["mean"], stats["std"] or 0.0))
        for label, points in lines.items():
            points.sort(key=lambda p: p[0])
            px, py, pe = zip(*points)
            ax.errorbar(px, py, yerr=pe, marker="o", capsize=4, label=label)
        ticks = sorted(set(xs_all)) if numeric else []
        if numeric and all(float(x) > 0 for x in xs_all) and max(xs_all) >= 8 * min(xs_all):
            ax.set_xscale("log")
        if numeric and len(ticks) <= 12:
            ax.set_xticks(ticks, [value_text(t) for t in ticks])
            ax.minorticks_off()
        elif not numeric:
            ax.set_xticks(range(len(categories)), categories)
        ax.set_xlabel((x_key or "method").removeprefix("method_cfg."))
        ax.set_ylabel(metric)
        ax.set_title(group_title(group), fontsize=8)
        ax.grid(alpha=0.3)
        if len(lines) > 1:
            ax.legend(fontsize=7)
    return fig
