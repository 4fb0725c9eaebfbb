"""One writer per run directory.

A process that trains a run directory (``train``, ``train --resume``, each run of ``compare``)
or fills a comparison directory (``compare``) holds an exclusive ``flock`` on ``DIR/run.lock``
(:attr:`sslbench.core.rundir.RunDir.lock`) from before it reads or writes anything there until it has
written its last file. Under ``torchrun`` the main process holds it for the group (the other
processes write nothing in the run directory and are stopped when it dies). The operating system
releases the lock when its holder dies, also by SIGKILL: a killed run never blocks the next one,
and nothing has to be cleaned up by hand.

The file names its holder (pid, host, command, start time), so a second process refused with
:class:`~sslbench.core.errors.UserError` says who has the directory; ``eval`` uses :func:`lock_holder`
to refuse a run that is still being trained. The holder removes the file when it is done; a
process that takes the lock checks that the file it locked is still the one at the path (the
usual guard for lock files that are removed).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shlex
import socket
import sys
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sslbench.core.errors import UserError
from sslbench.core.rundir import RunDir

WAIT_S = 1.0  # how long a second process retries before it reports the holder (a brief probe by `eval` is no holder)
_command: str | None = None  # the command line this process runs (set by the CLI; else sys.argv)


def set_command(argv: list[str]) -> None:
    """Record this process's command line (``sslbench ...``) for the lock files it writes."""
    global _command
    _command = "sslbench " + shlex.join(argv)


def current_command() -> str:
    return _command or shlex.join(sys.argv)


@dataclass(frozen=True)
class Holder:
    """Who holds a run directory: what was read from its lock file (fields may be missing)."""

    pid: int | None
    host: str | None
    command: str | None
    since: float | None  # time.time() when it took the lock
    what: str | None  # "train" | "compare"

    @classmethod
    def parse(cls, text: str) -> Holder:
        try:
            data: Any = json.loads(text)
        except ValueError:
            data = {}
        if not isinstance(data, dict):
            data = {}
        pid, since = data.get("pid"), data.get("since")
        return cls(
            pid if isinstance(pid, int) else None,
            _str(data.get("host")),
            _str(data.get("command")),
            float(since) if isinstance(since, (int, float)) else None,
            _str(data.get("what")),
        )

    def describe(self) -> str:
        """``pid 123 on host since 2026-01-02 10:11:12 (3m ago), running `sslbench train ...```."""
        if self.pid is None:
            return "another process (it has not written its details yet)"
        text = f"pid {self.pid}" + (f" on {self.host}" if self.host else "")
        if self.since is not None:
            ago = max(0.0, time.time() - self.since)
            text += f" since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(self.since))} ({_duration(ago)} ago)"
        return text + (f", running `{self.command}`" if self.command else "")


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


class RunLock:
    """The exclusive lock of one directory; :meth:`acquire` it, :meth:`release` it (or ``with``)."""

    def __init__(self, directory: str | os.PathLike[str], *, what: str = "train") -> None:
        self.directory = Path(directory)
        self.path = RunDir(self.directory).lock
        self.what = what
        self.created = False  # this lock created the directory (removed again if still empty on release)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, *, fix: str = "pass another --output") -> RunLock:
        """Take the lock (creating the directory if needed) or raise a one-line :class:`UserError`
        naming the holder; ``fix`` ends that message."""
        deadline = time.monotonic() + WAIT_S
        for _ in range(1000):  # (a few rounds at most: each retry is a lock file removed or replaced in between)
            if not self.directory.is_dir():
                try:
                    self.directory.mkdir(parents=True)
                    self.created = True
                except FileExistsError:
                    pass  # another process made it (or a file is in the way: os.open below says so)
                except OSError as exc:
                    raise UserError(f"cannot create {self.directory} ({exc.strerror or exc}); {fix}") from exc
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except FileNotFoundError:
                continue  # the directory was removed in between (an emptied run that gave up): make it again
            except OSError as exc:
                raise UserError(f"cannot lock {self.path} ({exc.strerror or exc}); {fix}") from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise UserError(f"cannot lock {self.path} ({exc.strerror or exc}); {fix}") from exc
                if time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                holder = _read_holder(self.path)
                raise UserError(f"{self.directory} is in use by {holder.describe()}; wait for it to finish or stop it, or {fix}") from None
            if not _same_file(fd, self.path):  # its holder removed the file after we opened it: lock the new one
                os.close(fd)
                continue
            self._fd = fd
            _HELD.add(self)
            self._write_holder()
            return self
        raise UserError(f"cannot lock {self.path}: it keeps being removed or replaced by another process; {fix}")

    def _write_holder(self) -> None:
        assert self._fd is not None
        info = {"pid": os.getpid(), "host": socket.gethostname(), "command": current_command(), "since": time.time(), "what": self.what}
        data = (json.dumps(info) + "\n").encode()
        try:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, data, 0)
        except OSError:
            pass  # the lock holds without its description (a full disk): others are told "another process"

    def release(self) -> None:
        """Remove the lock file and let go (idempotent); an empty directory this lock created is removed."""
        if self._fd is None:
            return
        _HELD.discard(self)
        try:
            os.unlink(self.path)
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None
        if self.created:
            try:
                self.directory.rmdir()
            except OSError:
                pass  # not empty: the run's files are there

    def __enter__(self) -> RunLock:
        return self.acquire() if not self.held else self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass


_HELD: weakref.WeakSet[RunLock] = weakref.WeakSet()  # the locks this process holds


def _drop_in_forked_child() -> None:
    """In a forked child (a DataLoader worker): close the inherited descriptors of the parent's
    locks, without unlocking. The lock is the parent's: a child that kept the descriptor held the
    directory after the parent was killed, until the worker noticed (seconds later), and a resume
    started at once was refused as "in use" by the dead parent."""
    for lock in list(_HELD):
        if lock._fd is not None:
            try:
                os.close(lock._fd)
            except OSError:
                pass
        lock._fd = None
        lock.created = False
    _HELD.clear()


os.register_at_fork(after_in_child=_drop_in_forked_child)


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def _read_holder(path: Path) -> Holder:
    try:
        return Holder.parse(path.read_text(errors="replace"))
    except OSError:
        return Holder.parse("")


def lock_holder(directory: str | os.PathLike[str]) -> Holder | None:
    """Who holds ``directory``'s lock now, or None (also when there is no lock file or it cannot be
    read). Creates nothing: a read-only run directory can be asked."""
    path = RunDir(directory).lock
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return _read_holder(path)
            return None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def check_not_training(run_dir: str | os.PathLike[str], verb: str) -> None:
    """Refuse a run that a process is still training (its lock is held): its encoder is not final.
    ``verb`` is what the refused command does with the run (``evaluate``, ``export``)."""
    holder = lock_holder(run_dir)
    if holder is not None:
        raise UserError(f"{run_dir} is still being trained by {holder.describe()}; {verb} it once training has finished")
