"""``sslbench doctor``: check an install, one line per finding.

It prints the versions of Python, torch, torchvision, timm, accelerate and datasets; whether torch
and torchvision are a matching pair (a CPU torch with a CUDA torchvision, or versions of different
releases, makes every command die at import with ``operator torchvision::nms does not exist``);
the devices, threads and CPU instruction set; the free disk of the runs and cache folders; and
whether the Hugging Face hub answers. Each problem is one line on stderr with its fix, and the exit
code is 2; a healthy install exits 0. An unreachable hub is a note, not a problem: local data and
the cache work without it.

Nothing here imports torchvision (or the sslbench modules that do) before it has checked the
pair: the command runs on the broken install it is meant to diagnose (see :func:`sslbench.commands.cli.main`).
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import re
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from sslbench.core.registry import register_command

PACKAGES = ("torch", "torchvision", "timm", "accelerate", "datasets")  # what sslbench cannot run without
TORCHVISION_MINOR_OFFSET = 15  # torchvision 0.(N+15) is built for torch 2.N (0.15 <-> 2.0, 0.29 <-> 2.14)
LOW_DISK_BYTES = 2 * 2**30  # less free space than this in the runs or cache folder is a problem
TORCH_INDEX = "https://download.pytorch.org/whl"


@dataclass
class Report:
    """What the doctor found: lines to print and problems (each with its fix)."""

    lines: list[str] = field(default_factory=list)  # the findings, in order (stdout)
    problems: list[str] = field(default_factory=list)  # one line each, problem and fix (stderr; exit 2)


def installed_version(package: str) -> str | None:
    """The installed version of ``package`` (its metadata; nothing is imported), or None."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _import(name: str) -> Any:
    return importlib.import_module(name)


def _release(version: str) -> tuple[int, int] | None:
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match.group(1)), int(match.group(2))) if match else None


def _build(version: str) -> str:
    """The build tag of a version: ``cpu`` for ``2.14.1+cpu``, ``cu128``; ``""`` for the PyPI default."""
    return version.partition("+")[2]


def expected_torchvision(torch_version: str) -> str | None:
    """The torchvision release (``0.29``) built for ``torch_version`` (``2.14.1``), or None if unknown."""
    release = _release(torch_version)
    if release is None or release[0] != 2:
        return None
    return f"0.{release[1] + TORCHVISION_MINOR_OFFSET}"


def pair_problem(torch_version: str, torchvision_version: str) -> str | None:
    """Why ``torchvision_version`` does not go with ``torch_version`` (another release, or another
    build: CPU vs CUDA), with the one-line fix; None for a matching pair."""
    want = expected_torchvision(torch_version)
    have = _release(torchvision_version)
    other_release = want is not None and have is not None and f"{have[0]}.{have[1]}" != want
    other_build = _build(torch_version) != _build(torchvision_version)
    if not other_release and not other_build:
        return None
    tag = _build(torch_version)
    index = f" --index-url {TORCH_INDEX}/{tag}" if tag else ""
    pin = f"torchvision=={want}.*" if want else "torchvision"
    torch_base = torch_version.partition("+")[0]
    why = "another release" if other_release else f"another build ({_build(torchvision_version) or 'PyPI default'} vs {tag or 'PyPI default'})"
    return (
        f"torchvision {torchvision_version} does not match torch {torch_version} ({why}): every command would fail at import "
        f"(operator torchvision::nms does not exist); install the pair from one build: pip install --force-reinstall torch=={torch_base} {pin}{index}"
    )


def _versions(report: Report) -> dict[str, str]:
    report.lines.append(f"python       {platform.python_version()} ({sys.executable})")
    found = {}
    for package in PACKAGES:
        version = installed_version(package)
        report.lines.append(f"{package:<12} {version or 'not installed'}")
        if version is None:
            report.problems.append(f"{package} is not installed; reinstall sslbench: pip install -e . (see the README's install section)")
        else:
            found[package] = version
    return found


def _torch_pair(report: Report, found: dict[str, str]) -> bool:
    """Check the pair by version, then by importing torchvision; True when torchvision loads."""
    if "torch" not in found or "torchvision" not in found:
        return False
    problem = pair_problem(found["torch"], found["torchvision"])
    if problem is not None:
        report.problems.append(problem)
        return False
    try:
        _import("torchvision")
    except Exception as exc:  # the mismatch this check exists for raises RuntimeError at import
        cause = " ".join(str(exc).split())[:160]
        report.problems.append(
            f"torchvision {found['torchvision']} does not load with torch {found['torch']} ({type(exc).__name__}: {cause}); "
            f"reinstall both from one build: pip install --force-reinstall torch=={found['torch'].partition('+')[0]} torchvision=={found['torchvision'].partition('+')[0]}"
        )
        return False
    report.lines.append(f"{'pair':<12} torch and torchvision match ({_build(found['torch']) or 'PyPI default'} build)")
    return True


def _devices(report: Report) -> None:
    try:
        torch = _import("torch")
    except Exception as exc:
        report.problems.append(f"torch does not import ({type(exc).__name__}: {' '.join(str(exc).split())[:160]}); reinstall it")
        return
    devices = []
    if torch.cuda.is_available():
        devices += [f"cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        devices.append("mps")
    devices.append("cpu")
    report.lines.append(f"devices      {', '.join(devices)}")
    capability = getattr(getattr(torch.backends, "cpu", None), "get_cpu_capability", lambda: "unknown")()
    report.lines.append(f"cpu          {os.cpu_count()} cores, torch uses {torch.get_num_threads()} threads, instruction set {capability}")


def _disk(report: Report, what: str, folder: Path) -> None:
    existing = next((p for p in (folder, *folder.absolute().parents) if p.exists()), Path("/"))
    try:
        free = shutil.disk_usage(existing).free
    except OSError as exc:
        report.problems.append(f"cannot read the free space of the {what} folder {folder} ({exc.strerror or exc}); check the path")
        return
    report.lines.append(f"{what + ' folder':<12} {folder} ({free / 2**30:,.1f} GiB free)")
    if free < LOW_DISK_BYTES:
        report.problems.append(
            f"only {free / 2**20:,.0f} MB free for the {what} folder {folder}: runs write checkpoints and the cache decoded data; "
            "free some space or point it elsewhere (--output, $SSLBENCH_CACHE)"
        )


def _hub(report: Report) -> None:
    from sslbench.core.hub import _env_offline, hub_reachable

    if _env_offline():
        report.lines.append("hub          offline by HF_HUB_OFFLINE/HF_DATASETS_OFFLINE (local data and the cache work)")
    elif hub_reachable():
        report.lines.append("hub          reachable")
    else:  # a note: an offline machine trains on local data and what the cache holds
        report.lines.append("hub          not reachable (no network?): hub data sets and pretrained weights need the cache; local data works")


def diagnose() -> Report:
    """Every check, in order."""
    from sslbench.core.rundir import RUNS, default_cache_dir

    report = Report()
    found = _versions(report)
    _torch_pair(report, found)
    _devices(report)
    _disk(report, "runs", RUNS)
    _disk(report, "cache", default_cache_dir())
    _hub(report)
    return report


def cmd_doctor(args: argparse.Namespace, out: Callable[[str], None] = print) -> int:
    """``sslbench doctor``: the findings on stdout, one ``sslbench: error:`` line per problem; exit 2 if any."""
    from sslbench.core.errors import error_line

    report = diagnose()
    for line in report.lines:
        out(line)
    for problem in report.problems:
        error_line(f"sslbench: error: {problem}")
    if not report.problems:
        out("sslbench doctor: no problems found")
    return 2 if report.problems else 0


@register_command("doctor")
def register_doctor(sub: Any) -> None:
    """Add ``sslbench doctor`` to the CLI's sub-commands (the CLI builds a parser of train, list and
    doctor alone for ``sslbench doctor``: the other commands' modules import torchvision)."""
    p = sub.add_parser("doctor", help="check the install: versions, the torch/torchvision pair, devices, disk, hub")
    p.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_doctor)
