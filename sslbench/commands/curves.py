"""A picture of training: ``curves.png`` of a run, and ``sslbench plot RUN [RUN...]`` to overlay runs.

Four panels over optimizer steps, read from each run's ``metrics.jsonl``: the SSL loss, the
learning rate, training images/s, and the online probe's top-1 accuracy (records with
``online_probe_top1``, written when the run has ``online_probe: true``), with the end-of-training
k-NN top-1 of ``results.json`` as a star at the last step. A panel with nothing to show says so.

:func:`write_curves` is a pure function of the run directory (it reads ``metrics.jsonl`` and
``results.json`` and writes ``curves.png`` next to them, atomically); the trainer calls it once
training has finished. The figure is :data:`CURVES_SIZE` pixels (``FIGSIZE`` inches at ``DPI``),
whatever the data. Plotting uses matplotlib's ``Figure`` directly (no pyplot, no display needed).
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sslbench.core.errors import UserError
from sslbench.core.registry import register_command
from sslbench.core.rundir import CURVES, RunDir, write_atomic

CURVES_FILE = CURVES  # the run directory's picture (sslbench.core.rundir.RunDir.curves)
FIGSIZE = (10.0, 7.5)  # inches
DPI = 100
CURVES_SIZE = (round(FIGSIZE[0] * DPI), round(FIGSIZE[1] * DPI))  # (width, height) in pixels
#: (metrics.jsonl key, panel title)
PANELS = (
    ("loss", "SSL loss"),
    ("lr", "learning rate"),
    ("images_per_s", "training images/s"),
    ("online_probe_top1", "top-1 (%): online probe; star: k-NN at the end"),
)

__all__ = ["CURVES_FILE", "CURVES_SIZE", "plot_runs", "read_metrics", "write_curves"]


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of ``run_dir/metrics.jsonl`` (a torn last line of a killed run is skipped)."""
    path = RunDir(run_dir).metrics
    if not path.is_file():
        raise UserError(f"{path} not found: is {run_dir} an sslbench run directory?")
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), (int, float)):
            records.append(record)
    return records


def _series(records: Sequence[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the records with a finite number under ``key``."""
    steps, values = [], []
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            steps.append(float(r["step"]))
            values.append(float(v))
    return steps, values


def _final_knn(run_dir: Path) -> tuple[float, float] | None:
    """(last step, k-NN top-1) from ``results.json``, when present."""
    try:
        summary = json.loads(RunDir(run_dir).results.read_text())
        return float(summary["steps"]), float(summary["metrics"]["knn_top1"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _labels(run_dirs: Sequence[Path]) -> list[str]:
    """Short, distinct legend labels: the folder names, or the paths when names repeat."""
    names = [p.name or str(p) for p in run_dirs]
    return names if len(set(names)) == len(names) else [str(p) for p in run_dirs]


def plot_runs(run_dirs: Sequence[str | Path], out: str | Path, *, labels: Sequence[str] | None = None) -> Path:
    """Draw the curves of ``run_dirs`` (overlaid, one colour per run) into the image file ``out``
    (format from its ending, e.g. ``.png``), written atomically; returns ``out``."""
    try:
        from matplotlib.figure import Figure  # imported here: the CLI starts without it
    except ImportError as err:
        raise UserError("plotting needs matplotlib: pip install matplotlib") from err
    runs = [Path(d) for d in run_dirs]
    if not runs:
        raise UserError("plot needs at least one run directory")
    data = [read_metrics(r) for r in runs]
    names = list(labels) if labels is not None else _labels(runs)
    out = Path(out)
    fmt = out.suffix.lstrip(".").lower()
    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    if fmt not in fig.canvas.get_supported_filetypes():
        raise UserError(f"cannot write {out}: unknown image type {out.suffix or '(none)'}; use .png, .svg or .pdf")
    axes = fig.subplots(2, 2).flatten()
    colours = [f"C{i % 10}" for i in range(len(runs))]
    for ax, (key, title) in zip(axes, PANELS):
        drawn = False
        for run, records, name, colour in zip(runs, data, names, colours):
            steps, values = _series(records, key)
            if steps:
                ax.plot(steps, values, color=colour, label=name, marker="o" if len(steps) < 3 else None, linewidth=1.5)
                drawn = True
            if key == "online_probe_top1" and (knn := _final_knn(run)) is not None:
                ax.plot([knn[0]], [knn[1]], marker="*", markersize=12, color=colour, linestyle="none", label=f"{name} (k-NN)")
                drawn = True
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        if key == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        if drawn:
            ax.legend(fontsize="small")
        else:
            hint = " (train with --set online_probe=true)" if key == "online_probe_top1" else ""
            ax.text(0.5, 0.5, f"no {key} in metrics.jsonl{hint}", ha="center", va="center", transform=ax.transAxes, fontsize="small")
    fig.suptitle(names[0] if len(runs) == 1 else f"{len(runs)} runs")
    write_atomic(out, lambda tmp: fig.savefig(os.fspath(tmp), dpi=DPI, format=fmt), "pass a writable --output")
    return out


def write_curves(run_dir: str | Path) -> Path:
    """Write ``run_dir/curves.png`` (:data:`CURVES_SIZE` pixels) from the run's ``metrics.jsonl``
    and ``results.json``; returns its path. Called by :func:`sslbench.commands.pipeline.train_and_score`
    once a run has finished."""
    return plot_runs([Path(run_dir)], RunDir(run_dir).curves)


def cmd_plot(args: argparse.Namespace) -> int:
    """``sslbench plot RUN [RUN...] [--output FILE]``."""
    runs = [Path(r) for r in args.runs]
    for run in runs:
        if not run.is_dir():
            raise UserError(f"run directory {run} does not exist")
    out = Path(args.output) if args.output else (runs[0] / CURVES_FILE if len(runs) == 1 else Path(CURVES_FILE))
    print(f"wrote {plot_runs(runs, out)}")
    return 0


@register_command("plot")
def register_plot(sub: Any) -> None:
    """Add ``sslbench plot`` to the CLI's sub-commands."""
    p = sub.add_parser("plot", help="draw training curves (loss, lr, images/s, probe accuracy) of one run or several overlaid")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories (each with metrics.jsonl)")
    p.add_argument("--output", metavar="FILE.png", help=f"image to write (default: RUN/{CURVES_FILE} for one run, ./{CURVES_FILE} for several)")
    p.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_plot)
