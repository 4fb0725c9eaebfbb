"""Deterministic fault injection for the reliability tests, as a training callback.

Installed in a run through ``$SSLBENCH_CALLBACKS=_faults:FaultInjection`` (``tests/`` on the path:
:func:`_reliability.child_env` sets both), so it also acts in forked children and in the
processes of ``torchrun``. Nothing happens unless one of these variables is set:

``SSLBENCH_TEST_KILL_AT=step:N``
    SIGKILL this process right after optimizer step N (before the checkpoint of step N, if due).
``SSLBENCH_TEST_KILL_AT=ckpt_write:N``
    SIGKILL this process in the middle of writing the checkpoint of step N: after Accelerate has
    written its files into the temporary directory, before ``meta.json``, the manifest and the rename.
``SSLBENCH_TEST_SIGNAL_AT=N[:SIGNAME][@RANK]``
    Send SIGTERM (or SIGNAME) to this process right after step N; with ``@RANK`` only in the
    process of that rank (``$RANK``, set by ``torchrun``).
``SSLBENCH_TEST_NAN_AT=N[@RANK]``
    Make the loss of step N (the step after which N steps are done) NaN; with ``@RANK`` only in
    the process of that rank.

Steps are counted as "steps done", like checkpoint names and the ``step`` of ``metrics.jsonl``.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

from sslbench.callbacks import Callback

KILL_AT = "SSLBENCH_TEST_KILL_AT"
SIGNAL_AT = "SSLBENCH_TEST_SIGNAL_AT"
NAN_AT = "SSLBENCH_TEST_NAN_AT"
ENV_VARS = (KILL_AT, SIGNAL_AT, NAN_AT)
CALLBACK = "_faults:FaultInjection"


def _at(spec: str, done: int) -> tuple[bool, str]:
    """Whether ``N[:extra][@RANK]`` names step ``done`` in this process; and the extra part."""
    spec, _, rank = spec.partition("@")
    at, _, extra = spec.partition(":")
    mine = not rank.strip() or rank.strip() == os.environ.get("RANK", "0")
    return at.strip() == str(done) and mine, extra.strip()


class FaultInjection(Callback):
    order = -100  # before the loop's stop decision, which must see the signal sent here

    def _kill(self, kind: str, n: int) -> None:
        spec = os.environ.get(KILL_AT, "").replace(" ", "")
        if spec == f"{kind}:{n}":
            os.kill(os.getpid(), signal.SIGKILL)

    def on_loss(self, run: Any, info: Any, loss: Any) -> Any:
        spec = os.environ.get(NAN_AT)
        if spec and _at(spec, info.step + 1)[0]:
            return loss * float("nan")
        return loss

    def on_step_end(self, run: Any, batch: Any, control: Any) -> None:
        self._kill("step", control.done)
        spec = os.environ.get(SIGNAL_AT)
        if spec:
            hit, name = _at(spec, control.done)
            if hit:
                os.kill(os.getpid(), getattr(signal, name or "SIGTERM"))

    def on_checkpoint_written(self, run: Any, step: int, tmp_dir: Path) -> None:
        self._kill("ckpt_write", step)
