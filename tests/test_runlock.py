"""One writer per run directory (issue 20): a second train, resume or comparison on a run
directory in use is one line naming the holder; eval of a run still training says so; the lock
dies with its holder; two concurrent `train` runs on one --output leave one consistent run.

CLI processes are forked children (tests/_reliability.py). ``SSLBENCH_TEST_GATE`` (tests/_faults.py)
holds a run after its setup, with its directory locked, until the test opens the gate.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from pathlib import Path

import pytest
import yaml
from _faults import GATE
from _reliability import TINY, child_env, fork_cli, lines, make_image_folder, run_forked

from sslbench.core.errors import UserError
from sslbench.core.runlock import RunLock, lock_holder, set_command
from sslbench.train import checkpoint as ckpt


def test_a_lock_names_its_holder_and_a_second_one_is_refused(tmp_path):
    run = tmp_path / "run"
    set_command(["train", "--output", str(run)])
    lock = RunLock(run).acquire()
    assert run.is_dir() and (run / "run.lock").is_file()
    holder = lock_holder(run)
    assert holder is not None and holder.pid == os.getpid() and holder.host == socket.gethostname()
    assert holder.command == f"sslbench train --output {run}" and abs(holder.since - time.time()) < 60
    with pytest.raises(UserError) as err:
        RunLock(run).acquire()
    msg = str(err.value)
    assert "\n" not in msg and f"{run} is in use by pid {os.getpid()} on {socket.gethostname()} since " in msg
    assert f"running `sslbench train --output {run}`" in msg and "pass another --output" in msg
    lock.release()
    assert lock_holder(run) is None and not run.exists()  # the lock made the folder: an empty one goes with it
    with RunLock(run) as again:
        assert again.held and lock_holder(run) is not None
        (run / "config.yaml").write_text("x")
    assert run.is_dir() and sorted(p.name for p in run.iterdir()) == ["config.yaml"]  # lock file removed, run kept


def test_a_holder_that_lets_go_within_the_wait_is_no_conflict(tmp_path):
    """A brief holder (eval's probe takes the lock shared for an instant) does not refuse a train."""
    first = RunLock(tmp_path).acquire()
    threading.Timer(0.3, first.release).start()
    second = RunLock(tmp_path).acquire()
    assert second.held
    second.release()


def test_the_lock_dies_with_its_holder(tmp_path):
    run = tmp_path / "run"
    pid = os.fork()
    if pid == 0:  # the child takes the lock and is killed holding it
        try:
            RunLock(run).acquire()
            os.kill(os.getpid(), signal.SIGKILL)
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert (run / "run.lock").is_file()  # left behind, but nobody holds it
    assert lock_holder(run) is None
    lock = RunLock(run).acquire()  # at once, no clean-up by hand
    assert lock_holder(run).pid == os.getpid()
    lock.release()


def test_a_forked_child_of_a_killed_holder_does_not_keep_the_lock(tmp_path):
    """A DataLoader worker is a fork of the trainer and inherits its lock descriptor; after a
    SIGKILL of the trainer the worker lives on for seconds. The child drops the inherited descriptor
    at the fork (without unlocking the parent's lock), so the directory is free as soon as its holder
    is dead (a resume started at once on a sharded run was refused as "in use" by the dead pid)."""
    run = tmp_path / "run"
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the holder: takes the lock, forks a long-lived "worker", is killed
        try:
            os.close(r)
            lock = RunLock(run).acquire()
            worker = os.fork()
            if worker == 0:
                time.sleep(60)
                os._exit(0)
            os.write(w, f"{worker}\n".encode())
            assert lock.held and lock_holder(run) is not None  # still the holder's while it lives (the worker did not unlock it)
            os.kill(os.getpid(), signal.SIGKILL)
        finally:
            os._exit(1)
    os.close(w)
    worker = int(os.read(r, 64).decode())
    os.close(r)
    try:
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        os.kill(worker, 0)  # the worker is alive
        assert lock_holder(run) is None
        RunLock(run).acquire().release()
    finally:
        os.kill(worker, signal.SIGKILL)


# ---------------------------------------------------------------------------------------------
# The CLI


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    root = tmp_path_factory.mktemp("lock")
    return {"root": root, "env": child_env(root / "cache"), "data": make_image_folder(root / "data")}


def _train(setting, out: Path, *extra: str) -> list[str]:
    return ["train", "--data", f"imagefolder:{setting['data']}", *TINY, "--set", "log_every=1", "--output", str(out), *extra]


def _one_line(r, *phrases: str) -> str:
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.describe()
    err = lines(r.stderr)
    assert len(err) == 1 and err[0].startswith("sslbench: error: "), r.describe()
    for phrase in phrases:
        assert phrase in err[0], err[0]
    return err[0]


def _wait_for(path: Path, child, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear:\n{child.wait(1).describe()}")
        time.sleep(0.05)


def test_two_concurrent_trains_on_one_output_leave_one_consistent_run(setting):
    """Both start at once, with different methods: exactly one trains, the other exits 2 with one
    line; the directory holds one run (config, checkpoints, encoder, results and metrics agree)."""
    out = setting["root"] / "both"
    a = fork_cli(_train(setting, out, "--method", "simclr", "--steps", "6"), setting["env"])
    b = fork_cli(_train(setting, out, "--method", "byol", "--steps", "6"), setting["env"])
    ra, rb = a.wait(), b.wait()
    assert sorted([ra.returncode, rb.returncode]) == [0, 2], ra.describe() + rb.describe()
    winner, loser = (ra, rb) if ra.returncode == 0 else (rb, ra)
    error = _one_line(loser)
    assert "is in use by pid" in error or "already holds a run" in error, error  # (the loser started after the winner ended)
    method = winner.argv[winner.argv.index("--method") + 1]
    assert yaml.safe_load((out / "config.yaml").read_text())["method"] == method
    assert json.loads((out / "results.json").read_text())["method"] == method
    assert [ckpt.read_meta(p)["method"] for p in ckpt.list_checkpoints(out / "checkpoints")] == [method]
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5, 6]
    assert (out / "encoder.safetensors").is_file() and not (out / "run.lock").exists()


def test_a_run_in_training_refuses_train_resume_compare_and_eval(setting):
    out, gate = setting["root"] / "held", setting["root"] / "gate-held"
    first = fork_cli(_train(setting, out, "--steps", "2"), {**setting["env"], GATE: str(gate)})
    try:
        _wait_for(out / "config.yaml", first)  # set up, locked, waiting at the gate
        held = f"is in use by pid {first.pid} on {socket.gethostname()} since "
        _one_line(
            run_forked(_train(setting, out, "--steps", "2"), setting["env"]), held, f"running `sslbench train --data imagefolder:{setting['data']}"
        )
        _one_line(run_forked(["train", "--output", str(out), "--resume", "--quiet"], setting["env"]), held, "resume it once that process has stopped")
        _one_line(
            run_forked(
                [
                    "compare",
                    "--methods",
                    "simclr",
                    "--steps",
                    "1",
                    "--data",
                    f"imagefolder:{setting['data']}",
                    "--image-size",
                    "16",
                    "--output",
                    str(out),
                ],
                setting["env"],
            ),
            held,
        )
        _one_line(
            run_forked(["eval", str(out)], setting["env"]),
            f"{out} is still being trained by pid {first.pid}",
            "evaluate it once training has finished",
        )
    finally:
        gate.touch()
    r = first.wait()
    assert r.returncode == 0, r.describe()
    assert not (out / "run.lock").exists()
    r = run_forked(["eval", str(out), "--protocol", "knn"], setting["env"])
    assert r.returncode == 0, r.describe()


def test_a_killed_holder_blocks_nothing(setting):
    out, gate = setting["root"] / "killed", setting["root"] / "gate-never"
    first = fork_cli(_train(setting, out, "--steps", "2"), {**setting["env"], GATE: str(gate)})
    _wait_for(out / "config.yaml", first)
    os.kill(first.pid, signal.SIGKILL)
    assert first.wait().returncode == -signal.SIGKILL
    r = run_forked(["train", "--output", str(out), "--resume", "--quiet"], setting["env"])
    assert r.returncode == 0, r.describe()
    assert json.loads((out / "results.json").read_text())["steps"] == 2
