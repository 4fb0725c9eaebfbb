"""The ``eval``, ``compare`` and ``leaderboard`` sub-commands (registered into :mod:`sslbench.cli`).

- ``sslbench eval RUN_DIR``: rebuild a run's encoder (strict key check), score it with k-NN,
  linear-probe and/or fine-tune protocols, print a table and append one result row per protocol
  (and per label fraction) to the results store, by default ``RUN_DIR/../results.jsonl``.
- ``sslbench compare``: train several methods on the same data, backbone, budget and seeds, one run
  directory per method and seed under ``--output DIR``, evaluate them all the same way, append the
  rows to ``DIR/results.jsonl`` and render the comparison to stdout and ``DIR/leaderboard.md``.
- ``sslbench leaderboard [RESULTS]``: render a results store as Markdown, CSV or HTML (and a plot).

See ``docs/evaluation.md`` for the protocols and the row format.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import re
import shlex
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .cli import _EXTRA_COMMANDS
from .errors import UserError
from .hostmem import keep_freed_memory
from .rundir import RESULTS_STORE, RunDir, write_text_atomic

PROTOCOLS = ("knn", "linear", "finetune", "distill")
DEFAULT_LEADERBOARD_RESULTS = Path("runs") / RESULTS_STORE  # where `eval` puts rows of runs/<name>


# ---------------------------------------------------------------------------------------------
# Parsing


def parse_list(text: str, flag: str) -> list[str]:
    """``'a, b,,c'`` -> ``['a', 'b', 'c']`` (order kept, duplicates dropped); empty -> UserError."""
    items: list[str] = []
    for part in text.split(","):
        part = part.strip()
        if part and part not in items:
            items.append(part)
    if not items:
        raise UserError(f"{flag} needs at least one comma-separated value, got {text!r}")
    return items


def parse_protocols(text: str) -> list[str]:
    protocols = parse_list(text, "--protocol")
    for p in protocols:
        if p not in PROTOCOLS:
            close = difflib.get_close_matches(p, PROTOCOLS, n=1, cutoff=0.5)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UserError(f"unknown protocol {p!r}{hint}; valid: {', '.join(PROTOCOLS)}")
    return protocols


def parse_fractions(text: str) -> list[float]:
    """``'0.01,0.1,1'`` -> ``[0.01, 0.1, 1.0]``; each must lie in (0, 1]."""
    from sslbench.evals.finetune import check_fraction

    out: list[float] = []
    for part in parse_list(text, "--label-fractions"):
        try:
            value = float(part)
        except ValueError:
            raise UserError(f"--label-fractions: {part!r} is not a number; write fractions like 0.01,0.1,1") from None
        value = check_fraction(value)
        if value not in out:
            out.append(value)
    return out


def parse_seeds(text: str) -> list[int]:
    seeds = []
    for part in parse_list(text, "--seeds"):
        try:
            seeds.append(int(part))
        except ValueError:
            raise UserError(f"--seeds: {part!r} is not an integer; write e.g. --seeds 0,1,2") from None
    return seeds


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


@dataclass
class EvalOptions:
    """How ``eval`` and ``compare`` score an encoder (the same for every run of a comparison)."""

    protocols: list[str] = field(default_factory=lambda: ["knn", "linear"])
    fractions: list[float] = field(default_factory=lambda: [0.01, 0.1, 1.0])  # fine-tune label fractions
    data: str | None = None  # None: the run's own data
    linear_epochs: int = 100
    finetune_epochs: int = 10
    finetune_batch_size: int = 256
    finetune_lr: float = 0.2
    finetune_min_steps: int = 200
    from_projector_layer: int = 0
    distill_epochs: int = 10  # distillation passes over all training images (labels unused)
    distill_temperature: float = 1.0  # softmax temperature of teacher and student
    distill_label_weight: float = 0.0  # weight of the ground-truth loss on the labelled images (SimCLR v2's 1 - alpha)
    distill_student_init: str = "random"  # random (the paper: from scratch) | pretrained (the run's encoder)
    max_memory_gb: float | None = None  # evaluation data larger than this is read from disk (None: the run's max_memory_gb)
    seed: int = 0  # linear-probe validation split, fine-tune subsets and batch order (not the run's seed)
    device: str | None = None  # None: cuda when available, else cpu


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


def _read_summary(run_dir: Path) -> dict[str, Any]:
    path = RunDir(run_dir).summary
    if not path.is_file():
        print(f"note: {path} not found; the rows will lack the run's wall time and speed", file=sys.stderr)
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{path} is not readable JSON ({exc}); re-run the training or delete the file") from exc
    return data if isinstance(data, dict) else {}


def _run_fields(run_dir: Path, cfg: Any, summary: dict[str, Any], data: str, budget: tuple[str, Any], command: str, device: Any) -> dict[str, Any]:
    from .config import training_identity
    from .results import hardware_summary

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
    }


def _print_table(rows: list[dict[str, Any]], out: Callable[[str], None]) -> None:
    lines = [("protocol", "labels", "metric", "value")]
    for row in rows:
        frac = row.get("label_fraction")
        labels = "100%" if frac is None else f"{frac * 100:g}%"
        for name, value in row["metrics"].items():
            lines.append((row["protocol"]["name"], labels, name, "nan" if value is None or math.isnan(value) else f"{value:.2f}"))
    widths = [max(len(line[i]) for line in lines) for i in range(4)]
    for i, line in enumerate(lines):
        out("  ".join(c.ljust(w) if j < 3 else c.rjust(w) for j, (c, w) in enumerate(zip(line, widths))))
        if i == 0:
            out("  ".join("-" * w for w in widths))


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


def _eval_splits(cfg: Any, data: str, opts: EvalOptions) -> tuple[Any, Any]:
    """The train and test splits ``opts`` evaluates on: in memory up to ``opts.max_memory_gb`` (the
    run's ``max_memory_gb`` when unset), else read from disk, which only knn and linear can use:
    fine-tuning and distillation of such data are a :class:`UserError`."""
    from .data import ImageSplit, load_split

    limit = cfg.max_memory_gb if opts.max_memory_gb is None else opts.max_memory_gb
    tuned = sorted({"finetune", "distill"} & set(opts.protocols))
    splits = []
    for split in ("train", "test"):
        s = load_split(data, split, cfg.image_size, cache_dir=cfg.cache_dir, max_memory_gb=limit)
        if not isinstance(s, ImageSplit) and tuned:
            raise UserError(
                f"{data} {split} does not fit in memory (max_memory_gb={limit:g}); {'/'.join(tuned)} "
                "needs in-memory splits (knn and linear also read data from disk): raise --max-memory-gb"
            )
        splits.append(s)
    return splits[0], splits[1]


def evaluate_run(
    run_dir: str | Path,
    opts: EvalOptions,
    *,
    results_path: str | Path | None,
    command: str,
    budget: tuple[str, Any] | None = None,
    out: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Score the encoder of ``run_dir`` with ``opts.protocols``; append one row per protocol (and
    per label fraction) to ``results_path`` (``None``: do not store) and return the rows."""
    import torch

    from sslbench.backbones import load_encoder
    from sslbench.evals.features import split_features
    from sslbench.backbones import create_backbone
    from sslbench.evals.distill import distill, distill_protocol
    from sslbench.evals.finetune import (
        finetune_model,
        finetune_protocol,
        label_subset,
        projector_layers,
    )
    from sslbench.evals.knn import knn_eval, knn_protocol
    from sslbench.evals.linear import linear_probe, linear_protocol

    from .config import load_run_config
    from .results import append_row, make_row

    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"{run_dir} is a file; pass a run directory (config.yaml + encoder.safetensors)")
    if not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} does not exist")
    cfg = load_run_config(run_dir)
    encoder = load_encoder(run_dir)  # strict: a mismatched encoder is a UserError, never a partial load
    tuned = {"finetune", "distill"} & set(opts.protocols)
    projector = projector_layers(run_dir, opts.from_projector_layer) if tuned and opts.from_projector_layer else None
    summary = _read_summary(run_dir)
    device = _eval_device(opts.device)
    if device.type == "cpu" and cfg.keep_freed_memory:
        keep_freed_memory()  # as in training (sslbench/hostmem.py): feature extraction ~1.6x faster on CPU
    encoder = encoder.to(device)
    run_precision = summary.get("precision", cfg.precision)
    precision = run_precision if run_precision in ("bf16", "fp16") and device.type == "cuda" else "no"
    data = opts.data or cfg.data
    train, test = _eval_splits(cfg, data, opts)
    run = _run_fields(run_dir, cfg, summary, data, budget or run_budget(run_dir, cfg), command, device)

    rows: list[dict[str, Any]] = []

    def emit(metrics: dict[str, float], protocol: dict[str, Any], **extra: Any) -> None:
        protocol = {**protocol, "eval_data": data, "image_size": cfg.image_size, "precision": precision}
        row = make_row(metrics=metrics, protocol=protocol, run={**run, "label_fraction": extra.get("label_fraction")})
        if results_path is not None:
            append_row(results_path, row)
        rows.append(row)

    teachers: dict[float, tuple[Any, dict[str, float]]] = {}

    def teacher(fraction: float) -> tuple[Any, dict[str, float]]:
        """The encoder fine-tuned on ``fraction`` of the labels and its metrics, trained once for
        both the finetune row and the distillation teacher."""
        if fraction in teachers:
            return teachers[fraction]
        model_and_metrics = finetune_model(
            encoder, train, test, fraction=fraction, image_size=cfg.image_size, epochs=opts.finetune_epochs,
            batch_size=opts.finetune_batch_size, lr=opts.finetune_lr, seed=opts.seed, projector=projector,
            device=device, precision=precision, min_steps=opts.finetune_min_steps,
        )
        if "distill" in opts.protocols:  # kept only when a distillation will need it
            teachers[fraction] = model_and_metrics
        return model_and_metrics

    def finetune_record(fraction: float) -> dict[str, Any]:
        return finetune_protocol(
            fraction=fraction, n_labelled=len(label_subset(train, fraction, opts.seed)[0]), epochs=opts.finetune_epochs,
            batch_size=opts.finetune_batch_size, lr=opts.finetune_lr, seed=opts.seed,
            from_projector_layer=opts.from_projector_layer, min_steps=opts.finetune_min_steps,
        )

    feats: tuple[Any, Any] | None = None
    for protocol in opts.protocols:
        t0 = time.perf_counter()
        if protocol in ("knn", "linear") and feats is None:
            feats = tuple(split_features(encoder, s, image_size=cfg.image_size, device=device, precision=precision, num_workers=cfg.num_workers) for s in (train, test))
        if protocol == "knn":
            m = knn_eval(feats[0].to(device), train.labels.to(device), feats[1].to(device), test.labels.to(device), k=cfg.knn_k, temperature=cfg.knn_temperature)
            emit(m, knn_protocol(cfg.knn_k, cfg.knn_temperature))
        elif protocol == "linear":
            m = linear_probe(feats[0], train.labels, feats[1], test.labels, epochs=opts.linear_epochs, seed=opts.seed, device=device)
            best_lr, best_wd = m.pop("linear_best_lr"), m.pop("linear_best_wd")
            emit(m, linear_protocol(epochs=opts.linear_epochs, seed=opts.seed, best_lr=best_lr, best_wd=best_wd))
        elif protocol == "finetune":
            for fraction in opts.fractions:
                m = teacher(fraction)[1]
                emit(m, finetune_record(fraction), label_fraction=fraction)
        else:
            for fraction in opts.fractions:
                if opts.distill_student_init == "pretrained":
                    student = encoder
                else:
                    torch.manual_seed(opts.seed)
                    student = create_backbone(cfg.backbone, cfg.image_size, **cfg.backbone_kwargs)
                model, _ = teacher(fraction)
                m = distill(
                    model, student, train, test, fraction=fraction, image_size=cfg.image_size, epochs=opts.distill_epochs,
                    batch_size=opts.finetune_batch_size, lr=opts.finetune_lr, temperature=opts.distill_temperature,
                    label_weight=opts.distill_label_weight, seed=opts.seed, device=device, precision=precision,
                    min_steps=opts.finetune_min_steps,
                )
                emit(m, distill_protocol(
                    fraction=fraction, n_labelled=len(label_subset(train, fraction, opts.seed)[0]), n_images=len(train),
                    student_init=opts.distill_student_init, epochs=opts.distill_epochs, batch_size=opts.finetune_batch_size,
                    lr=opts.finetune_lr, temperature=opts.distill_temperature, label_weight=opts.distill_label_weight,
                    min_steps=opts.finetune_min_steps, seed=opts.seed, teacher=finetune_record(fraction),
                ), label_fraction=fraction)
        print(f"note: {protocol} evaluation of {run_dir} took {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    out(f"{run_dir}: {cfg.method} / {cfg.backbone} / {run['data']} / {run['budget_kind']}={run['budget']}")
    _print_table(rows, out)
    return rows


# ---------------------------------------------------------------------------------------------
# Command handlers


def _command_line(args: argparse.Namespace) -> str:
    argv = getattr(args, "argv", None)
    return "sslbench " + shlex.join(argv if argv is not None else sys.argv[1:])


def _eval_options(args: argparse.Namespace) -> EvalOptions:
    if args.from_projector_layer < 0:
        raise UserError(f"--from-projector-layer must be >= 0, got {args.from_projector_layer}")
    for flag, value in (("--linear-epochs", args.linear_epochs), ("--finetune-epochs", args.finetune_epochs), ("--finetune-batch-size", args.finetune_batch_size)):
        if value < 1:
            raise UserError(f"{flag} must be >= 1, got {value}")
    if args.finetune_min_steps < 0:
        raise UserError(f"--finetune-min-steps must be >= 0, got {args.finetune_min_steps}")
    if not args.finetune_lr > 0:
        raise UserError(f"--finetune-lr must be > 0, got {args.finetune_lr}")
    if args.max_memory_gb is not None and not args.max_memory_gb >= 0:
        raise UserError(f"--max-memory-gb must be >= 0, got {args.max_memory_gb}")
    if args.distill_epochs < 1:
        raise UserError(f"--distill-epochs must be >= 1, got {args.distill_epochs}")
    if not args.distill_temperature > 0:
        raise UserError(f"--distill-temperature must be > 0, got {args.distill_temperature}")
    if not 0.0 <= args.distill_label_weight <= 1.0:
        raise UserError(f"--distill-label-weight must be in [0, 1], got {args.distill_label_weight}")
    return EvalOptions(
        protocols=parse_protocols(args.protocol),
        fractions=parse_fractions(args.label_fractions),
        data=getattr(args, "data", None) if args.command == "eval" else None,
        linear_epochs=args.linear_epochs,
        finetune_epochs=args.finetune_epochs,
        finetune_batch_size=args.finetune_batch_size,
        finetune_lr=args.finetune_lr,
        finetune_min_steps=args.finetune_min_steps,
        from_projector_layer=args.from_projector_layer,
        distill_epochs=args.distill_epochs,
        distill_temperature=args.distill_temperature,
        distill_label_weight=args.distill_label_weight,
        distill_student_init=args.distill_student_init,
        max_memory_gb=args.max_memory_gb,
        seed=args.eval_seed,
        device=args.device,
    )


def cmd_eval(args: argparse.Namespace) -> int:
    opts = _eval_options(args)
    run_dir = Path(args.run_dir)
    results = Path(args.results) if args.results else RunDir(run_dir).results_store
    if results.suffix != ".jsonl":  # before anything is evaluated (append_row refuses it too)
        raise UserError(f"--results {results} must be a .jsonl file (JSON Lines), e.g. results.jsonl; refusing to append to it")
    evaluate_run(run_dir, opts, results_path=results, command=_command_line(args))
    print(f"appended results to {results}", file=sys.stderr)
    return 0


def _effective_batch(cfg: Any) -> int:
    """The global batch the trainer will use in one process (clipped to the training set)."""
    from .data import load_split

    n = len(load_split(cfg.data, "train", cfg.image_size, cache_dir=cfg.cache_dir, max_memory_gb=cfg.max_memory_gb))
    if cfg.train_subset is not None:
        n = min(n, cfg.train_subset)
    return min(cfg.batch_size, n)


def _same_config(cfg: Any, run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a run of exactly this config (so ``compare`` can be re-run): equal
    in every field but ``output``, which may be spelled differently (relative, absolute, moved)."""
    import yaml

    from .config import dump_yaml

    try:
        saved = yaml.safe_load(RunDir(run_dir).config.read_text())
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return False
    if not isinstance(saved, dict):
        return False
    ours = yaml.safe_load(dump_yaml(cfg))  # the same YAML round trip as config.yaml
    saved.pop("output", None)
    ours.pop("output", None)
    return saved == ours


def _stored_rows(results: Path, run_dir: Path, cfg: Any, opts: EvalOptions) -> tuple[list[dict[str, Any]], EvalOptions | None]:
    """Split ``opts`` into what ``results`` already holds for ``run_dir`` (the newest row of each
    protocol and label fraction evaluated exactly so) and what is left to evaluate (``None``: nothing)."""
    from .results import read_rows

    rows = read_rows(results) if results.is_file() else []
    here = [r for r in rows if r.get("run_dir") == str(run_dir.resolve()) and isinstance(r.get("protocol"), dict)]
    data = opts.data or cfg.data

    def stored(name: str, fraction: float | None, expect: dict[str, Any]) -> dict[str, Any] | None:
        match = [r for r in here if r["protocol"].get("name") == name and r.get("label_fraction") == fraction
                 and r["protocol"].get("eval_data") == data and all(_matches(r["protocol"].get(k), v) for k, v in expect.items())]
        return match[-1] if match else None

    found: list[dict[str, Any]] = []
    protocols: list[str] = []
    fractions: list[float] = []
    tuned = {"epochs": opts.finetune_epochs, "batch_size": opts.finetune_batch_size, "lr": opts.finetune_lr,
             "seed": opts.seed, "from_projector_layer": opts.from_projector_layer, "min_steps": opts.finetune_min_steps}
    distilled = {"epochs": opts.distill_epochs, "batch_size": opts.finetune_batch_size, "lr": opts.finetune_lr,
                 "seed": opts.seed, "min_steps": opts.finetune_min_steps, "temperature": opts.distill_temperature,
                 "label_weight": opts.distill_label_weight, "student_init": opts.distill_student_init,
                 "teacher": lambda t: isinstance(t, dict) and all(t.get(k) == v for k, v in tuned.items())}
    for protocol in opts.protocols:
        if protocol in ("finetune", "distill"):
            missing = False
            for fraction in opts.fractions:
                row = stored(protocol, fraction, tuned if protocol == "finetune" else distilled)
                found += [row] if row else []
                if row is None:
                    missing = True
                    fractions += [] if fraction in fractions else [fraction]
            protocols += [protocol] if missing else []
            continue
        if protocol == "knn":
            row = stored("knn", None, {"k": cfg.knn_k, "temperature": cfg.knn_temperature, "weighting": "exp(sim/T)"})
        else:
            row = stored("linear", None, {"epochs": opts.linear_epochs, "seed": opts.seed, "train_augmentation": None})
        found += [row] if row else []
        protocols += [] if row else [protocol]
    # Fine-tuning and distillation share one list of fractions: a stored row at a fraction that
    # is evaluated again for the other protocol is replaced by the new row, never counted twice.
    found = [r for r in found if not (r["protocol"]["name"] in protocols and r.get("label_fraction") in fractions)]
    return found, (dataclasses.replace(opts, protocols=protocols, fractions=fractions or opts.fractions) if protocols else None)


def _matches(value: Any, expected: Any) -> bool:
    """A stored protocol field against what is asked: equal, or accepted by ``expected`` when it is a predicate."""
    return bool(expected(value)) if callable(expected) else value == expected


def _finished(cfg: Any, run_dir: Path) -> bool:
    return _same_config(cfg, run_dir) and RunDir(run_dir).is_finished()


def plan_compare(
    methods: list[str],
    seeds: list[int],
    budget: tuple[str, Any],
    *,
    out_dir: Path,
    flags: dict[str, Any] | None = None,
    file_values: dict[str, Any] | None = None,
    sets: list[str] | None = None,
) -> list[tuple[str, int, Any]]:
    """One resolved config per (method, seed), all with the same data, backbone and budget, run
    directory ``out_dir/<method>-seed<seed>``. ``budget``: ``("epochs", N)``, ``("steps", N)``,
    ``("images", N)`` (steps = ceil(N / effective batch)) or ``("time", "10m")``."""
    from sslbench.backbones import _check_name

    from .config import build_config

    from .config import split_set_args

    owned = {"method": "--methods", "seed": "--seeds", "output": "--output", "epochs": "the budget flags",
             "steps": "the budget flags", "time_budget_s": "the budget flags"}
    for key, _ in split_set_args(list(sets or [])):
        if key in owned:
            raise UserError(f"--set {key}=... is set by compare itself (one value per run); use {owned[key]} instead")
    plans = []
    for method in methods:
        for seed in seeds:
            run_flags = {**(flags or {}), "method": method, "seed": seed, "output": str(out_dir / f"{method}-seed{seed}")}
            cfg = build_config(file_values=dict(file_values or {}), flags=run_flags, sets=list(sets or []))
            _check_name(cfg.backbone)  # an unknown backbone fails before anything trains
            cfg.epochs = cfg.steps = cfg.time_budget_s = None  # the budget below is the only one
            kind, value = budget
            if kind == "epochs":
                cfg.epochs = value
            elif kind == "steps":
                cfg.steps = value
            elif kind == "images":
                cfg.steps = math.ceil(value / _effective_batch(cfg))
            elif kind == "time":
                cfg.time_budget_s = parse_duration(str(value))
            else:
                raise ValueError(f"unknown budget kind {kind!r}")
            if hasattr(cfg, "quick_knn"):
                cfg.quick_knn = False  # every run is evaluated afterwards with the comparison's protocols
            cfg.validate()
            plans.append((method, seed, cfg))
    return plans


def cmd_compare(args: argparse.Namespace) -> int:
    from .config import load_yaml
    from .leaderboard import render
    from .registry import get_method
    from .trainer import train

    methods = parse_list(args.methods, "--methods")
    for name in methods:
        get_method(name)  # unknown names: the registry's UserError, before anything trains
    seeds = parse_seeds(args.seeds)
    opts = _eval_options(args)
    if args.epochs is not None:
        budget: tuple[str, Any] = ("epochs", args.epochs)
    elif args.steps is not None:
        budget = ("steps", args.steps)
    elif args.images is not None:
        budget = ("images", args.images)
    else:
        budget = ("time", format_duration(parse_duration(args.time_budget)))
    if budget[0] != "time" and budget[1] < 1:
        raise UserError(f"--{budget[0]} must be >= 1, got {budget[1]}")
    file_values = load_yaml(args.config) if args.config else {}
    stamp = time.strftime("%Y%m%d-%H%M%S")
    data_name = str(args.data or file_values.get("data") or "digits").replace(":", "-").replace("/", "_").strip("_")[-40:]
    out_dir = Path(args.output) if args.output else Path("runs") / f"compare-{data_name}-{args.backbone or 'resnet18'}-{stamp}"

    flags = {"backbone": args.backbone, "data": args.data, "batch_size": args.batch_size,
             "image_size": args.image_size, "precision": args.precision}
    plans = plan_compare(methods, seeds, budget, out_dir=out_dir, flags=flags, file_values=file_values, sets=args.sets)

    for _, _, cfg in plans:  # before anything trains: a comparison never overwrites another one's runs
        run_dir = Path(cfg.output)
        if RunDir(run_dir).config.is_file() and not _same_config(cfg, run_dir):
            raise UserError(f"{run_dir} holds a run with another config than this comparison's; pass a new --output, "
                            "or repeat the original command to continue that comparison")
    if {"finetune", "distill"} & set(opts.protocols) and plans:  # before anything trains: they need the data in memory
        _eval_splits(plans[0][2], plans[0][2].data, opts)
    results = out_dir / RESULTS_STORE
    command = _command_line(args)
    rows: list[dict[str, Any]] = []
    for i, (method, seed, cfg) in enumerate(plans, 1):
        run_dir = Path(cfg.output)
        todo = opts
        if _finished(cfg, run_dir):
            stored, todo = _stored_rows(results, run_dir, cfg, opts)
            rows += stored  # a re-run of an interrupted comparison never scores (or stores) a run twice
            what = "reusing its stored rows" if todo is None else f"evaluating {','.join(todo.protocols)}"
            print(f"[{i}/{len(plans)}] {method} seed {seed}: {run_dir} already finished with this config; {what}", file=sys.stderr)
            if todo is None:
                continue
        else:
            resume = _same_config(cfg, run_dir)  # an interrupted run of this comparison continues
            print(f"[{i}/{len(plans)}] {'resuming' if resume else 'training'} {method} seed {seed} -> {run_dir}", file=sys.stderr)
            result = train(cfg, resume=resume, quiet=args.quiet, resume_command=f"{command} (the same command)")
            if result.stopped_early:
                if result.stop_signal:  # pre-empted: 143/130 as for train, so a scheduler sees a signal
                    return 128 + result.stop_signal
                raise UserError(f"training of {run_dir} was interrupted; run the same command again to resume the comparison")
        write_text_atomic(RunDir(run_dir).budget, json.dumps({"kind": budget[0], "value": budget[1]}) + "\n", "free some space and run the same command again")
        rows += evaluate_run(run_dir, todo, results_path=results, command=command, budget=budget)

    text = render(rows, "md")
    board = out_dir / "leaderboard.md"
    write_text_atomic(board, text, f"the rows are in {results}: render them with `sslbench leaderboard {results}`")
    print()
    print(text, end="")
    print(f"rows appended to {results}; leaderboard written to {board}", file=sys.stderr)
    return 0


def cmd_leaderboard(args: argparse.Namespace) -> int:
    from .leaderboard import plot, render
    from .results import read_rows

    path = Path(args.results) if args.results else DEFAULT_LEADERBOARD_RESULTS
    if path.is_dir():
        path = path / RESULTS_STORE
    if not path.is_file():
        raise UserError(f"results file {path} not found; pass the results.jsonl written by `sslbench eval` or `sslbench compare`")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rows = read_rows(path)
    if not rows and path.stat().st_size > 0:  # not a store with a torn line: the wrong file
        raise UserError(f"{path} holds no result rows (every line is unreadable); pass a results.jsonl written by `sslbench eval` or `sslbench compare`")
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    text = render(rows, args.format)
    if args.output:
        out = Path(args.output)
        if out.suffix == ".jsonl" or (out.exists() and out.resolve() == path.resolve()):
            raise UserError(f"--output {out} would overwrite a results store; write the table to e.g. leaderboard.{args.format}")
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


def _add_eval_flags(p: argparse.ArgumentParser, *, default_protocols: str) -> None:
    p.add_argument("--protocol", default=default_protocols, help=f"comma-separated: {', '.join(PROTOCOLS)} (default {default_protocols})")
    p.add_argument("--label-fractions", default="0.01,0.1,1", help="fine-tune and distill label fractions in (0, 1] (default 0.01,0.1,1)")
    p.add_argument("--linear-epochs", type=int, default=100, help="linear-probe epochs (default 100)")
    p.add_argument("--finetune-epochs", type=int, default=10, help="fine-tuning epochs per label fraction (default 10)")
    p.add_argument("--finetune-batch-size", type=int, default=256, help="fine-tuning batch size (default 256)")
    p.add_argument("--finetune-lr", type=float, default=0.2, help="fine-tuning learning rate (default 0.2, cosine)")
    p.add_argument("--finetune-min-steps", type=int, default=200, help="at least this many fine-tuning steps per fraction (default 200)")
    p.add_argument("--from-projector-layer", type=int, default=0, metavar="K",
                   help="fine-tune from the K-th hidden projector layer (SimCLR v2: 1); default 0: the encoder")
    p.add_argument("--distill-epochs", type=int, default=10, help="distillation passes over all training images (default 10)")
    p.add_argument("--distill-temperature", type=float, default=1.0, help="distillation softmax temperature (default 1)")
    p.add_argument("--distill-label-weight", type=float, default=0.0,
                   help="weight of the ground-truth loss on the labelled images, in [0, 1] (default 0: distillation only)")
    p.add_argument("--distill-student-init", choices=["random", "pretrained"], default="random",
                   help="student encoder: random (from scratch, as SimCLR v2) or pretrained (the run's encoder); default random")
    p.add_argument("--max-memory-gb", type=float, metavar="GB",
                   help="evaluation data larger than this is read from disk: k-NN and linear only (default: the run's max_memory_gb)")
    p.add_argument("--eval-seed", type=int, default=0, help="seed of validation split, label subsets and batch order (default 0)")
    p.add_argument("--device", help="evaluation device (default cuda when available, else cpu)")
    p.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)


def register_eval(sub: Any) -> None:
    p = sub.add_parser("eval", help="evaluate a run's encoder (k-NN, linear probe, fine-tune) and store the results")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a finished run directory (config.yaml + encoder.safetensors)")
    p.add_argument("--data", help="evaluate on this data spec instead of the run's own")
    p.add_argument("--results", metavar="FILE", help="results store to append to (default RUN_DIR/../results.jsonl)")
    _add_eval_flags(p, default_protocols="knn,linear")
    p.set_defaults(func=cmd_eval)


def register_compare(sub: Any) -> None:
    p = sub.add_parser("compare", help="train several methods under one budget and compare them")
    p.add_argument("--methods", required=True, help="comma-separated method names, e.g. simclr,moco,byol,simsiam")
    p.add_argument("--backbone", help="timm model name (default resnet18)")
    p.add_argument("--data", help="data spec (default digits)")
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--epochs", type=int, help="passes over the training data")
    budget.add_argument("--steps", type=int, help="optimizer steps")
    budget.add_argument("--images", type=int, help="images seen in total (steps = ceil(N / batch size))")
    budget.add_argument("--time-budget", metavar="DURATION", help="wall-clock training time per run, e.g. 90s, 10m, 1h")
    p.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    p.add_argument("--output", metavar="DIR", help="comparison directory (default runs/compare-<data>-<backbone>-<time>)")
    p.add_argument("--batch-size", type=int, help="global batch size (default 256)")
    p.add_argument("--image-size", type=int, help="resolution in pixels (default: the data's own; digits 16, cifar 32, stl10 96, else 32)")
    p.add_argument("--precision", help="auto | no | bf16 | fp16")
    p.add_argument("--config", metavar="FILE.yaml", help="YAML file of config values for every run")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key for every run (must be valid for every method)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_eval_flags(p, default_protocols="knn,linear")
    p.set_defaults(func=cmd_compare)


def register_leaderboard(sub: Any) -> None:
    p = sub.add_parser("leaderboard", help="render a results store as a leaderboard table")
    p.add_argument("results", nargs="?", metavar="RESULTS", help=f"results.jsonl or a directory holding one (default {DEFAULT_LEADERBOARD_RESULTS})")
    p.add_argument("--format", choices=["md", "csv", "html"], default="md", help="output format (default md)")
    p.add_argument("--output", metavar="FILE", help="write the table here instead of stdout")
    p.add_argument("--plot", metavar="FILE.png", help="also draw a bar chart of each group's first metric")
    p.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_leaderboard)


for _register in (register_eval, register_compare, register_leaderboard):
    if _register not in _EXTRA_COMMANDS:
        _EXTRA_COMMANDS.append(_register)
