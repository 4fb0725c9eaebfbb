"""Observers of the training loop.

A :class:`Callback` has one do-nothing method per event; the loop calls every event of every
callback unconditionally. The loop's decisions for the step that just ended (log it, checkpoint
it, stop after it) live in a :class:`Control` that callbacks may set. The built-in callbacks:

- :class:`StopControl`: SIGTERM/SIGINT and the time budget, agreed by every process;
- :class:`CheckpointPolicy`: the periodic checkpoints;
- :class:`MetricsFile`: ``metrics.jsonl`` (main process);
- :class:`ProgressDisplay`: the progress bar, or plain lines when not on a terminal.

Other layers add their own (the online probe of :mod:`sslbench.evals.online_probe`, a test's fault
injection, a user's logger). A package registers its callback classes with
:func:`register_callback` (entry-point group ``sslbench.callbacks``; ``sslbench list callbacks``)
and a run uses those named in ``$SSLBENCH_CALLBACKS`` (comma-separated registered names, or
``module:Class`` entries for a class that is not registered), also in its subprocesses:
:func:`callbacks_from_env`.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from sslbench.core.errors import UserError
from sslbench.core.method import Batch, StepInfo
from sslbench.core.registry import Registry

if TYPE_CHECKING:
    from sslbench.core.progress import TrainProgress
    from sslbench.train.run_setup import Run

__all__ = [
    "CALLBACKS",
    "CALLBACKS_ENV",
    "Callback",
    "CheckpointPolicy",
    "Control",
    "MetricsFile",
    "ProgressDisplay",
    "StopControl",
    "callbacks_from_env",
    "register_callback",
]

CALLBACKS_ENV = "SSLBENCH_CALLBACKS"
CALLBACKS_ENTRY_POINT_GROUP = "sslbench.callbacks"


@dataclass
class Control:
    """What the loop does after the step that just ended; reset every step."""

    done: int = 0  # steps done after this step
    log: bool = False  # write a metrics record (the loop's mean loss, lr, images/s)
    save: bool = False  # write a checkpoint
    stop_signal: int | None = None  # stop after this step (checkpointed), for this signal
    progress: float | None = None  # the agreed progress in [0, 1] under a time budget alone
    records: list[dict[str, Any]] = field(default_factory=list)  # extra metrics.jsonl records (the online probe's)


class Callback:
    """An observer of the loop. Every method is called, for every callback, in ``order`` (then
    list order): fault injection (-100) acts before the stop decision (-10) that it may provoke;
    the loop's stop decision comes before the observers (0) that read it, and the checkpoint
    policy (10), the metrics file (20) and the display (30) come last."""

    order: ClassVar[int] = 0

    def on_train_start(self, run: Run) -> None:
        """Before the first step (also of a resumed run)."""

    def on_loss(self, run: Run, info: StepInfo, loss: Tensor) -> Tensor:
        """The step's loss, before the non-finite check and backward; returns the loss to use."""
        return loss

    def on_step_end(self, run: Run, batch: Batch, control: Control) -> None:
        """After the optimizer step (``control.done`` steps done); may set ``control``."""

    def on_record(self, run: Run, record: dict[str, Any]) -> None:
        """A ``metrics.jsonl`` record (the loop's at logging steps, or another callback's)."""

    def on_checkpoint_written(self, run: Run, step: int, tmp_dir: Path) -> None:
        """A checkpoint's files are written into ``tmp_dir``, not yet renamed into place."""

    def on_train_end(self, run: Run, steps_done: int) -> None:
        """After the last step, or after a stop: also on an error, for closing files."""


def _check_callback(name: str, cls: Any) -> None:
    if not (isinstance(cls, type) and issubclass(cls, Callback)):
        raise TypeError(f"callback {name!r}: {cls!r} must subclass sslbench.api.Callback")


#: Callback classes a run can name in ``$SSLBENCH_CALLBACKS`` (none built in: the built-in
#: observers are always on, and the online probe and the trackers are config keys).
CALLBACKS: Registry[type[Callback]] = Registry("callback", CALLBACKS_ENTRY_POINT_GROUP, check=_check_callback)


def register_callback(name: str) -> Any:
    """Class decorator: ``@register_callback("my_logger")`` adds a :class:`Callback` subclass that
    ``SSLBENCH_CALLBACKS=my_logger`` switches on (its class is built with no arguments)."""
    return CALLBACKS.register(name)


def callbacks_from_env() -> list[Callback]:
    """The callbacks named in ``$SSLBENCH_CALLBACKS``, instantiated: registered names
    (:data:`CALLBACKS`) or ``module:Class`` entries (imported)."""
    out: list[Callback] = []
    for spec in filter(None, (s.strip() for s in os.environ.get(CALLBACKS_ENV, "").split(","))):
        if ":" not in spec:
            try:
                obj: Any = CALLBACKS.get(spec)
            except UserError as exc:
                raise UserError(f"${CALLBACKS_ENV}: {exc}; or name a class as module:Class") from None
        else:
            module, _, name = spec.partition(":")
            try:
                obj = getattr(importlib.import_module(module), name or "Callback")
            except (ImportError, AttributeError) as exc:
                raise UserError(f"${CALLBACKS_ENV}: cannot import {spec!r} ({exc}); use registered names or module:Class entries") from exc
        cb = obj()
        if not isinstance(cb, Callback):
            raise UserError(f"${CALLBACKS_ENV}: {spec!r} is not an sslbench.train.callbacks.Callback")
        out.append(cb)
    return out


class StopControl(Callback):
    """SIGTERM/SIGINT set a flag and the time budget runs out (training time over every session of
    the run: :meth:`Run.train_time_s`); the loop checkpoints and stops after the step. Several processes must stop after the same step: they agree at logging steps, which
    synchronise anyway (one all-reduce, no per-step host sync). A second Ctrl-C stops at once."""

    order = -10

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def on_train_start(self, run: Run) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass

    def on_step_end(self, run: Run, batch: Batch, control: Control) -> None:
        budget = run.cfg.time_budget_s
        elapsed = run.train_time_s()
        spent = budget is not None and elapsed >= budget
        signum = self.signum
        progress = min(elapsed / budget, 1.0) if budget is not None else None
        if run.world > 1:
            if not control.log:
                return
            signum, spent, progress = _agree(signum, spent, progress, run.device)
        control.progress = progress
        control.stop_signal = signum
        if spent and control.done < run.plan.total_steps:
            run.plan.total_steps = control.done  # the budget is spent: this step is the last (logged, saved, evaluated as usual)
            control.log = True

    def on_train_end(self, run: Run, steps_done: int) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()


def _agree(signum: int | None, spent: bool, progress: float | None, device: torch.device) -> tuple[int | None, bool, float | None]:
    """The same decision on every process: the largest signal any process received (SIGTERM over
    SIGINT), whether any spent the budget, the largest progress. One all-reduce."""
    import torch.distributed as torch_dist

    micro = -1 if progress is None else int(progress * 1_000_000)
    flags = torch.tensor([signum or 0, int(spent), micro], dtype=torch.int64).to(device, non_blocking=True)
    torch_dist.all_reduce(flags, op=torch_dist.ReduceOp.MAX)
    signal_max, any_spent, micro_max = flags.tolist()
    return (signal_max or None), bool(any_spent), (None if micro_max < 0 else micro_max / 1_000_000)


class CheckpointPolicy(Callback):
    """A checkpoint every ``checkpoint_every`` steps (the final one is the loop's)."""

    order = 10

    def on_step_end(self, run: Run, batch: Batch, control: Control) -> None:
        every = run.cfg.checkpoint_every
        if every and control.done % every == 0 and control.done < run.plan.total_steps:
            control.save = True


class MetricsFile(Callback):
    """``metrics.jsonl``: one JSON record per line, flushed at every logging step (main process).

    A failed write (disk full) stops the run with one line: the checkpoints are intact, and a
    resumed run cuts the file back to its checkpoint's step (a torn last line included)."""

    order = 20

    def __init__(self) -> None:
        self._file: IO[str] | None = None

    def on_train_start(self, run: Run) -> None:
        if run.main:
            try:
                self._file = open(run.files.metrics, "a")
            except OSError as exc:
                raise self._error(run, exc) from exc

    def on_record(self, run: Run, record: dict[str, Any]) -> None:
        if self._file is not None:
            try:
                self._file.write(json.dumps(record) + "\n")
                if "loss" in record:
                    self._file.flush()
            except OSError as exc:
                raise self._error(run, exc) from exc

    def on_train_end(self, run: Run, steps_done: int) -> None:
        if self._file is not None:
            file, self._file = self._file, None
            try:
                file.close()
            except OSError:
                pass  # (the write that failed has already stopped the run with its own message)

    @staticmethod
    def _error(run: Run, exc: OSError) -> UserError:
        last = f"the last checkpoint ({run.last_ckpt.name}) is intact; " if run.last_ckpt else ""
        return UserError(f"cannot write {run.files.metrics} ({exc.strerror or exc}); {last}free some space and continue with `{run.resume_command}`")


class ProgressDisplay(Callback):
    """The progress bar on a terminal, plain lines elsewhere (main process, unless quiet)."""

    order = 30

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self._bar: TrainProgress | None = None

    def on_train_start(self, run: Run) -> None:
        from sslbench.core.progress import TrainProgress

        budget = run.cfg.time_budget_s
        self._bar = TrainProgress(
            run.plan.total_steps, run.start_step, enabled=run.main and not self.quiet, time_budget_s=budget, unbounded=run.time_based
        )
        self._bar.__enter__()

    def on_step_end(self, run: Run, batch: Batch, control: Control) -> None:
        if self._bar is not None and not control.log:
            self._bar.advance(control.done)

    def on_record(self, run: Run, record: dict[str, Any]) -> None:
        if self._bar is not None and "loss" in record:
            self._bar.update(int(record["step"]), loss=record["loss"], lr=record["lr"], ips=record["images_per_s"])

    def on_train_end(self, run: Run, steps_done: int) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)
            self._bar = None
