"""A run directory's files, and the one atomic writer of sslbench.

:class:`RunDir` owns every file name of a run directory; nothing else spells them::

    RUN_DIR/
      config.yaml           the full resolved config (written when training starts)
      metrics.jsonl         per-step loss, lr, images/s (and the online probe's records)
      checkpoints/          step-NNNNNNNN/ directories (sslbench.train.checkpoint)
      encoder.safetensors   the backbone's weights under timm's own key names
      method.safetensors    the whole method, heads included
      results.json          the training summary (wall time, speed, quick k-NN)
      reconstructions.png   test images and their reconstructions (methods that reconstruct, e.g. MAE)
      budget.json           the budget as `compare` was given it ({"kind": ..., "value": ...})
      run.lock              while a process trains the run: who (sslbench.core.runlock); removed when it ends

Results stores (``results.jsonl``) live next to run directories, not in them:
:attr:`RunDir.results_store` is where ``sslbench eval RUN_DIR`` appends by default.

:func:`write_atomic` is how every file that is replaced as a whole is written (run files, the
decoded-data cache, leaderboard tables): a reader never sees half a file, and a failure (disk full)
removes the temporary file, keeps the previous file and raises a one-line :class:`UserError`;
every file it writes has the umask's mode (:func:`file_mode`).
:func:`write_failure` tells a failed write (``OSError``, safetensors' and ``torch.save``'s own
errors) from a bug; :func:`check_writable` checks an output path before any work starts.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sslbench.core.errors import UserError

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
ENCODER = "encoder.safetensors"
METHOD = "method.safetensors"
RESULTS = "results.json"
CURVES = "curves.png"
TRACKERS = "trackers"
BUDGET = "budget.json"
LOCK = "run.lock"
PICTURE = "reconstructions.png"
RESULTS_STORE = "results.jsonl"  # a results store (next to run directories, or in a comparison's directory)
RUNS = Path("runs")  # where run directories go when no --output is given (relative to the current directory)


def default_cache_dir() -> Path:
    """Download and decode cache: ``$SSLBENCH_CACHE`` when set, else ``~/.cache/sslbench``."""
    env = os.environ.get("SSLBENCH_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sslbench"


@dataclass(frozen=True)
class RunDir:
    """The files of one run directory: ``RunDir("runs/x").encoder == Path("runs/x/encoder.safetensors")``."""

    path: Path

    def __init__(self, path: str | os.PathLike[str]) -> None:
        object.__setattr__(self, "path", Path(path))

    def __fspath__(self) -> str:
        return os.fspath(self.path)

    def __str__(self) -> str:
        return str(self.path)

    @property
    def config(self) -> Path:
        return self.path / CONFIG

    @property
    def trackers(self) -> Path:
        """Where the experiment trackers (TensorBoard, W&B offline, ...) write (:mod:`sslbench.train.tracking`)."""
        return self.path / TRACKERS

    @property
    def curves(self) -> Path:
        """The picture of the run's curves (:mod:`sslbench.commands.curves`)."""
        return self.path / CURVES

    @property
    def metrics(self) -> Path:
        return self.path / METRICS

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def encoder(self) -> Path:
        return self.path / ENCODER

    @property
    def method(self) -> Path:
        return self.path / METHOD

    @property
    def results(self) -> Path:
        """``results.json``: what training wrote when it finished."""
        return self.path / RESULTS

    @property
    def budget(self) -> Path:
        return self.path / BUDGET

    @property
    def lock(self) -> Path:
        """``run.lock``: present while a process trains the run (:mod:`sslbench.core.runlock`)."""
        return self.path / LOCK

    @property
    def picture(self) -> Path:
        """``reconstructions.png``: written by :mod:`sslbench.commands.picture` for methods that reconstruct images."""
        return self.path / PICTURE

    @property
    def results_store(self) -> Path:
        """The default results store of ``sslbench eval``: ``results.jsonl`` next to the run directory."""
        return self.path.resolve().parent / RESULTS_STORE

    def is_finished(self) -> bool:
        """Whether training wrote its final files (``results.json`` and the encoder)."""
        return self.results.is_file() and self.encoder.is_file()


def write_failure(exc: BaseException, path: str | os.PathLike[str] | None = None) -> str | None:
    """The cause of a failed write, on one line, or None when ``exc`` is not a write failure (a bug).

    Write failures: an ``OSError`` (its ``strerror``: "No space left on device"), a safetensors
    ``SafetensorError`` about I/O (the OS error it carries) and ``torch.save``'s ``RuntimeError``
    from its file writer, which names no cause: then the free space next to ``path`` is given."""
    if isinstance(exc, OSError):
        return str(exc.strerror or " ".join(str(exc).split())[:160])
    text = " ".join(str(exc).split())
    if type(exc).__name__ == "SafetensorError":
        code = re.search(r"os error (\d+)", text)
        return os.strerror(int(code.group(1))) if code else text[:160]
    if isinstance(exc, RuntimeError) and ("PytorchStreamWriter" in text or "inline_container" in text or "file write failed" in text):
        return f"torch.save failed: {text[:120]}{_free_space(path)}"
    return None


def _free_space(path: str | os.PathLike[str] | None) -> str:
    """``; N MB free on its disk`` for the nearest existing folder of ``path`` (a full disk is the usual cause)."""
    if path is None:
        return ""
    folder = next((p for p in Path(path).absolute().parents if p.is_dir()), None)
    try:
        free = shutil.disk_usage(folder).free if folder is not None else None
    except OSError:
        free = None
    return "" if free is None else f"; {free / 2**20:,.0f} MB free on its disk"


def file_mode() -> int:
    """The permission bits of a new file under this process's umask (``0o644`` under umask 022): every
    file sslbench writes gets them, whatever the library that wrote it (safetensors creates 0600 files)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def share_mode(path: str | os.PathLike[str]) -> None:
    """Give ``path`` (a file, or every file under a folder) the mode of :func:`file_mode`."""
    mode = file_mode()
    path = Path(path)
    for f in [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]:
        os.chmod(f, mode)


def write_atomic(
    path: str | os.PathLike[str],
    write: Callable[[Path], object],
    what: str,
    *,
    errors: tuple[type[BaseException], ...] = (),
) -> None:
    """``write(tmp)`` to a temporary file next to ``path``, fsync it, then rename it over ``path``:
    a reader never sees a half-written file. A failure removes the temporary file and keeps the
    previous ``path``; a write failure (:func:`write_failure`, or one of ``errors``) becomes a
    one-line :class:`UserError` naming ``path``, the cause and ``what`` (how to recover); anything
    else (a bug, Ctrl-C) is raised as it is."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        share_mode(tmp)  # one mode for every run file (the umask's), whoever created the temporary file
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            tmp.unlink()
        except OSError:
            pass
        reason = write_failure(exc, path)
        if reason is None and isinstance(exc, errors) and isinstance(exc, Exception):
            reason = " ".join(str(exc).split())[:160]
        if reason is None:
            raise
        if isinstance(exc, OSError) and exc.filename is not None and Path(exc.filename).parent != path.parent:
            reason += f": {exc.filename}"  # e.g. the folder of the file is itself a file
        raise UserError(f"cannot write {path} ({reason}); {what}") from exc


def write_text_atomic(path: str | os.PathLike[str], text: str, what: str) -> None:
    """:func:`write_atomic` of ``text``."""

    def write(tmp: Path) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    write_atomic(path, write, what)


def check_writable(path: str | os.PathLike[str], what: str, *, directory: bool = False, fix: str = "") -> None:
    """Before any work: raise a one-line :class:`UserError` unless ``path`` (a file, or with
    ``directory`` a folder) can be created or written, naming ``what`` (e.g. ``--results``), the
    path and the cause: a folder on the way that is a file, permissions, a read-only or full disk.
    Nothing is left behind (a probe folder is created and removed; an existing file is opened for
    appending and closed unchanged)."""
    path = Path(path)
    hint = f"; {fix}" if fix else ""

    def fail(cause: str) -> UserError:
        return UserError(f"cannot write {what} {path}: {cause}{hint}")

    if path.exists():
        if directory and not path.is_dir():
            raise fail("it is a file, not a directory")
        if not directory and path.is_dir():
            raise fail("it is a directory, not a file")
    existing = next(p for p in (path, *path.absolute().parents) if p.exists())
    if existing != path and not existing.is_dir():
        raise fail(f"{existing} is a file, not a directory")
    try:
        if existing == path and not directory:
            with open(path, "ab"):
                pass
        else:
            os.rmdir(tempfile.mkdtemp(prefix=".sslbench-write-test-", dir=existing))
    except OSError as exc:
        probe = exc.filename is not None and ".sslbench-write-test-" in str(exc.filename)
        where = f" ({exc.filename})" if exc.filename and Path(exc.filename) != path and not probe else ""
        raise fail(f"{exc.strerror or exc}{where}") from exc
