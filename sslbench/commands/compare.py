"""``sslbench compare``: several methods under one data set, backbone, budget and seeds, and
ablation grids (``--vary KEY=V1,V2,...``, :mod:`sslbench.results.grid`).

It plans one run directory per method, grid setting and seed under ``--output DIR``, trains each
(or resumes an interrupted one), evaluates them all with the same protocols
(:mod:`sslbench.protocols`), appends the rows (each with its grid setting as ``vary``) to
``DIR/results.jsonl`` (or ``--results FILE``) and renders the comparison to stdout and
``DIR/leaderboard.md`` (and ``--plot FILE``).

Re-running the same command continues it: a run that finished with this config is not trained
again and its stored rows are reused (each protocol's ``reuse_key``), so only what is missing is
evaluated; an interrupted run resumes from its last checkpoint; a run directory holding another
config is refused before anything trains.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sslbench.commands import evaluate as commands
from sslbench.config import check_config_file, check_precision
from sslbench.core.errors import UserError
from sslbench.core.registry import register_command
from sslbench.core.rundir import RESULTS_STORE, RUNS, RunDir, check_writable, write_text_atomic
from sslbench.core.runlock import RunLock
from sslbench.evaluation.protocols import EvalOptions, add_eval_flags, eval_options, get_protocol, parse_list, reusable

LEADERBOARD_FILE = "leaderboard.md"  # in the comparison's directory, next to its results.jsonl
# Config keys compare sets itself (one value per run), and the flags that set them.
OWNED_KEYS = {
    "method": "--methods",
    "seed": "--seeds",
    "output": "--output",
    "epochs": "the budget flags",
    "steps": "the budget flags",
    "time_budget_s": "the budget flags",
}


def parse_seeds(text: str) -> list[int]:
    seeds = []
    for part in parse_list(text, "--seeds"):
        try:
            seeds.append(int(part))
        except ValueError:
            raise UserError(f"--seeds: {part!r} is not an integer; write e.g. --seeds 0,1,2") from None
    return seeds


def _effective_batch(cfg: Any) -> int:
    """The global batch the trainer will use in one process (clipped to the training set)."""
    from sslbench.data import load_split

    n = len(load_split(cfg.data, "train", cfg.image_size, cache_dir=cfg.cache_dir, max_memory_gb=cfg.max_memory_gb))
    if cfg.train_subset is not None:
        n = min(n, cfg.train_subset)
    return int(min(cfg.batch_size, n))


@dataclass
class Plan:
    """One run of a comparison: its method, seed, resolved config (``cfg.output`` is its run
    directory) and grid setting (``{canonical key: value}``, empty without ``--vary``)."""

    method: str
    seed: int
    cfg: Any
    settings: dict[str, Any] = field(default_factory=dict)


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
    plans = plan_grid(methods, seeds, budget, out_dir=out_dir, flags=flags, file_values=file_values, sets=sets)
    return [(p.method, p.seed, p.cfg) for p in plans]


def plan_grid(
    methods: list[str],
    seeds: list[int],
    budget: tuple[str, Any],
    *,
    out_dir: Path,
    flags: dict[str, Any] | None = None,
    file_values: dict[str, Any] | None = None,
    sets: list[str] | None = None,
    vary: list[str] | None = None,
) -> list[Plan]:
    """:func:`plan_compare` over the grid of ``vary`` (``["KEY=V1,V2", ...]``, see
    :mod:`sslbench.results.grid`): one run per method, grid setting and seed (in that order), run
    directory ``out_dir/<method>[-<setting>...]-seed<seed>``. Every key and value is checked
    before anything trains; a mistake is a :class:`UserError` naming the flag."""
    from sslbench.backbones import _check_name
    from sslbench.config import build_config, split_set_args
    from sslbench.results.grid import canonical_key, config_value, grid_points, parse_vary, run_name, varying_keys

    sets = list(sets or [])
    for key, _ in split_set_args(sets):
        if key in OWNED_KEYS:
            raise UserError(f"--set {key}=... is set by compare itself (one value per run); use {OWNED_KEYS[key]} instead")
    axes_raw = parse_vary(list(vary or []))

    def resolve(method: str, seed: int, extra: list[str], output: Path | None = None) -> Any:
        run_flags = {**(flags or {}), "method": method, "seed": seed, "output": str(output or out_dir)}
        return build_config(file_values=dict(file_values or {}), flags=run_flags, sets=[*sets, *extra])

    # the grid's axes: canonical keys and resolved values, each checked on its own (named in the error)
    set_keys = {canonical_key(k, methods[0]) for k, _ in split_set_args(sets)}
    axes: list[tuple[str, list[Any]]] = []
    raw_of: dict[tuple[str, str], str] = {}
    for key, raws in axes_raw:
        if key.partition(".")[0] in OWNED_KEYS or key in OWNED_KEYS:
            raise UserError(f"--vary {key}: compare sets {key} itself; use {OWNED_KEYS.get(key, 'another key')} instead")
        canon = canonical_key(key, methods[0])
        if canon in (k for k, _ in axes):
            raise UserError(f"--vary {key}: {canon} is varied twice; give its values in one --vary")
        if canon in set_keys:
            raise UserError(f"--vary {key} and --set {key}: a key is either set for every run or varied; give one")
        values: list[Any] = []
        for raw in raws:
            try:
                value = config_value(resolve(methods[0], seeds[0], [f"{key}={raw}"]), canon)
            except UserError as exc:
                raise UserError(f"--vary {key}={raw}: {exc}") from None
            if value in values:
                raise UserError(f"--vary {key}: the value {raw!r} is given twice (or equals another value once resolved)")
            values.append(value)
            raw_of[canon, json.dumps(value, sort_keys=True)] = raw
        axes.append((canon, values))
    points = grid_points(axes)
    named = varying_keys(points)

    plans: list[Plan] = []
    for method in methods:
        for setting in points:
            extra = [f"{k}={raw_of[k, json.dumps(v, sort_keys=True)]}" for k, v in setting.items()]
            for seed in seeds:
                output = out_dir / (run_name(method, seed, setting, named) if axes else f"{method}-seed{seed}")
                try:
                    cfg = resolve(method, seed, extra, output)
                except UserError as exc:
                    where = f"--vary setting {', '.join(extra)} for {method}" if extra else f"--methods {method}"
                    raise UserError(f"{where}: {exc}") from None
                _check_name(cfg.backbone)  # an unknown backbone fails before anything trains
                _apply_budget(cfg, budget)
                plans.append(Plan(method, seed, cfg, dict(setting)))
    names = [p.cfg.output for p in plans]
    if len(set(names)) != len(names):
        raise UserError(f"--vary: two grid settings give the same run name ({max(names, key=names.count)}); give values that differ as text")
    return plans


def _apply_budget(cfg: Any, budget: tuple[str, Any]) -> None:
    """Make ``budget`` the config's only budget (and leave scoring to the comparison's protocols)."""
    cfg.epochs = cfg.steps = cfg.time_budget_s = None
    kind, value = budget
    if kind == "epochs":
        cfg.epochs = value
    elif kind == "steps":
        cfg.steps = value
    elif kind == "images":
        cfg.steps = math.ceil(value / _effective_batch(cfg))
    elif kind == "time":
        cfg.time_budget_s = commands.parse_duration(str(value))
    elif kind == "device_hours":
        # devices x training time: each of the run's processes (one device each) trains for H / N hours
        cfg.time_budget_s = value * 3600 / int(os.environ.get("WORLD_SIZE", "1"))
    else:
        raise ValueError(f"unknown budget kind {kind!r}")
    cfg.quick_knn = False  # every run is evaluated afterwards with the comparison's protocols
    cfg.validate()


def check_depths(plans: list[Plan], opts: EvalOptions) -> None:
    """Every ``--features`` depth exists in every planned run's projector (and fine-tuning can
    start there): checked on freshly built methods before anything trains."""
    from sslbench.config.build import build_method
    from sslbench.evaluation.features import projector_depths

    if not any(get_protocol(p).per_features for p in opts.protocols) or opts.features == ["h"]:
        return
    if "finetune" in opts.protocols:
        from sslbench.evals.protocols import start_layer

        for depth in opts.features:
            start_layer(opts, depth)
    seen: set[str] = set()
    for plan in plans:
        identity = json.dumps({"method": plan.method, **plan.settings}, sort_keys=True, default=str)
        if identity in seen:
            continue
        seen.add(identity)
        projector = getattr(build_method(plan.cfg), "projector", None)
        valid = projector_depths(projector)
        missing = [d for d in opts.features if d not in valid]
        if missing:
            raise UserError(
                f"--features {','.join(missing)}: {plan.cfg.output} ({plan.method}) would have the depths {', '.join(valid)} only; score it at those"
            )


def _same_config(cfg: Any, run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a run of exactly this config (so ``compare`` can be re-run): equal
    in every field but ``output``, which may be spelled differently (relative, absolute, moved)."""
    import yaml

    from sslbench.config import config_from_dict, dump_yaml

    try:
        saved = yaml.safe_load(RunDir(run_dir).config.read_text())
        if not isinstance(saved, dict):
            return False
        saved = yaml.safe_load(dump_yaml(config_from_dict(saved)))  # its defaults resolved (a config.yaml of an older version)
    except (OSError, yaml.YAMLError, UnicodeDecodeError, UserError):
        return False
    ours = yaml.safe_load(dump_yaml(cfg))  # the same YAML round trip as config.yaml
    saved.pop("output", None)
    ours.pop("output", None)
    return bool(saved == ours)


def _finished(cfg: Any, run_dir: Path) -> bool:
    return _same_config(cfg, run_dir) and RunDir(run_dir).is_finished()


def _stored_rows(results: Path, run_dir: Path, cfg: Any, opts: EvalOptions) -> tuple[list[dict[str, Any]], EvalOptions | None]:
    """Split ``opts`` into what ``results`` already holds for ``run_dir`` (the newest row of each
    protocol and label fraction evaluated exactly so) and what is left to evaluate (``None``: nothing)."""
    from sslbench.results import read_rows

    rows = read_rows(results) if results.is_file() else []
    return reusable(opts, cfg, [r for r in rows if r.get("run_dir") == str(run_dir.resolve())])


def _budget(args: argparse.Namespace) -> tuple[str, Any]:
    if args.epochs is not None:
        budget: tuple[str, Any] = ("epochs", args.epochs)
    elif args.steps is not None:
        budget = ("steps", args.steps)
    elif args.images is not None:
        budget = ("images", args.images)
    elif args.device_hours is not None:
        if not (math.isfinite(args.device_hours) and args.device_hours > 0):
            raise UserError(f"--device-hours must be a positive number of hours, got {args.device_hours:g}")
        budget = ("device_hours", args.device_hours)
    else:
        budget = ("time", commands.format_duration(commands.parse_duration(args.time_budget)))
    if budget[0] not in ("time", "device_hours") and budget[1] < 1:
        raise UserError(f"--{budget[0]} must be >= 1, got {budget[1]}")
    return budget


def cmd_compare(args: argparse.Namespace) -> int:
    from sslbench.config import load_yaml
    from sslbench.core.registry import get_method

    methods = parse_list(args.methods, "--methods")
    for name in methods:
        get_method(name)  # unknown names: the registry's UserError, before anything trains
    seeds = parse_seeds(args.seeds)
    opts = eval_options(args)
    budget = _budget(args)
    file_values = load_yaml(args.config) if args.config else {}
    if args.config:
        for name in methods:
            check_config_file(args.config, {k: v for k, v in file_values.items() if k != "method"}, method=name)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    data_name = str(args.data or file_values.get("data") or "digits").replace(":", "-").replace("/", "_").strip("_")[-40:]
    out_dir = Path(args.output) if args.output else RUNS / f"compare-{data_name}-{args.backbone or 'resnet18'}-{stamp}"
    results = Path(args.results) if args.results else out_dir / RESULTS_STORE
    if results.suffix != ".jsonl":
        raise UserError(f"--results {results} must be a .jsonl file (JSON Lines), e.g. results.jsonl")
    if args.plot:
        _check_plot_path(args.plot)

    flags = {"backbone": args.backbone, "data": args.data, "batch_size": args.batch_size, "image_size": args.image_size, "precision": args.precision}
    plans = plan_grid(methods, seeds, budget, out_dir=out_dir, flags=flags, file_values=file_values, sets=args.sets, vary=args.vary)
    check_depths(plans, opts)

    for plan in plans:  # before anything trains: a comparison never overwrites another one's runs
        check_precision(plan.cfg.precision)
        run_dir = Path(plan.cfg.output)
        if RunDir(run_dir).config.is_file() and not _same_config(plan.cfg, run_dir):
            raise UserError(
                f"{run_dir} holds a run with another config than this comparison's; pass a new --output, "
                "or repeat the original command to continue that comparison"
            )
    if plans:  # before anything trains: the evaluation data (two classes or more; in memory for the protocols that need it)
        commands.eval_splits(plans[0].cfg, plans[0].cfg.data, opts)
    check_writable(out_dir, "--output", directory=True, fix="pass a writable --output DIR")
    with RunLock(out_dir, what="compare").acquire(fix="pass another --output"):  # one comparison per directory
        return _run_compare(args, plans, opts, budget, out_dir, results)


def _run_compare(args: argparse.Namespace, plans: list[Any], opts: EvalOptions, budget: tuple[str, Any], out_dir: Path, results: Path) -> int:
    from sslbench.commands.pipeline import train_and_score
    from sslbench.results.leaderboard import render
    from sslbench.results.plot import plot

    command = commands.command_line(args)
    rows: list[dict[str, Any]] = []
    appended = 0  # the rows this command stored (a re-run reuses the stored ones)
    for i, plan in enumerate(plans, 1):
        method, seed, cfg = plan.method, plan.seed, plan.cfg
        run_dir = Path(cfg.output)
        what_run = f"{method} {_setting_label(plan.settings)}seed {seed}"
        todo: EvalOptions | None = opts
        if not _finished(cfg, run_dir) and args.reuse_from:
            _link_finished_run(cfg, run_dir, [Path(d) for d in args.reuse_from])
        if _finished(cfg, run_dir):
            stored, todo = _stored_rows(results, run_dir, cfg, opts)
            rows += stored  # a re-run of an interrupted comparison never scores (or stores) a run twice
            what = "reusing its stored rows" if todo is None else f"evaluating {','.join(todo.protocols)}"
            print(f"[{i}/{len(plans)}] {what_run}: {run_dir} already finished with this config; {what}", file=sys.stderr)
            if todo is None:
                continue
        else:
            resume = _same_config(cfg, run_dir)  # an interrupted run of this comparison continues
            print(f"[{i}/{len(plans)}] {'resuming' if resume else 'training'} {what_run} -> {run_dir}", file=sys.stderr)
            result = train_and_score(cfg, resume=resume, quiet=args.quiet, resume_command=f"{command} (the same command)")
            if result.stopped_early:
                if result.stop_signal:  # pre-empted: 143/130 as for train, so a scheduler sees a signal
                    return 128 + result.stop_signal
                raise UserError(f"training of {run_dir} was interrupted; run the same command again to resume the comparison")
        write_text_atomic(
            RunDir(run_dir).budget, json.dumps({"kind": budget[0], "value": budget[1]}) + "\n", "free some space and run the same command again"
        )
        assert todo is not None  # a finished run with nothing left to evaluate continued above
        extra = {"vary": plan.settings} if args.vary else None
        scored = commands.evaluate_run(run_dir, todo, results_path=results, command=command, budget=budget, run_fields=extra)
        rows += scored
        appended += len(scored)

    text = render(rows, "md")
    board = out_dir / LEADERBOARD_FILE
    write_text_atomic(board, text, f"the rows are in {results}: render them with `sslbench leaderboard {results}`")
    print()
    print(text, end="")
    told = (
        f"{appended} row{'' if appended == 1 else 's'} appended to {results}"
        if appended
        else f"no rows appended to {results} (all were stored already)"
    )
    print(f"{told}; leaderboard written to {board}", file=sys.stderr)
    if args.plot:
        plot(rows, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


def _setting_label(settings: dict[str, Any]) -> str:
    from sslbench.results.grid import setting_text

    return "".join(f"{setting_text(k, v)} " for k, v in settings.items())


def _check_plot_path(path: str) -> None:
    """A plot needs matplotlib and a file name it can write: checked before anything trains."""
    from sslbench.results.plot import plot_formats

    suffix = Path(path).suffix.lstrip(".").lower()
    formats = plot_formats()
    if suffix not in formats:
        raise UserError(f"--plot {path}: name the image with one of the suffixes {', '.join(formats)} (e.g. grid.png)")


def _link_finished_run(cfg: Any, run_dir: Path, roots: list[Path]) -> None:
    """Make ``run_dir`` a symbolic link to a finished run of exactly ``cfg`` (seed included) found
    in a run directory directly under one of ``roots`` or one level deeper (``--reuse-from``), so
    that the grid scores it instead of training it again. Nothing happens when there is none or
    ``run_dir`` exists."""
    if run_dir.exists() or run_dir.is_symlink():
        return
    for root in roots:
        if not root.is_dir():
            raise UserError(f"--reuse-from {root} is not a directory")
        for config in sorted([*root.glob("*/" + RunDir(".").config.name), *root.glob("*/*/" + RunDir(".").config.name)]):
            candidate = config.parent
            if candidate.resolve() != run_dir.resolve() and _finished(cfg, candidate):
                run_dir.parent.mkdir(parents=True, exist_ok=True)
                run_dir.symlink_to(candidate.resolve(), target_is_directory=True)
                print(f"note: {run_dir} is {candidate} (a finished run of this config, --reuse-from)", file=sys.stderr)
                return


@register_command("compare")
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
    budget.add_argument(
        "--device-hours", type=float, metavar="H", help="devices x training time per run, in hours (rows record each run's device_hours)"
    )
    p.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    p.add_argument("--output", metavar="DIR", help="comparison directory (default runs/compare-<data>-<backbone>-<time>)")
    p.add_argument("--batch-size", type=int, help="global batch size (default 256)")
    p.add_argument("--image-size", type=int, help="resolution in pixels (default: the data's own; digits 16, cifar 32, stl10 96, else 32)")
    p.add_argument("--precision", help="auto | no | bf16 | fp16")
    p.add_argument("--config", metavar="FILE.yaml", help="YAML file of config values for every run")
    p.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key for every run (must be valid for every method)",
    )
    p.add_argument(
        "--vary",
        action="append",
        default=[],
        metavar="KEY=V1,V2,...",
        help="an ablation axis: train every method with each value of KEY (any --set key, e.g. "
        "method_cfg.temperature=0.1,0.5 or aug.jitter_p=0,0.8; a tuple value in brackets: "
        "aug.crop_scale=[0.08,1],[0.5,1]); repeat for a grid (the product of the axes)",
    )
    p.add_argument("--results", metavar="FILE.jsonl", help="results store to append to (default DIR/results.jsonl)")
    p.add_argument("--plot", metavar="FILE.png", help="also draw each metric against the varied setting (or per method), with error bars")
    p.add_argument(
        "--reuse-from",
        action="append",
        default=[],
        metavar="DIR",
        help="before training a run, look for a finished run of exactly its config (seed included) in the run "
        "directories under DIR (or one level deeper) and score that one instead (linked in)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_eval_flags(p)
    p.set_defaults(func=cmd_compare)
