"""Append-only results store: one JSON object per line (JSON Lines).

Safety rules:

- **Concurrency.** Writers serialise on an exclusive lock file next to the store
  (``<path>.lock``, :class:`filelock.FileLock`, released by the OS if the holder dies), and each
  row goes out in one ``os.write`` on an ``O_APPEND`` descriptor followed by ``fsync``. Rows of
  concurrent writers therefore never interleave.
- **Crashes.** A writer killed in the middle of a write can leave a partial last line without a
  newline. The next writer notices the missing newline and starts on a fresh line, so the torn
  fragment stays on a line of its own; :func:`read_rows` skips it (with a warning). Only the row
  being written is lost.
- **Disk full / I/O errors.** An ``OSError`` becomes a :class:`~sslbench.core.errors.UserError` naming
  the file and the cause. Nothing already in the file is modified: a partial row is cut off
  again (if even that fails, the partial line is handled as above). A store that cannot be
  written at all (a folder on the way is a file, permissions, a read-only disk) is reported as
  such before the lock is taken.
- Non-finite floats (NaN, inf) are stored as ``null``: strict JSON has no spelling for them.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import subprocess
import warnings
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import filelock

from sslbench.core.errors import UserError

LOCK_TIMEOUT_S = 60.0

#: The run fields of a result row, in the order they are written (see :func:`make_row`).
RUN_FIELDS = (
    "method",
    "backbone",
    "data",
    "image_size",
    "epochs",
    "steps",
    "images_seen",
    "batch_size",
    "budget_kind",
    "budget",
    "wall_time_s",
    "device_hours",
    "images_per_s",
    "precision",
    "seed",
    "run_dir",
    "command",
)
REQUIRED_RUN_FIELDS = ("method", "backbone", "data")


def _jsonable(value: Any) -> Any:
    """``value`` with non-finite floats replaced by ``None`` and tensors/NumPy scalars, tuples
    and paths turned into plain JSON types."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "tolist"):  # torch tensors, NumPy arrays and scalars
        return _jsonable(value.tolist())
    raise UserError(f"cannot store a {type(value).__name__} in a result row: {value!r}")


def _encode(row: Mapping[str, Any]) -> bytes:
    return (json.dumps(_jsonable(row), allow_nan=False, ensure_ascii=False) + "\n").encode("utf-8")


def _write_all(fd: int, data: bytes) -> None:
    """One ``os.write`` normally; a short write (possible on some file systems) is continued."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def append_row(path: str | os.PathLike[str], row: Mapping[str, Any]) -> None:
    """Append ``row`` as one line to the JSON Lines file ``path`` (created with its parent
    directories if missing), safely against concurrent writers and crashes (see module doc).

    Raises:
        UserError: the row is not JSON-serialisable, the lock could not be taken within
            :data:`LOCK_TIMEOUT_S`, or the file system failed (e.g. disk full).
    """
    path = Path(path)
    if path.suffix != ".jsonl":
        # a results store is always *.jsonl: never append rows to a run's config.yaml, results.json,
        # encoder or any other file given by mistake
        raise UserError(f"results file {path} must be a .jsonl file (JSON Lines), e.g. results.jsonl; refusing to append to it")
    line = _encode(row)  # serialise first: a bad row never touches the file
    try:
        _prepare(path)
        with filelock.FileLock(f"{path}.lock", timeout=LOCK_TIMEOUT_S):
            fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                size = os.fstat(fd).st_size
                if size > 0 and os.pread(fd, 1, size - 1) != b"\n":
                    line = b"\n" + line  # a torn previous write: keep its fragment on its own line
                try:
                    _write_all(fd, line)
                    os.fsync(fd)
                except OSError:
                    try:
                        os.ftruncate(fd, size)  # a failed write (disk full) leaves the store as it was
                    except OSError:
                        pass
                    raise
            finally:
                os.close(fd)
    except filelock.Timeout as e:
        raise UserError(f"could not lock {path} within {LOCK_TIMEOUT_S:.0f} s: another process is writing to it") from e
    except OSError as e:
        where = f" ({e.filename})" if e.filename is not None and str(e.filename) != str(path) else ""
        raise UserError(f"could not append a result row to {path}: {e.strerror or e}{where}") from e


def _prepare(path: Path) -> None:
    """Create the store's folders and check that its lock file can be opened, so that a store that
    cannot be written is reported as such: a folder on the way that is a file, permissions, a
    read-only disk (not as lock contention after a wait, nor as "File exists")."""
    existing = next(p for p in path.absolute().parents if p.exists())
    if not existing.is_dir():
        raise UserError(f"could not append a result row to {path}: {existing} is a file, not a directory")
    if path.is_dir():
        raise UserError(f"could not append a result row to {path}: it is a directory, not a file")
    path.parent.mkdir(parents=True, exist_ok=True)
    os.close(os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o644))


def read_rows(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """All rows of the JSON Lines file ``path``, in file order; ``[]`` if it does not exist.

    Blank lines are ignored. Lines that are not a JSON object (a torn write from an interrupted
    process) are skipped with one warning giving their count. Reading takes no lock, so a row
    being appended at that very moment may be missed (it is never half-read as a row).
    """
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return []
    except OSError as e:
        raise UserError(f"could not read results file {path}: {e.strerror or e}") from e
    rows: list[dict[str, Any]] = []
    bad = 0
    for raw in data.split(b"\n"):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            row = None
        if isinstance(row, dict):
            rows.append(row)
        else:
            bad += 1
    if bad:
        warnings.warn(
            f"{path}: skipped {bad} unreadable line(s) (torn writes from an interrupted process)",
            stacklevel=2,
        )
    return rows


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip() or None
    except OSError:
        pass
    return platform.processor() or None


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        done = subprocess.run(
            ["git", "--no-optional-locks", *args],  # read-only: never refreshes the index
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def source_commit() -> str | None:
    """``git rev-parse HEAD`` of the sslbench source tree, with ``-dirty`` when tracked files
    have uncommitted changes; ``None`` when sslbench is not run from a git checkout (e.g. an
    installed wheel) or git is unavailable."""
    root = Path(__file__).resolve().parents[2]  # sslbench/results/__init__.py -> the checkout
    top = _git(["rev-parse", "--show-toplevel"], root)
    if top is None or Path(top).resolve() != root:
        return None  # not a checkout, or sslbench merely lies inside some other repository
    commit = _git(["rev-parse", "HEAD"], root)
    if commit is None:
        return None  # a repository without commits
    status = _git(["status", "--porcelain", "--untracked-files=no"], root)
    return f"{commit}-dirty" if status else commit


def environment_info() -> dict[str, Any]:
    """Where a result was produced: hardware (no hostname), software versions and the source
    commit."""
    import torch  # imported here: reading and writing rows does not need torch

    from sslbench import __version__

    gpus: list[str] = []
    if torch.cuda.is_available():
        gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "gpus": gpus,
        "cuda": torch.version.cuda,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": _version("torchvision"),
        "timm": _version("timm"),
        "accelerate": _version("accelerate"),
        "sslbench": __version__,
        "git_commit": source_commit(),
    }


def device_hours(processes: int, train_time_s: float) -> float:
    """The cost of a run: devices (one per process) x training wall time, in hours. Rows record it
    so tables can compare methods by cost and ``compare --device-hours`` can give each the same."""
    return round(processes * train_time_s / 3600, 6)


def hardware_summary(device: Any) -> str:
    """One line naming the hardware a computation ran on: the GPUs for a CUDA ``device`` (e.g.
    ``1x NVIDIA H100 80GB HBM3``), else the CPU (``cpu: AMD EPYC ... (2 cores)``)."""
    import torch

    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        return f"{len(names)}x {names[0]}" if len(set(names)) == 1 else ", ".join(names)
    return f"cpu: {_cpu_model() or 'unknown'} ({os.cpu_count()} cores)"


def _heldout(spec: str) -> dict[str, Any] | None:
    """The held-out split record of ``spec`` (None when none was made; :mod:`sslbench.data.hf` is
    only consulted when already imported, i.e. when some data was loaded through it)."""
    import sys

    hfdata = sys.modules.get("sslbench.data.hf")
    record: dict[str, Any] | None = hfdata.heldout_record(spec) if hfdata is not None else None
    return record


def protocol_depth(protocol: Any) -> str | None:
    """The feature depth a row's ``protocol`` record names (``h``, ``projK``, ``z``, ...), or
    ``None`` when it names none. Rows written before depths existed (sslbench before 2026-11-30)
    used the k-NN record's ``features`` key for a description of the features
    (``"l2-normalised, frozen, no augmentation"``); such prose, unlike a depth, contains a space and
    is read as naming no depth (the encoder output ``h``, which those rows were scored on). The k-NN
    record now keeps that description under ``feature_processing``."""
    depth = protocol.get("features") if isinstance(protocol, Mapping) else None
    return depth if isinstance(depth, str) and depth and " " not in depth else None


def make_row(*, metrics: Mapping[str, float], protocol: Mapping[str, Any], run: Mapping[str, Any]) -> dict[str, Any]:
    """A self-describing result row.

    Keys, in order: ``time`` (UTC, ISO 8601), the run fields of :data:`RUN_FIELDS` (``None``
    when ``run`` lacks them; ``method``, ``backbone`` and ``data`` are required), any further
    keys of ``run``, then ``metrics`` (floats), ``protocol`` (how they were measured, e.g.
    :func:`sslbench.evals.knn.knn_protocol`) and ``env`` (:func:`environment_info`).

    When the evaluation data (``run['eval_data']``, else ``run['data']``) is a data set with one
    split that this process divided into train and held-out test parts, ``heldout`` (before
    ``metrics``) records how: :func:`sslbench.data.hf.heldout_record`.
    """
    missing = [k for k in REQUIRED_RUN_FIELDS if run.get(k) is None]
    if missing:
        raise UserError(f"a result row needs the run fields {', '.join(missing)}")
    reserved = {"time", "metrics", "protocol", "env"} & run.keys()
    if reserved:
        raise UserError(f"run fields may not be named {', '.join(sorted(reserved))}")
    row: dict[str, Any] = {"time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")}
    row.update({k: run.get(k) for k in RUN_FIELDS})
    row.update({k: v for k, v in run.items() if k not in row})
    heldout = _heldout(str(run.get("eval_data") or run["data"]))
    if heldout is not None and "heldout" not in row:
        row["heldout"] = heldout
    row["metrics"] = {str(k): float(v) for k, v in metrics.items()}
    row["protocol"] = dict(protocol)
    row["env"] = environment_info()
    return row
