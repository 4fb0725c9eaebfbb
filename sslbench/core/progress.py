"""The training progress display: a rich progress bar on a terminal, plain lines elsewhere (a log
file, a pipe, a batch job), with the same facts: step, loss, lr, images/s, elapsed and ETA."""

from __future__ import annotations

import sys
import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class TrainProgress:
    """``update`` with fresh loss / lr / images-per-second at logging steps, ``advance`` otherwise."""

    def __init__(
        self,
        total: int,
        start: int,
        *,
        enabled: bool = True,
        plain_every_s: float = 10.0,
        time_budget_s: float | None = None,
        unbounded: bool = False,
    ) -> None:
        self.total, self.start, self.enabled = total, start, enabled
        self.time_budget_s, self.unbounded = time_budget_s, unbounded
        self._t0 = time.monotonic()
        self.console = Console(file=sys.stderr)
        self.rich = enabled and self.console.is_terminal
        self.plain_every_s = plain_every_s
        self._last_plain = 0.0
        self._progress: Progress | None = None
        if self.rich:
            self._progress = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"),
                TextColumn("lr {task.fields[lr]}"),
                TextColumn("{task.fields[ips]} img/s"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=self.console,
            )
            self._task = self._progress.add_task("train", total=total, completed=start, loss="-", lr="-", ips="-")

    def __enter__(self) -> TrainProgress:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._progress is not None:
            self._progress.stop()

    def advance(self, done: int) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=done)

    def update(self, done: int, *, loss: float, lr: float, ips: float) -> None:
        if not self.enabled:
            return
        if self._progress is not None:
            self._progress.update(self._task, completed=done, loss=f"{loss:.4f}", lr=f"{lr:.3g}", ips=f"{ips:,.0f}")
            return
        now = time.monotonic()
        if now - self._last_plain >= self.plain_every_s or done == self.total:
            self._last_plain = now
            where = f"step {done}" if self.unbounded else f"step {done}/{self.total}"
            print(
                f"{where}  loss {loss:.4f}  lr {lr:.3g}  {ips:,.0f} img/s  elapsed {clock(now - self._t0)}  {self.eta(done, now)}",
                file=sys.stderr,
                flush=True,
            )

    def eta(self, done: int, now: float) -> str:
        """``eta 1m05s``: the steps left at the speed so far, or the time budget left if that ends sooner."""
        elapsed = now - self._t0
        left: list[float] = []
        if not self.unbounded and done > self.start:
            left.append((self.total - done) * elapsed / (done - self.start))
        if self.time_budget_s is not None:
            left.append(max(0.0, self.time_budget_s - elapsed))
        return f"eta {clock(min(left))}" if left else "eta -"


def clock(seconds: float) -> str:
    """``42s``, ``3m05s``, ``2h07m``."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"
