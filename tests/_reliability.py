"""Helpers for the reliability tests (test_resume, test_cli_errors, test_safe_load).

Two ways to run the command line as a separate process:

- :func:`run_subprocess`: ``python -m sslbench ...``, the real thing (imports included, about 5
  CPU-seconds each before any work);
- :func:`fork_cli`: fork this (already-imported) process and run ``sslbench.commands.cli.main(argv)`` in
  the child, with its own stdout/stderr files, environment, default warning filters and logging,
  one torch thread, and the real exit status (``os._exit(main(argv))``; an uncaught exception
  prints its traceback and exits 1, as Python does). A SIGKILL or a signal the child sends itself
  acts on the child only. This is what keeps the tests fast on a loaded 2-core machine; each test
  file also runs some cases through :func:`run_subprocess` to check the real entry point.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

# the checks' own helpers, shared with the tests
from sslbench.testing import assert_same_weights as assert_same_weights
from sslbench.testing import run_group as run_group

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
TEST_ENV_VARS = ("SSLBENCH_TEST_KILL_AT", "SSLBENCH_TEST_SIGNAL_AT", "SSLBENCH_TEST_NAN_AT", "SSLBENCH_TEST_GATE", "SSLBENCH_CALLBACKS")
FAULTS = "_faults:FaultInjection"  # tests/_faults.py, installed in every CLI process the tests start

# A narrow ResNet-18 at 16 px: each training step takes milliseconds.
TINY = ["--image-size", "16", "--batch-size", "16", "--set", "backbone_kwargs.channels=8,16,32,64", "--precision", "no", "--quiet"]


def make_image_folder(root: Path, *, classes: int = 4, train: int = 16, test: int = 8, size: int = 16, seed: int = 0) -> Path:
    """``root/{train,test}/c<k>/<i>.png``: random RGB images, each class tinted differently."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", train), ("test", test)):
        for c in range(classes):
            d = root / split / f"c{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                a = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                a[..., c % 3] = a[..., c % 3] // 2 + 128
                Image.fromarray(a).save(d / f"{i}.png")
    return root


def child_env(cache: Path, **extra: str) -> dict[str, str]:
    """The environment for a CLI process: its own cache, one thread, no inherited test hooks, and
    the fault-injection callback installed (inert unless a SSLBENCH_TEST_* variable is set)."""
    env = {k: v for k, v in os.environ.items() if k not in TEST_ENV_VARS}
    env.update(
        SSLBENCH_CACHE=str(cache),
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join([str(REPO), str(TESTS)]),
        SSLBENCH_CALLBACKS=FAULTS,
    )
    env.update(extra)
    return env


def lines(text: str) -> list[str]:
    """The non-empty lines of ``text``."""
    return [line for line in text.splitlines() if line.strip()]


@dataclass
class Result:
    argv: list[str]
    returncode: int  # negative: killed by that signal (as subprocess reports it)
    stdout: str
    stderr: str

    def describe(self) -> str:
        return f"sslbench {' '.join(self.argv)}\nexit {self.returncode}\n--- stderr\n{self.stderr}\n--- stdout\n{self.stdout[-2000:]}"


def run_subprocess(argv: Sequence[str], env: dict[str, str], *, timeout: float = 600) -> Result:
    proc = subprocess.run([sys.executable, "-m", "sslbench", *argv], env=env, cwd=str(REPO), capture_output=True, text=True, timeout=timeout)
    return Result(list(argv), proc.returncode, proc.stdout, proc.stderr)


class Forked:
    """A forked child running ``sslbench.commands.cli.main``; :meth:`wait` gives its :class:`Result`."""

    def __init__(self, argv: list[str], pid: int, out: Path, err: Path) -> None:
        self.argv, self.pid, self.out, self.err = argv, pid, out, err
        self._result: Result | None = None

    def wait(self, timeout: float = 600) -> Result:
        if self._result is not None:
            return self._result
        deadline = time.monotonic() + timeout
        while True:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
                raise TimeoutError(f"sslbench {' '.join(self.argv)} ran for more than {timeout} s")
            time.sleep(0.05)
        self._result = _collect(self, status)
        return self._result


def _default_warnings() -> None:
    """Python's own warning filters and printing (pytest records warnings instead of showing them)."""
    warnings.resetwarnings()
    for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
        warnings.simplefilter("ignore", category)

    def show(message, category, filename, lineno, file=None, line=None):  # type: ignore[no-untyped-def]
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))

    warnings.showwarning = show


def _reset_child(env: dict[str, str]) -> None:
    os.environ.clear()
    os.environ.update(env)
    _default_warnings()
    root = logging.getLogger()
    for handler in list(root.handlers):  # pytest's capture handlers: let logging.lastResort print
        root.removeHandler(handler)
    root.setLevel(logging.WARNING)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL if sig == signal.SIGTERM else signal.default_int_handler)
    import torch

    torch.set_num_threads(1)
    if "accelerate" in sys.modules:  # a fresh Accelerator in every child, as in a new process
        from accelerate.state import AcceleratorState, GradientState, PartialState

        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        PartialState._reset_state()


def preload() -> None:
    """Import what a training run imports, once, in this process: forked children then start
    with it (otherwise each would spend ~5 CPU-seconds importing torch, timm and accelerate)."""
    import importlib

    for name in (
        "torch",
        "timm",
        "accelerate",
        "safetensors.torch",
        "rich.console",
        "rich.progress",
        "sslbench.commands.cli",
        "sslbench.config",
        "sslbench.train.trainer",
        "sslbench.core.progress",
        "sslbench.backbones",
        "sslbench.evaluation.features",
        "sslbench.evals.knn",
    ):
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    from sslbench.core.registry import METHODS

    METHODS.names()  # imports the built-in methods


def fork_cli(argv: Sequence[str], env: dict[str, str], *, before: Callable[[], None] | None = None) -> Forked:
    """Start ``sslbench argv`` in a forked child (see the module doc); ``before`` runs in the child
    first (to patch something)."""
    argv = list(argv)
    preload()
    folder = Path(tempfile.mkdtemp(prefix="sslbench-fork-"))
    out, err = folder / "stdout", folder / "stderr"
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 1
        try:
            os.dup2(os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), 1)
            os.dup2(os.open(err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), 2)
            sys.stdout = open(1, "w", buffering=1, closefd=False)
            sys.stderr = open(2, "w", buffering=1, closefd=False)
            _reset_child(env)
            if before is not None:
                before()
            from sslbench.commands.cli import main

            code = main(argv)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)
    return Forked(argv, pid, out, err)


def run_forked(argv: Sequence[str], env: dict[str, str], *, before: Callable[[], None] | None = None, timeout: float = 600) -> Result:
    return fork_cli(argv, env, before=before).wait(timeout)


def run_many(
    jobs: dict[str, tuple[list[str], dict[str, str], Callable[[], None] | None]], *, max_running: int = 6, timeout: float = 600
) -> dict[str, Result]:
    """Run ``{key: (argv, env, before)}`` as forked children, at most ``max_running`` at a time."""
    pending = list(jobs.items())
    running: dict[str, Forked] = {}
    done: dict[str, Result] = {}
    deadline = time.monotonic() + timeout
    while pending or running:
        while pending and len(running) < max_running:
            key, (argv, env, before) = pending.pop(0)
            running[key] = fork_cli(argv, env, before=before)
        for key, child in list(running.items()):
            pid, status = os.waitpid(child.pid, os.WNOHANG)
            if pid:
                done[key] = child._result = _collect(child, status)
                del running[key]
        if time.monotonic() > deadline:
            for child in running.values():
                os.kill(child.pid, signal.SIGKILL)
            raise TimeoutError(f"still running after {timeout} s: {sorted(running)}")
        time.sleep(0.05)
    return done


def _collect(child: Forked, status: int) -> Result:
    code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
    result = Result(child.argv, code, child.out.read_text(), child.err.read_text())
    shutil.rmtree(child.out.parent, ignore_errors=True)
    return result
