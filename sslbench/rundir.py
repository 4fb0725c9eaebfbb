"""A run directory's files, and the one atomic writer of sslbench.

:class:`RunDir` owns every file name of a run directory; nothing else spells them::

    RUN_DIR/
      config.yaml           the full resolved config (written when training starts)
      metrics.jsonl         per-step loss, lr, images/s (and the online probe's records)
      checkpoints/          step-NNNNNNNN/ directories (sslbench.checkpoint)
      encoder.safetensors   the backbone's weights under timm's own key names
      method.safetensors    the whole method, heads included
      results.json          the training summary (wall time, speed, quick k-NN)
      reconstructions.png   test images and their reconstructions (methods that reconstruct, e.g. MAE)
      budget.json           the budget as `compare` was given it ({"kind": ..., "value": ...})

Results stores (``results.jsonl``) live next to run directories, not in them:
:attr:`RunDir.results_store` is where ``sslbench eval RUN_DIR`` appends by default.

:func:`write_atomic` is how every file that is replaced as a whole is written (run files, the
decoded-data cache, leaderboard tables): a reader never sees half a file, and a failure (disk full)
removes the temporary file, keeps the previous file and raises a one-line :class:`UserError`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
ENCODER = "encoder.safetensors"
METHOD = "method.safetensors"
SUMMARY = "results.json"
BUDGET = "budget.json"
PICTURE = "reconstructions.png"
RESULTS_STORE = "results.jsonl"  # a results store (next to run directories, or in a comparison's directory)


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
    def summary(self) -> Path:
        """``results.json``: what training wrote when it finished."""
        return self.path / SUMMARY

    @property
    def budget(self) -> Path:
        return self.path / BUDGET

    @property
    def picture(self) -> Path:
        """``reconstructions.png``: written by :mod:`sslbench.picture` for methods that reconstruct images."""
        return self.path / PICTURE

    @property
    def results_store(self) -> Path:
        """The default results store of ``sslbench eval``: ``results.jsonl`` next to the run directory."""
        return self.path.resolve().parent / RESULTS_STORE

    def is_finished(self) -> bool:
        """Whether training wrote its final files (the summary and the encoder)."""
        return self.summary.is_file() and self.encoder.is_file()


def write_atomic(
    path: str | os.PathLike[str],
    write: Callable[[Path], object],
    what: str,
    *,
    errors: tuple[type[BaseException], ...] = (OSError,),
) -> None:
    """``write(tmp)`` to a temporary file next to ``path``, fsync it, then rename it over ``path``:
    a reader never sees a half-written file. A failure removes the temporary file and keeps the
    previous ``path``; one of ``errors`` becomes a one-line :class:`UserError` naming ``path``, the
    cause and ``what`` (how to recover); anything else (a bug, Ctrl-C) is raised as it is."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            tmp.unlink()
        except OSError:
            pass
        if not isinstance(exc, errors):
            raise
        reason = getattr(exc, "strerror", None) or " ".join(str(exc).split())[:160]
        raise UserError(f"cannot write {path} ({reason}); {what}") from exc


def write_text_atomic(path: str | os.PathLike[str], text: str, what: str) -> None:
    """:func:`write_atomic` of ``text``."""

    def write(tmp: Path) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    write_atomic(path, write, what)
