"""The training progress display: a rich progress bar on a terminal, plain lines elsewhere."""

from __future__ import annotations

import sys
import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class TrainProgress:
    """``update`` with fresh loss / lr / images-per-second at logging steps, ``advance`` otherwise."""

    def __init__(self, total: int, start: int, *, enabled: bool = True, plain_every_s: float = 10.0) -> None:
        self.total, self.enabled = total, enabled
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
            print(f"step {done}/{self.total}  loss {loss:.4f}  lr {lr:.3g}  {ips:,.0f} img/s", file=sys.stderr, flush=True)
