"""Deterministic fault injection for the reliability tests (``tests/test_resume.py``).

Nothing here does anything unless one of these environment variables is set; they exist so the
tests can crash a run at an exact point instead of sleeping and hoping:

``SSLBENCH_TEST_KILL_AT=step:N``
    SIGKILL this process right after optimizer step N (that is, when N steps are done; before the
    checkpoint of step N, if one is due, is written).
``SSLBENCH_TEST_KILL_AT=ckpt_write:N``
    SIGKILL this process in the middle of writing the checkpoint of step N: after Accelerate has
    written the model, optimizer and RNG files into the temporary directory, before ``meta.json``,
    ``manifest.json`` and the rename.
``SSLBENCH_TEST_SIGNAL_AT=N[:SIGNAME][@RANK]``
    Send SIGTERM (or SIGNAME, e.g. ``SIGINT``) to this process right after step N; with ``@RANK``
    only in the process of that rank (``$RANK``, set by ``torchrun``), as when a scheduler's
    signal reaches the processes of a multi-process run at different steps.
``SSLBENCH_TEST_NAN_AT=N[@RANK]``
    Make the loss of step N (the step after which N steps are done) NaN; with ``@RANK`` only in
    the process of that rank.
``SSLBENCH_TEST_DEFERRED_NONFINITE=1``
    Check for a non-finite loss the way the trainer does on a GPU (recorded on the device, read at
    logging and checkpoint steps) instead of after every step as on the CPU.

Steps are counted as "steps done", like checkpoint names (``step-00000004`` holds the state after 4
steps) and the ``step`` of ``metrics.jsonl``.
"""

from __future__ import annotations

import os
import signal

KILL_AT = "SSLBENCH_TEST_KILL_AT"
SIGNAL_AT = "SSLBENCH_TEST_SIGNAL_AT"
NAN_AT = "SSLBENCH_TEST_NAN_AT"
DEFERRED_NONFINITE = "SSLBENCH_TEST_DEFERRED_NONFINITE"


def kill_point(kind: str, n: int) -> None:
    """SIGKILL this process when ``$SSLBENCH_TEST_KILL_AT`` is ``kind:n``."""
    spec = os.environ.get(KILL_AT)
    if spec and spec.replace(" ", "") == f"{kind}:{n}":
        os.kill(os.getpid(), signal.SIGKILL)


def after_step(done: int) -> None:
    """The hooks that fire once ``done`` optimizer steps are finished."""
    kill_point("step", done)
    spec = os.environ.get(SIGNAL_AT)
    if spec:
        spec, _, rank = spec.partition("@")
        at, _, name = spec.partition(":")
        if at.strip() == str(done) and (not rank.strip() or rank.strip() == os.environ.get("RANK", "0")):
            os.kill(os.getpid(), getattr(signal, name.strip() or "SIGTERM"))


def nan_at(done: int) -> bool:
    """Whether the loss of the step that makes ``done`` steps done should be NaN."""
    spec = os.environ.get(NAN_AT)
    if not spec:
        return False
    at, _, rank = spec.partition("@")
    return at.strip() == str(done) and (not rank.strip() or rank.strip() == os.environ.get("RANK", "0"))


def deferred_nonfinite() -> bool:
    """Whether to check non-finite losses as on a GPU (``$SSLBENCH_TEST_DEFERRED_NONFINITE``)."""
    return os.environ.get(DEFERRED_NONFINITE, "") == "1"
