"""The ``sslbench`` command line: train, eval, compare, leaderboard, list, export, plot, picture, doctor.

Every mistake a user can make ends as one line on stderr and exit code 2; ``--debug`` shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import warnings
from collections.abc import Sequence
from typing import Any

from sslbench.core.errors import UserError, error_line
from sslbench.core.registry import COMMANDS, register_command


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit code 2) instead of a usage dump."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"{message} (see `{self.prog} --help`)")


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", help="method name (sslbench list methods); default simclr")
    p.add_argument("--backbone", help="timm model name (sslbench list backbones); default resnet18")
    p.add_argument("--data", help="digits (default) | cifar10 | cifar100 | stl10 | imagefolder:PATH | hf:NAME|FILE|DIR | shards:DIR")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--epochs", type=int, help="passes over the training data (default 10)")
    budget.add_argument("--steps", type=int, help="optimizer steps (instead of --epochs)")
    p.add_argument("--batch-size", type=int, help="global batch size over all processes (default 256)")
    p.add_argument("--lr", type=float, help="base learning rate before batch scaling (default: the method's recipe)")
    p.add_argument("--optimizer", help="sgd | lars | adamw (default: the method's recipe)")
    p.add_argument("--precision", help="auto | no | bf16 | fp16 (default auto: bf16 on CUDA, no on CPU)")
    p.add_argument("--image-size", type=int, help="training resolution in pixels (default: the data's own; digits 16, cifar 32, stl10 96, else 32)")
    p.add_argument("--seed", type=int, help="random seed (default 0)")
    p.add_argument("--grad-cache-chunk", type=int, help="gradient-cache chunk size: exact large batches in less memory")
    p.add_argument("--train-subset", type=int, help="train on a class-balanced subset of this many images")
    p.add_argument(
        "--log-with",
        metavar="TRACKERS",
        help="experiment trackers: tensorboard, wandb, mlflow, comet_ml, aim or all "
        "(comma-separated; written to RUN_DIR/trackers; each needs its extra, e.g. sslbench[tensorboard])",
    )
    p.add_argument("--config", metavar="FILE.yaml", help="YAML file of config values")
    p.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config key, e.g. temperature=0.2, aug.jitter_strength=1.0, backbone_kwargs.channels=16,32,64,128 (repeatable)",
    )


_TRAIN_FLAG_KEYS = (
    "method",
    "backbone",
    "data",
    "epochs",
    "steps",
    "batch_size",
    "lr",
    "optimizer",
    "precision",
    "image_size",
    "seed",
    "grad_cache_chunk",
    "train_subset",
    "log_with",
)


def build_parser(extras: bool = True) -> argparse.ArgumentParser:
    """The parser of every registered sub-command (:data:`sslbench.core.registry.COMMANDS`: the built-ins,
    then third-party entry points); ``extras=False`` keeps to train, list and doctor, which import
    no torchvision: ``sslbench doctor`` runs on an install whose torchvision does not load."""
    parser = _Parser(prog="sslbench", description="Self-supervised learning benchmark suite.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    if extras:
        commands = COMMANDS.in_order()
    else:
        from sslbench.commands.doctor import register_doctor

        commands = [register_train, register_list, register_doctor]
    for register in commands:
        register(sub)
    return parser


@register_command("train")
def register_train(sub: Any) -> None:
    t = sub.add_parser("train", help="train a method on a backbone")
    _add_train_flags(t)
    t.add_argument("--output", help="run directory (default runs/<method>-<backbone>-<data>-<time>)")
    t.add_argument("--resume", action="store_true", help="continue the run in --output from its latest checkpoint")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    t.set_defaults(func=cmd_train)


#: What ``sslbench list`` lists: the registries, then timm's backbones and the named data sets.
LIST_KINDS = ("methods", "protocols", "data-sources", "commands", "callbacks", "backbones", "datasets")


@register_command("list")
def register_list(sub: Any) -> None:
    ls = sub.add_parser("list", help="list methods, protocols, data sources, commands, callbacks, backbones or datasets")
    ls.add_argument("what", choices=LIST_KINDS)
    ls.add_argument("pattern", nargs="?", help="filter backbones by a wildcard, e.g. 'resnet*'")
    ls.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    ls.set_defaults(func=cmd_list)


def cmd_train(args: argparse.Namespace) -> int:
    from sslbench.commands.pipeline import train_and_score
    from sslbench.config import build_config, check_config_file, load_yaml, run_config
    from sslbench.core.rundir import RunDir
    from sslbench.train.report import end_summary

    saved: dict[str, Any] = {}
    if args.resume:
        if not args.output:
            raise UserError("--resume needs --output RUN_DIR (the run to continue)")
        path = RunDir(args.output).config
        if not os.path.isfile(path):
            raise UserError(f"--resume: {args.output} has no config.yaml; is it an sslbench run directory?")
        saved = load_yaml(path)
        run_config(path)  # a mistake in the saved config names its file
    given = load_yaml(args.config) if args.config else {}
    flags = {k: getattr(args, k) for k in _TRAIN_FLAG_KEYS}
    flags["output"] = args.output
    if args.resume:
        _check_same_method(args, saved, given)
    if args.config:
        check_config_file(args.config, given, method=_asked_method(args, saved, given))
    file_values = merge_config_values(without_budget(saved, given), given)
    file_values = without_budget(file_values, {**flags, **dict(_set_keys(args.sets))})
    cfg = build_config(file_values=file_values, flags=flags, sets=args.sets)
    if args.resume:
        _check_resume_unchanged(args, saved, cfg)
    result = train_and_score(cfg, resume=args.resume, quiet=args.quiet)
    if result.stopped_early and result.stop_signal:
        return 128 + result.stop_signal  # stopped by SIGTERM/SIGINT after a checkpoint: 143/130, as the shell reports a signal
    if result.main and not args.quiet:
        print("\n".join(end_summary(result.run_dir)), file=sys.stderr)
    return 0


BUDGET_KEYS = ("epochs", "steps")  # one budget: a source that names one of them replaces both of a lower source


def without_budget(lower: dict[str, Any], higher: dict[str, Any]) -> dict[str, Any]:
    """``lower`` without its ``epochs`` and ``steps`` when ``higher`` gives either (not None): a
    budget given on the command line replaces the config file's, which replaces a resumed run's."""
    if any(higher.get(k) is not None for k in BUDGET_KEYS):
        return {k: v for k, v in lower.items() if k not in BUDGET_KEYS}
    return lower


def _set_keys(sets: list[str]) -> list[tuple[str, str]]:
    from sslbench.config import split_set_args

    return split_set_args(sets)


def _asked_method(args: argparse.Namespace, saved: dict[str, Any], given: dict[str, Any]) -> str:
    set_methods = [v.strip() for k, v in _set_keys(args.sets) if k == "method"]
    return str(set_methods[-1] if set_methods else (args.method or given.get("method") or saved.get("method") or "simclr"))


def merge_config_values(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``override``'s values on top; the sections (``aug``, ``method_cfg``,
    ``backbone_kwargs``) merge key by key, so a file naming one key of a section changes that key only."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


def _check_same_method(args: argparse.Namespace, saved: dict[str, Any], given: dict[str, Any]) -> None:
    """A resumed run keeps its method: another one is a one-line error, not an unknown-key error
    about the saved method's settings."""
    set_methods = [v.strip() for k, v in _set_keys(args.sets) if k == "method"]
    asked = set_methods[-1] if set_methods else (args.method or given.get("method"))
    was = saved.get("method")
    if asked is not None and was is not None and str(asked) != str(was):
        raise UserError(
            f"--resume: {args.output} was trained with {was}; a run cannot change method (got {asked}); start a new --output for the other method"
        )


# What a resumed run cannot change: its checkpoints' data order, batches and records depend on them.
RESUME_FIXED = {"batch_size": "--batch-size", "data": "--data", "image_size": "--image-size", "seed": "--seed"}


def _check_resume_unchanged(args: argparse.Namespace, saved: dict[str, Any], cfg: Any) -> None:
    from sslbench.config import build_config

    was = build_config(file_values=saved)  # the saved run, its defaults resolved as they were when it started
    for key, flag in RESUME_FIXED.items():
        old, new = getattr(was, key), getattr(cfg, key)
        if old != new:
            raise UserError(
                f"--resume: {args.output} was trained with {key} {old}; a resumed run keeps it (got {new} from {flag}, "
                f"--set or --config); start a new --output to train with {key} {new}"
            )


def cmd_list(args: argparse.Namespace) -> int:
    if args.what == "backbones":
        import timm

        names = timm.list_models(args.pattern or "")
        print("\n".join(names))
        print(f"# {len(names)} timm models; any of them works with --backbone", file=sys.stderr)
        return 0
    if args.what == "methods":
        from rich.console import Console
        from rich.table import Table

        from sslbench.core.registry import METHODS

        table = Table("method", "description", "paper")
        for name, cls in METHODS.items():
            table.add_row(name, getattr(cls, "description", ""), getattr(cls, "paper", ""))
        Console(width=200).print(table)
        return 0
    rows = _listing(args.what)
    for name, text in rows:
        print(f"{name:<20} {text}".rstrip())
    if not rows:
        print(f"# none registered; a package adds one under the entry-point group {_LIST_GROUPS[args.what]}", file=sys.stderr)
    return 0


_LIST_GROUPS = {
    "protocols": "sslbench.protocols",
    "data-sources": "sslbench.data_sources",
    "datasets": "sslbench.data_sources",
    "commands": "sslbench.commands",
    "callbacks": "sslbench.callbacks",
}


def _listing(what: str) -> list[tuple[str, str]]:
    """``(name, one line)`` of each entry of a registry, for ``sslbench list``."""
    if what == "protocols":
        from sslbench.evaluation.protocols import PROTOCOLS

        return [(p.name, p.description) for p in PROTOCOLS.in_order()]
    if what in ("data-sources", "datasets"):
        from sslbench.data import data_sources

        return list(data_sources().items())
    if what == "commands":
        parser = build_parser()
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        helps = {c.dest: c.help or "" for c in sub._choices_actions}
        return [(name, helps.get(name, "")) for name in sub.choices]
    from sslbench.train.callbacks import CALLBACKS

    return [(name, _first_line(cls.__doc__)) for name, cls in CALLBACKS.items()]


def _first_line(doc: str | None) -> str:
    return (doc or "").strip().split("\n")[0]


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    formatwarning = warnings.formatwarning
    if not debug:  # a warning is one line on stderr, as errors are (--debug: Python's own format)
        warnings.formatwarning = lambda message, category, *args, **kwargs: f"warning: {_one_line(message)}\n"
    try:
        command = next((a for a in argv if not a.startswith("-")), None)
        parser = build_parser(extras=command != "doctor")
        args = parser.parse_args(argv)
        args.argv = argv  # the exact command line, recorded in result rows
        from sslbench.core.runlock import set_command

        set_command(argv)  # and in the lock file of a run directory this command trains
        if args.command is None:
            parser.print_help()
            return 2
        return int(args.func(args) or 0)
    except UserError as exc:
        if debug:
            raise
        error_line(f"sslbench: error: {_one_line(exc)}")
        return 2
    except (OSError, MemoryError, RuntimeError) as exc:
        message = None if debug else _environment_error(exc)
        if message is None:
            raise
        error_line(f"sslbench: error: {message}")
        return 2
    except KeyboardInterrupt:
        print("sslbench: interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.formatwarning = formatwarning


def _one_line(exc: BaseException | str) -> str:
    """The message on one line (a library's multi-line text, a path with a newline)."""
    return " ".join(str(exc).split())


# OSErrors about the user's environment, whatever the path: a full or read-only disk.
_ENV_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}
# OSErrors that are the user's when they name a path (a path given on the command line or below it).
_PATH_ERRNOS = {errno.ENOENT, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG, errno.ELOOP, errno.EEXIST, errno.ENOTEMPTY}


def _environment_error(exc: BaseException) -> str | None:
    """A one-line message for an exception the user's environment caused (disk full, a path that is
    not writable, out of memory), or None for one that is a bug and keeps its traceback."""
    if isinstance(exc, OSError):
        if exc.errno in _ENV_ERRNOS or (exc.errno in _PATH_ERRNOS and exc.filename is not None):
            where = f": {exc.filename}" if exc.filename is not None else ""
            return _one_line(f"{exc.strerror or exc}{where}; check the paths you passed, free space or permissions (--debug shows the traceback)")
        return None
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return "out of memory; lower --batch-size or --image-size, or use --grad-cache-chunk (--debug shows the traceback)"
    return None


def run() -> None:
    sys.exit(main())
