"""The ``eval`` and ``leaderboard`` sub-commands (registered into :mod:`sslbench.commands.cli`).

- ``sslbench eval RUN_DIR``: rebuild a run's encoder (strict key check), score it with the
  evaluation protocols of :mod:`sslbench.protocols` (k-NN, linear probe, fine-tuning,
  distillation, ...), print a table and append one result row per protocol (and per label
  fraction) to the results store, by default ``RUN_DIR/../results.jsonl``.
- ``sslbench leaderboard [RESULTS]``: render a results store as Markdown, CSV or HTML (and a plot).

``sslbench compare`` is in :mod:`sslbench.commands.compare`. See ``docs/evaluation.md`` for the protocols
and the row format.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shlex
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sslbench.core.errors import UserError, warn
from sslbench.core.hostmem import keep_freed_memory
from sslbench.core.registry import register_command
from sslbench.core.rundir import RESULTS_STORE, RUNS, RunDir, check_writable, write_text_atomic
from sslbench.evaluation.protocols import (
    DEFAULT_FEATURES,
    EvalContext,
    EvalOptions,
    add_eval_flags,
    eval_options,
    get_protocol,
    protocol_names,
    row_depth,
)

DEFAULT_LEADERBOARD_RESULTS = RUNS / RESULTS_STORE  # where `eval` puts rows of runs/<name>


# ---------------------------------------------------------------------------------------------
# Parsing


_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(min|sec|h|m|s)?", re.IGNORECASE)
_UNIT_S = {"h": 3600.0, "m": 60.0, "min": 60.0, "s": 1.0, "sec": 1.0, None: 1.0}


def parse_duration(text: str) -> float:
    """``'10m'`` -> 600.0; also ``'90s'``, ``'1.5h'``, ``'1h30m'`` and plain seconds (``'600'``)."""
    s = text.strip()
    total, pos, parts = 0.0, 0, 0
    while pos < len(s):
        m = _DURATION_PART.match(s, pos)
        if m is None or (m.group(2) is None and m.end() != len(s)):
            raise UserError(f"cannot read the duration {text!r}; write e.g. 90s, 10m, 1.5h or 1h30m")
        total += float(m.group(1)) * _UNIT_S[m.group(2).lower() if m.group(2) else None]
        pos = m.end()
        while pos < len(s) and s[pos].isspace():
            pos += 1
        parts += 1
    if parts == 0 or not total > 0:
        raise UserError(f"the time budget must be > 0, got {text!r}")
    return total


def format_duration(seconds: float) -> str:
    """600 -> ``'10m'``, 5400 -> ``'90m'``, 3600 -> ``'1h'``, 90 -> ``'90s'``, 2.5 -> ``'2.5s'``."""
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{int(seconds // 3600)}h"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{int(seconds // 60)}m"
    return f"{seconds:g}s"


# ---------------------------------------------------------------------------------------------
# Evaluation of one run directory


def run_budget(run_dir: Path, cfg: Any) -> tuple[str, Any]:
    """``(budget_kind, budget)`` of a run: from ``budget.json`` (written by ``compare``, e.g.
    ``("images", 100000)``) or else from its config: ``("time", "10m")`` for a time budget alone,
    ``("steps", N)`` or ``("epochs", N)``."""
    path = RunDir(run_dir).budget
    if path.is_file():
        try:
            data = json.loads(path.read_text())
            return str(data["kind"]), data["value"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UserError(f"{path} is not a valid budget file ({exc}); delete it to use the run's config") from exc
    if cfg.time_budget_s is not None and cfg.steps is None and cfg.epochs is None:
        return "time", format_duration(cfg.time_budget_s)
    if cfg.steps is not None:
        return "steps", cfg.steps
    return "epochs", cfg.epochs if cfg.epochs is not None else 10


def _read_results(run_dir: Path) -> dict[str, Any]:
    """The run's ``results.json`` (empty when it is missing)."""
    path = RunDir(run_dir).results
    if not path.is_file():
        print(f"note: {path} not found; the rows will lack the run's wall time and speed", file=sys.stderr)
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{path} is not readable JSON ({exc}); re-run the training or delete the file") from exc
    return data if isinstance(data, dict) else {}


def _run_fields(run_dir: Path, cfg: Any, summary: dict[str, Any], data: str, budget: tuple[str, Any], command: str, device: Any) -> dict[str, Any]:
    from sslbench.config import training_identity
    from sslbench.results import hardware_summary

    kind, value = budget
    return {
        "method": cfg.method,
        "backbone": cfg.backbone,
        "data": cfg.data if data == cfg.data else f"{cfg.data}->{data}",
        "image_size": cfg.image_size,
        "epochs": summary.get("epochs", cfg.epochs),
        "steps": summary.get("steps", cfg.steps),
        "images_seen": summary.get("images_seen"),
        "batch_size": summary.get("batch_size", cfg.batch_size),
        "budget_kind": kind,
        "budget": value,
        "wall_time_s": summary.get("wall_time_s"),
        "device_hours": summary.get("device_hours"),
        "images_per_s": summary.get("images_per_s"),
        "precision": summary.get("precision", cfg.precision),
        "seed": cfg.seed,
        "run_dir": str(run_dir.resolve()),
        "command": command,
        "train_data": cfg.data,
        "eval_data": data,
        "backbone_kwargs": dict(cfg.backbone_kwargs),
        "train_config": training_identity(cfg),
        "processes": summary.get("processes"),
        "hardware": hardware_summary(device),
        "train_hardware": summary.get("hardware"),
        "eval_device": str(device),
        "health": summary.get("health"),  # the training's collapse verdict and its figures (sslbench.core.health)
    }


def _print_table(rows: list[dict[str, Any]], out: Callable[[str], None]) -> None:
    lines = [("protocol", "features", "labels", "metric", "value")]
    for row in rows:
        frac = row.get("label_fraction")
        labels = "-" if not get_protocol(row["protocol"]["name"]).uses_labels else "100%" if frac is None else f"{frac * 100:g}%"
        depth = row_depth(row) if "features" in row["protocol"] else "-"
        for name, value in row["metrics"].items():
            lines.append((row["protocol"]["name"], depth, labels, name, _value_text(value)))
    widths = [max(len(line[i]) for line in lines) for i in range(5)]
    for i, line in enumerate(lines):
        out("  ".join(c.ljust(w) if j < 4 else c.rjust(w) for j, (c, w) in enumerate(zip(line, widths))))
        if i == 0:
            out("  ".join("-" * w for w in widths))


def _value_text(value: float | None) -> str:
    """Accuracies (percent) with two decimals; label-free metrics below 1 (alignment, a feature
    standard deviation) with four significant digits."""
    if value is None or math.isnan(value):
        return "nan"
    return f"{value:.4g}" if abs(value) < 1 else f"{value:.2f}"


def _eval_device(spec: str | None) -> Any:
    """The evaluation device: ``spec`` checked (a valid, available device), else CUDA when available."""
    import torch

    if spec is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise UserError(f"--device {spec!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise UserError(f"--device {spec}: no such CUDA device here ({torch.cuda.device_count()} available); use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {spec!r}: evaluation runs on cpu or cuda")
    return device


def eval_splits(cfg: Any, data: str, opts: EvalOptions) -> tuple[Any, Any]:
    """The train and test splits ``opts`` evaluates on: in memory up to ``opts.max_memory_gb`` (the
    run's ``max_memory_gb`` when unset), else read from disk, which only protocols without
    ``in_memory`` can use (k-NN and linear): for the others such data is a :class:`UserError`."""
    from sslbench.data import ImageSplit, load_split

    limit = cfg.max_memory_gb if opts.max_memory_gb is None else opts.max_memory_gb
    tuned = sorted(p for p in opts.protocols if get_protocol(p).in_memory)
    from_disk = [p for p in protocol_names() if not get_protocol(p).in_memory]
    also = f" ({' and '.join(from_disk)} also read data from disk)" if from_disk else ""
    splits = []
    for split in ("train", "test"):
        s = load_split(data, split, cfg.image_size, cache_dir=cfg.cache_dir, max_memory_gb=limit)
        if not isinstance(s, ImageSplit) and tuned:
            raise UserError(
                f"{data} {split} does not fit in memory (max_memory_gb={limit:g}); {'/'.join(tuned)} "
                f"needs in-memory splits{also}: raise --max-memory-gb"
            )
        splits.append(s)
    classes = splits[0].classes
    present = [classes[i] if i < len(classes) else str(i) for i in sorted(set(splits[0].labels.tolist()))]
    labelled = [p for p in opts.protocols if get_protocol(p).uses_labels]
    if len(present) < 2 and labelled:
        raise UserError(
            f"{'/'.join(labelled)}: "
            f"{data} has a single class ({', '.join(present) or 'none'}) in its training split: every accuracy would "
            "be 100% and mean nothing; evaluate on data with two or more classes (--data)"
        )
    return splits[0], splits[1]


def evaluate_run(
    run_dir: str | Path,
    opts: EvalOptions,
    *,
    results_path: str | Path | None,
    command: str,
    budget: tuple[str, Any] | None = None,
    out: Callable[[str], None] = print,
    run_fields: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Score the encoder of ``run_dir`` with ``opts.protocols``; append one row per protocol (and
    per label fraction and feature depth) to ``results_path`` (``None``: do not store) and return
    the rows. ``run_fields`` are added to every row (``compare`` records a grid's settings as ``vary``)."""
    from sslbench.config import load_run_config
    from sslbench.config.build import load_encoder

    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"{run_dir} is a file; pass a run directory (config.yaml + encoder.safetensors)")
    if not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} does not exist")
    from sslbench.core.runlock import check_not_training

    check_not_training(run_dir, "evaluate")
    cfg = load_run_config(run_dir)
    encoder = load_encoder(run_dir)  # strict: a mismatched encoder is a UserError, never a partial load
    protocols = [get_protocol(name) for name in opts.protocols]
    summary = _read_results(run_dir)
    device = _eval_device(opts.device)
    if device.type == "cpu" and cfg.keep_freed_memory:
        keep_freed_memory()  # as in training (sslbench/core/hostmem.py): feature extraction reuses freed memory on the CPU
    run_precision = summary.get("precision", cfg.precision)
    precision = run_precision if run_precision in ("bf16", "fp16") and device.type == "cuda" else "no"
    data = opts.data or cfg.data
    ctx = EvalContext(run_dir=run_dir, cfg=cfg, opts=opts, encoder=encoder, device=device, precision=precision, data=data)
    if any(p.per_features for p in protocols):
        for name in opts.features:  # the projector layers, strictly loaded: fail before loading data
            ctx.head(name)
    for protocol in protocols:
        if protocol.prepare is not None:
            protocol.prepare(ctx)  # e.g. fine-tuning's projector layers: fail before loading data
    ctx.encoder = encoder.to(device)
    ctx.train, ctx.test = eval_splits(cfg, data, opts)
    run = {**_run_fields(run_dir, cfg, summary, data, budget or run_budget(run_dir, cfg), command, device), **(run_fields or {})}
    rows = _score(ctx, protocols, run, results_path, str(run_dir))
    out(f"{run_dir}: {cfg.method} / {cfg.backbone} / {run['data']} / {run['budget_kind']}={run['budget']}")
    _print_table(rows, out)
    return rows


def _score(ctx: EvalContext, protocols: list[Any], run: dict[str, Any], results_path: str | Path | None, what: str) -> list[dict[str, Any]]:
    """Score ``ctx`` (its splits loaded) with each protocol, at each depth and label fraction:
    one row each (``run``'s fields, the protocol's record), appended to ``results_path`` (``None``:
    not stored) and returned. ``what`` names the encoder in the timing notes."""
    from sslbench.results import append_row, make_row

    opts, data, precision = ctx.opts, ctx.data, ctx.precision
    rows: list[dict[str, Any]] = []
    warned: set[str] = set()  # (a protocol scored at several depths or fractions says a warning once)
    for protocol in protocols:
        t0 = time.perf_counter()
        depths: list[str | None] = list(opts.features) if protocol.per_features else [None]
        for depth in depths:
            ctx.depth = depth or DEFAULT_FEATURES
            for fraction in opts.fractions if protocol.per_fraction else [None]:
                metrics, record = protocol.run(ctx, fraction)
                for text in record.get("warnings", ()):
                    if text not in warned:
                        warned.add(text)
                        warn(text)
                record = {
                    "name": protocol.name,
                    **record,
                    **({"features": depth} if depth else {}),
                    "eval_data": data,
                    "image_size": ctx.image_size,
                    "precision": precision,
                }
                row = make_row(metrics=metrics, protocol=record, run={**run, "label_fraction": fraction})
                if results_path is not None:
                    append_row(results_path, row)
                rows.append(row)
        ctx.depth = DEFAULT_FEATURES
        print(f"note: {protocol.name} evaluation of {what} took {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return rows


# ---------------------------------------------------------------------------------------------
# Evaluation of an encoder that sslbench did not train

EXTERNAL_BUDGET = ("encoder", "external")  # the rows' (budget_kind, budget): leaderboard groups of their own


def evaluate_encoder(
    spec: str,
    opts: EvalOptions,
    *,
    results_path: str | Path | None,
    command: str,
    image_size: int | None = None,
    weights: str | None = None,
    init_seed: int = 0,
    out: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Score the external encoder ``spec`` (``timm:NAME``, ``local-dir:DIR``, ``hf-hub:REPO``:
    :mod:`sslbench.evaluation.external`) on ``opts.data`` with ``opts.protocols``, as
    :func:`evaluate_run` scores a run: one row per protocol (and label fraction), keyed by the
    encoder's name (``encoder``, also the leaderboard's ``method``) and its weights' checksum
    (``weights``: ``sha256:...`` or ``random:SEED``), appended to ``results_path``. The evaluation
    settings a run takes from its config (k-NN's k and T, the label-free metrics' augmentation)
    are :class:`~sslbench.config.TrainConfig`'s defaults."""
    from sslbench.backbones import check_image_size
    from sslbench.config import TrainConfig
    from sslbench.data import default_image_size
    from sslbench.evaluation.external import load_external_encoder, parse_spec
    from sslbench.results import hardware_summary

    kind, _ = parse_spec(spec)
    if opts.data is None:
        raise UserError(f"--encoder {spec} needs --data SPEC: the data to evaluate it on (e.g. --data digits or --data cifar10)")
    if [f for f in opts.features if f != DEFAULT_FEATURES]:
        raise UserError(f"--features {','.join(opts.features)}: an external encoder has no projector; score its output h (drop --features)")
    if opts.settings.get("from_projector_layer"):
        raise UserError("--from-projector-layer: an external encoder has no projector; fine-tune from its output (drop the flag)")
    size = image_size if image_size is not None or kind != "timm" else default_image_size(opts.data)
    enc = load_external_encoder(spec, image_size=size, weights=weights, init_seed=init_seed)
    size = size if size is not None else enc.image_size if enc.image_size is not None else default_image_size(opts.data)
    cfg = TrainConfig(data=opts.data, backbone=enc.backbone, backbone_kwargs=enc.backbone_kwargs, image_size=size, precision="no")
    cfg.validate()  # (the image size's lower bound)
    check_image_size(enc.model, size)
    device = _eval_device(opts.device)
    if device.type == "cpu" and cfg.keep_freed_memory:
        keep_freed_memory()
    protocols = [get_protocol(name) for name in opts.protocols]
    where = Path(enc.weights_file) if enc.weights_file is not None else Path(spec)
    ctx = EvalContext(run_dir=where, cfg=cfg, opts=opts, encoder=enc.model, device=device, precision="no", data=opts.data)
    for protocol in protocols:
        if protocol.prepare is not None:
            protocol.prepare(ctx)
    ctx.encoder = enc.model.to(device)
    ctx.train, ctx.test = eval_splits(cfg, opts.data, opts)
    run = {
        "method": enc.name,
        "backbone": enc.backbone,
        "data": opts.data,
        "image_size": size,
        "budget_kind": EXTERNAL_BUDGET[0],
        "budget": EXTERNAL_BUDGET[1],
        "precision": "no",
        "command": command,
        "encoder": enc.name,
        "weights": enc.weights,
        "encoder_source": enc.record,
        "eval_data": opts.data,
        "backbone_kwargs": enc.backbone_kwargs,
        "train_config": {"encoder": enc.name, "weights": enc.weights},  # the leaderboard's identity of an entry: name and weights
        "hardware": hardware_summary(device),
        "eval_device": str(device),
    }
    rows = _score(ctx, protocols, run, results_path, spec)
    out(f"{spec}: {enc.backbone} / weights {enc.weights} / {opts.data} / {size}px")
    _print_table(rows, out)
    return rows


# ---------------------------------------------------------------------------------------------
# Command handlers


def command_line(args: argparse.Namespace) -> str:
    argv = getattr(args, "argv", None)
    return "sslbench " + shlex.join(argv if argv is not None else sys.argv[1:])


def cmd_eval(args: argparse.Namespace) -> int:
    if args.encoder is not None and args.run_dir is not None:
        raise UserError(f"pass either a run directory ({args.run_dir}) or --encoder {args.encoder}, not both")
    if args.encoder is None:
        if args.run_dir is None:
            raise UserError("pass a run directory to evaluate (sslbench eval RUN_DIR) or an encoder (--encoder timm:NAME|local-dir:DIR|hf-hub:REPO)")
        given = [f for f, v in (("--image-size", args.image_size), ("--weights", args.weights), ("--init-seed", args.init_seed)) if v is not None]
        if given:
            raise UserError(f"{', '.join(given)}: only with --encoder; a run is evaluated with its own weights at its own image size")
        return _cmd_eval_run(args)
    opts = eval_options(args, data=args.data)
    results = Path(args.results) if args.results else DEFAULT_LEADERBOARD_RESULTS
    if results.suffix != ".jsonl":
        raise UserError(f"--results {results} must be a .jsonl file (JSON Lines), e.g. results.jsonl; refusing to append to it")
    check_writable(results, "--results", fix="pass a writable --results FILE.jsonl")
    seed = 0 if args.init_seed is None else args.init_seed
    evaluate_encoder(
        args.encoder, opts, results_path=results, command=command_line(args), image_size=args.image_size, weights=args.weights, init_seed=seed
    )
    print(f"appended results to {results}", file=sys.stderr)
    return 0


def _cmd_eval_run(args: argparse.Namespace) -> int:
    opts = eval_options(args, data=args.data)
    run_dir = Path(args.run_dir)
    results = Path(args.results) if args.results else RunDir(run_dir).results_store
    if results.suffix != ".jsonl":  # before anything is evaluated (append_row refuses it too)
        raise UserError(f"--results {results} must be a .jsonl file (JSON Lines), e.g. results.jsonl; refusing to append to it")
    if run_dir.is_dir():  # (a missing run is evaluate_run's error, which names it)
        check_writable(results, "--results", fix="pass a writable --results FILE.jsonl")  # before anything is evaluated
    evaluate_run(run_dir, opts, results_path=results, command=command_line(args))
    print(f"appended results to {results}", file=sys.stderr)
    return 0


def cmd_leaderboard(args: argparse.Namespace) -> int:
    from sslbench.results import read_rows
    from sslbench.results.leaderboard import render
    from sslbench.results.plot import plot

    path = Path(args.results) if args.results else DEFAULT_LEADERBOARD_RESULTS
    if path.is_dir():
        path = path / RESULTS_STORE
    if not path.is_file():
        raise UserError(f"results file {path} not found; pass the results.jsonl written by `sslbench eval` or `sslbench compare`")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rows = read_rows(path)
    if not rows and path.stat().st_size > 0:  # not a store with a torn line: the wrong file
        raise UserError(
            f"{path} holds no result rows (every line is unreadable); pass a results.jsonl written by `sslbench eval` or `sslbench compare`"
        )
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if args.output:
        out = Path(args.output)
        if out.suffix == ".jsonl" or (out.exists() and out.resolve() == path.resolve()):
            raise UserError(f"--output {out} would overwrite a results store; write the table to e.g. leaderboard.{args.format}")
        check_writable(out, "--output", fix="pass a writable --output FILE")
    if args.plot:
        check_writable(args.plot, "--plot", fix="pass a writable --plot FILE.png")
    text = render(rows, args.format)
    if args.output:
        out = Path(args.output)
        write_text_atomic(out, text, "pass a writable --output")  # an interrupted write never leaves half a table
        print(f"wrote {args.output}", file=sys.stderr)
    else:
        print(text, end="")
    if args.plot:
        plot(rows, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------------------
# Parsers


@register_command("eval")
def register_eval(sub: Any) -> None:
    p = sub.add_parser("eval", help="evaluate a run's encoder (k-NN, linear probe, fine-tune) and store the results")
    p.add_argument("run_dir", nargs="?", metavar="RUN_DIR", help="a finished run directory (config.yaml + encoder.safetensors)")
    p.add_argument(
        "--encoder",
        metavar="SPEC",
        help="instead of RUN_DIR, an encoder sslbench did not train: timm:NAME (random init, or --weights), local-dir:DIR "
        "(config.json + model.safetensors, e.g. `sslbench export`) or hf-hub:REPO (read from the local hub cache only); needs --data",
    )
    p.add_argument("--data", help="evaluate on this data spec instead of the run's own (required with --encoder)")
    p.add_argument(
        "--results",
        metavar="FILE",
        help=f"results store to append to (default RUN_DIR/../results.jsonl; with --encoder {DEFAULT_LEADERBOARD_RESULTS}, what `sslbench leaderboard` reads)",
    )
    p.add_argument(
        "--image-size", type=int, metavar="PX", help="with --encoder: evaluation resolution (default: the folder's input size, else the data's)"
    )
    p.add_argument("--weights", metavar="FILE", help="with --encoder timm:NAME: a state dict (.safetensors or .pth), loaded strictly")
    p.add_argument("--init-seed", type=int, metavar="N", help="with --encoder timm:NAME and no --weights: seed of the random init (default 0)")
    add_eval_flags(p)
    p.set_defaults(func=cmd_eval)


@register_command("leaderboard")
def register_leaderboard(sub: Any) -> None:
    p = sub.add_parser("leaderboard", help="render a results store as a leaderboard table")
    p.add_argument("results", nargs="?", metavar="RESULTS", help=f"results.jsonl or a directory holding one (default {DEFAULT_LEADERBOARD_RESULTS})")
    p.add_argument("--format", choices=["md", "csv", "html"], default="md", help="output format (default md)")
    p.add_argument("--output", metavar="FILE", help="write the table here instead of stdout")
    p.add_argument(
        "--plot",
        metavar="FILE.png",
        help="also draw the results: each metric against the varied setting for an ablation grid (compare --vary), else a bar chart of each group's first metric",
    )
    p.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_leaderboard)
