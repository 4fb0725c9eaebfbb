"""Tests for the append-only results store (sslbench/results/__init__.py)."""

from __future__ import annotations

import errno
import json
import math
import multiprocessing as mp
import os
import re
import warnings
from pathlib import Path

import pytest

import sslbench
from sslbench import results
from sslbench.core.errors import UserError
from sslbench.results import append_row, environment_info, make_row, read_rows

WRITERS = 8
ROWS_PER_WRITER = 50


def _writer(path: str, writer: int) -> None:
    """Child process: append ROWS_PER_WRITER rows; payload sizes vary so that writes of
    different lengths race each other."""
    for seq in range(ROWS_PER_WRITER):
        append_row(path, {"writer": writer, "seq": seq, "payload": "x" * (seq * 37 % 900)})


def test_concurrent_writers_lose_nothing(tmp_path: Path) -> None:
    path = str(tmp_path / "deep" / "dir" / "results.jsonl")  # parents are created
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(path, w)) for w in range(WRITERS)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    raw = Path(path).read_bytes()
    assert raw.endswith(b"\n") and raw.count(b"\n") == WRITERS * ROWS_PER_WRITER
    rows = read_rows(path)
    assert len(rows) == WRITERS * ROWS_PER_WRITER
    assert {(r["writer"], r["seq"]) for r in rows} == {(w, s) for w in range(WRITERS) for s in range(ROWS_PER_WRITER)}
    for w in range(WRITERS):  # each writer's rows keep their order
        assert [r["seq"] for r in rows if r["writer"] == w] == list(range(ROWS_PER_WRITER))


def test_torn_write_loses_only_the_torn_row(tmp_path: Path) -> None:
    path = tmp_path / "results.jsonl"
    append_row(path, {"i": 0})
    append_row(path, {"i": 1})
    # A writer killed (SIGKILL) mid-write: half of a line, no newline.
    line = json.dumps({"i": "torn", "metrics": {"knn_top1": 50.0}})
    with open(path, "ab") as f:
        f.write(line[: len(line) // 2].encode())
    with pytest.warns(UserWarning, match="skipped 1 unreadable line"):
        assert [r["i"] for r in read_rows(path)] == [0, 1]
    append_row(path, {"i": 2})
    append_row(path, {"i": 3})
    with pytest.warns(UserWarning, match="skipped 1 unreadable line"):
        assert [r["i"] for r in read_rows(path)] == [0, 1, 2, 3]
    lines = path.read_text().splitlines()
    assert len(lines) == 5 and lines[2] == line[: len(line) // 2]


def test_disk_full_raises_user_error_and_keeps_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "results.jsonl"
    append_row(path, {"i": 0})
    append_row(path, {"i": 1})
    before = path.read_bytes()

    def full(fd: int, data: bytes) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(UserError, match=r"results\.jsonl.*No space left on device"):
        append_row(path, {"i": 2})
    monkeypatch.undo()
    assert path.read_bytes() == before
    append_row(path, {"i": 3})
    assert [r["i"] for r in read_rows(path)] == [0, 1, 3]


def test_partial_write_then_disk_full_is_recovered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The file system takes a few bytes, then fails: the fragment is cut off again, so the store
    # is as it was and the next row follows the last good one.
    path = tmp_path / "results.jsonl"
    append_row(path, {"i": 0})
    real_write = os.write
    calls = []

    def short_then_full(fd: int, data: bytes) -> int:
        calls.append(len(data))
        if len(calls) == 1:
            return real_write(fd, bytes(data[:5]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", short_then_full)
    with pytest.raises(UserError):
        append_row(path, {"i": 1})
    monkeypatch.undo()
    assert path.read_bytes() == b'{"i": 0}\n'
    append_row(path, {"i": 2})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no torn line to skip
        assert [r["i"] for r in read_rows(path)] == [0, 2]


def test_a_torn_line_that_cannot_be_cut_off_is_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # When even cutting the fragment off fails, it stays on a line of its own and is skipped on read.
    path = tmp_path / "results.jsonl"
    append_row(path, {"i": 0})
    real_write = os.write

    def short_then_full(fd: int, data: bytes) -> int:
        real_write(fd, bytes(data[:5]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def no_truncate(fd: int, size: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "write", short_then_full)
    monkeypatch.setattr(os, "ftruncate", no_truncate)
    with pytest.raises(UserError, match="No space left on device"):
        append_row(path, {"i": 1})
    monkeypatch.undo()
    append_row(path, {"i": 2})
    with pytest.warns(UserWarning, match="skipped 1"):
        assert [r["i"] for r in read_rows(path)] == [0, 2]


def test_rows_are_one_line_of_strict_json(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    append_row(path, {"text": "two\nlines", "nan": math.nan, "inf": -math.inf, "nested": {"x": (1, math.nan)}})
    raw = path.read_bytes()
    assert raw.count(b"\n") == 1
    assert read_rows(path) == [{"text": "two\nlines", "nan": None, "inf": None, "nested": {"x": [1, None]}}]
    with pytest.raises(UserError):
        append_row(path, {"bad": object()})
    assert path.read_bytes() == raw


def test_read_rows_missing_and_blank(tmp_path: Path) -> None:
    assert read_rows(tmp_path / "absent.jsonl") == []
    path = tmp_path / "r.jsonl"
    path.write_text('\n{"a": 1}\n\n   \n{"a": 2}\n')
    assert read_rows(path) == [{"a": 1}, {"a": 2}]


def test_environment_info() -> None:
    env = environment_info()
    for key in ("cpu", "cpu_count", "gpus", "python", "torch", "torchvision", "timm", "accelerate", "sslbench", "git_commit", "platform"):
        assert key in env
    assert env["sslbench"] == sslbench.__version__
    assert env["cpu_count"] == os.cpu_count()
    assert isinstance(env["gpus"], list)
    assert env["git_commit"] is None or re.fullmatch(r"[0-9a-f]{40}(-dirty)?", env["git_commit"])
    assert os.uname().nodename not in json.dumps(env)
    json.dumps(env, allow_nan=False)


def test_source_commit_outside_a_checkout(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Pretend the package lives in a plain directory (an installed wheel).
    fake = tmp_path / "site" / "sslbench" / "results" / "__init__.py"
    fake.parent.mkdir(parents=True)
    fake.write_text("")
    monkeypatch.setattr(results, "__file__", str(fake))
    assert results.source_commit() is None


def test_make_row(tmp_path: Path) -> None:
    run = {
        "method": "simclr",
        "backbone": "resnet18",
        "data": "digits",
        "image_size": 32,
        "seed": 1,
        "budget_kind": "epochs",
        "budget": 10,
        "extra": "kept",
    }
    row = make_row(metrics={"knn_top1": 91.5}, protocol={"name": "knn", "k": 200}, run=run)
    assert list(row)[: 1 + len(results.RUN_FIELDS)] == ["time", *results.RUN_FIELDS]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", row["time"])
    assert row["method"] == "simclr" and row["steps"] is None and row["extra"] == "kept"
    assert row["metrics"] == {"knn_top1": 91.5} and row["protocol"]["k"] == 200
    assert row["env"]["sslbench"] == sslbench.__version__
    append_row(tmp_path / "r.jsonl", row)
    assert read_rows(tmp_path / "r.jsonl") == [row]
    with pytest.raises(UserError, match="backbone"):
        make_row(metrics={}, protocol={}, run={"method": "simclr", "data": "digits"})


def test_an_unwritable_store_is_reported_as_such_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Not as lock contention after a 60 s wait, nor as "File exists" (issue 20)."""
    import time

    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    with pytest.raises(UserError, match=rf"could not append a result row to {a_file}/r\.jsonl: {a_file} is a file, not a directory"):
        append_row(a_file / "r.jsonl", {"i": 0})
    (tmp_path / "dir.jsonl").mkdir()
    with pytest.raises(UserError, match="it is a directory, not a file"):
        append_row(tmp_path / "dir.jsonl", {"i": 0})
    real_open = os.open

    def no_permission(path, flags, *args, **kwargs):  # a folder this user may not write in (root ignores chmod)
        if str(path).startswith(str(tmp_path / "ro")):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(path, flags, *args, **kwargs)

    (tmp_path / "ro").mkdir()
    monkeypatch.setattr(os, "open", no_permission)
    t0 = time.monotonic()
    with pytest.raises(UserError, match=r"could not append a result row to .*ro/r\.jsonl: Permission denied \(.*r\.jsonl\.lock\)"):
        append_row(tmp_path / "ro" / "r.jsonl", {"i": 0})
    assert time.monotonic() - t0 < 5
