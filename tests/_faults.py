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

``SSLBENCH_TEST_GATE=PATH``
    Wait before the first step (the run directory is set up and locked) until PATH exists: a test
    holds a run "in training" for as long as it needs.

Steps are counted as "steps done", like checkpoint names and the ``step`` of ``metrics.jsonl``.

:func:`fail_writes` and :func:`file_size_limit` fake a full, read-only or forbidden disk for the
writes of a forked CLI child (``fork_cli(..., before=fail_writes(...))``), without filling a disk.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sslbench.train.callbacks import Callback

KILL_AT = "SSLBENCH_TEST_KILL_AT"
SIGNAL_AT = "SSLBENCH_TEST_SIGNAL_AT"
NAN_AT = "SSLBENCH_TEST_NAN_AT"
GATE = "SSLBENCH_TEST_GATE"
ENV_VARS = (KILL_AT, SIGNAL_AT, NAN_AT, GATE)
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

    def on_train_start(self, run: Any) -> None:
        gate = os.environ.get(GATE)
        if gate:
            deadline = time.monotonic() + 600
            while not os.path.exists(gate) and time.monotonic() < deadline:
                time.sleep(0.05)

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


# ---------------------------------------------------------------------------------------------
# File-system faults, installed in a forked CLI child (``fork_cli(..., before=...)``)

SAFETENSORS_ENOSPC = "Error while serializing: I/O error: No space left on device (os error 28)"  # safetensors' own text
TORCH_WRITER_ERROR = "[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"  # torch.save on a full disk


def fail_writes(pattern: str, err: int = errno.ENOSPC, *, nth: int | None = None) -> Callable[[], None]:
    """A ``before`` hook: the ``nth`` (default: the first) write whose path matches the regex
    ``pattern`` fails as on a full (``ENOSPC``) disk: half of the data is written, then the writer
    raises what it raises on a real full disk (Python's ``OSError``, safetensors'
    ``SafetensorError``, ``torch.save``'s ``RuntimeError``). With ``EACCES``/``EROFS`` no matching
    file or folder can be created at all (every one, unless ``nth`` is given).

    Patched: ``open``/``io.open`` in write modes, ``os.open`` with write flags, ``os.write`` (by the
    descriptor's path), ``os.mkdir`` (``EACCES``/``EROFS`` only), ``torch.save``, safetensors'
    ``save_file`` (also as Accelerate imported it)."""

    def install() -> None:
        import builtins
        import io

        import accelerate.utils.other
        import safetensors.torch
        import torch
        from safetensors import SafetensorError

        regex = re.compile(pattern)
        seen = {"n": 0}
        full = err in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)

        every = nth is None and not full

        def hit(path: Any) -> bool:
            if not isinstance(path, (str, bytes, os.PathLike)) or not regex.search(os.fsdecode(os.fspath(path))):
                return False
            seen["n"] += 1
            return every or seen["n"] == (nth or 1)

        def oserror(path: Any) -> OSError:
            return OSError(err, os.strerror(err), os.fsdecode(os.fspath(path)))

        real_open, real_os_open, real_write, real_mkdir = builtins.open, os.open, os.write, os.mkdir
        real_save, real_st_save = torch.save, safetensors.torch.save_file
        failing_fds: set[int] = set()

        class HalfFile:
            def __init__(self, f: Any, path: Any) -> None:
                self.f, self.path = f, path

            def write(self, data: Any) -> int:
                self.f.write(data[: len(data) // 2])
                self.f.flush()
                raise oserror(self.path)

            def __getattr__(self, name: str) -> Any:
                return getattr(self.f, name)

            def __enter__(self) -> HalfFile:
                return self

            def __exit__(self, *exc: object) -> None:
                self.f.close()

            def __iter__(self) -> Any:
                return iter(self.f)

        def fake_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
            if any(c in mode for c in "wax+") and hit(file):
                if not full:
                    raise oserror(file)
                return HalfFile(real_open(file, mode, *args, **kwargs), file)
            return real_open(file, mode, *args, **kwargs)

        def fake_os_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
            writing = flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND)
            if writing and not str(os.fspath(path)).endswith(".lock") and hit(path):
                if not full:
                    raise oserror(path)
                fd = real_os_open(path, flags, *args, **kwargs)
                failing_fds.add(fd)
                return fd
            return real_os_open(path, flags, *args, **kwargs)

        def fake_write(fd: int, data: Any) -> int:
            if fd in failing_fds:
                failing_fds.discard(fd)
                real_write(fd, bytes(data)[: len(data) // 2])
                raise OSError(err, os.strerror(err))
            return real_write(fd, data)

        def fake_mkdir(path: Any, *args: Any, **kwargs: Any) -> None:
            if not full and hit(path):
                raise oserror(path)
            real_mkdir(path, *args, **kwargs)

        def half_then(path: Any, data: bytes, exc: BaseException) -> None:
            with real_open(path, "wb") as f:
                f.write(data[: len(data) // 2])
            raise exc

        def fake_save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
            if hit(f):
                if not full:
                    raise RuntimeError(f"File {os.fspath(f)} cannot be opened.")
                buf = io.BytesIO()
                real_save(obj, buf, *args, **kwargs)
                half_then(f, buf.getvalue(), RuntimeError(TORCH_WRITER_ERROR))
            real_save(obj, f, *args, **kwargs)

        def fake_st_save(tensors: Any, filename: Any, metadata: Any = None) -> None:
            if hit(filename):
                if not full:
                    raise SafetensorError(f"Error while serializing: I/O error: {os.strerror(err)} (os error {err})")
                from safetensors.torch import save

                half_then(filename, save(tensors, metadata=metadata), SafetensorError(SAFETENSORS_ENOSPC))
            real_st_save(tensors, filename, metadata=metadata)

        builtins.open = io.open = fake_open  # type: ignore[assignment]
        os.open, os.write, os.mkdir = fake_os_open, fake_write, fake_mkdir  # type: ignore[assignment]
        torch.save = fake_save
        safetensors.torch.save_file = fake_st_save
        accelerate.utils.other.safe_save_file = fake_st_save

    return install


def file_size_limit(limit_bytes: int) -> Callable[[], None]:
    """A ``before`` hook: no file of this process may grow beyond ``limit_bytes`` (``RLIMIT_FSIZE``;
    a write past it fails with ``EFBIG`` in the real writers, as on a full disk), SIGXFSZ ignored."""

    def install() -> None:
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    return install
