"""Exact resume after SIGKILL at deterministic points, SIGTERM/SIGINT, corrupt checkpoints and
non-finite losses (issue 7). See docs/reliability.md.

Every scenario trains a narrow ResNet-18 at 16 px on a 64-image folder for 6 steps with a
checkpoint every 2 (``keep_checkpoints`` 2) and is compared, tensor for tensor, with an unbroken
run. The unbroken SimCLR run goes through ``python -m sslbench``; the others run the same CLI in
forked children (tests/_reliability.py), all at once, so the file stays fast on 2 cores.
"""

from __future__ import annotations

import json
import shutil
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from _reliability import TINY, assert_same_weights, child_env, fork_cli, lines, make_image_folder, run_subprocess

from sslbench.core.errors import UserError
from sslbench.train import checkpoint as ckpt

pytestmark = pytest.mark.slow

STEPS = 6


def _train_args(data: Path, method: str, out: Path, *extra: str) -> list[str]:
    args = [
        "train",
        "--method",
        method,
        "--data",
        f"imagefolder:{data}",
        "--steps",
        str(STEPS),
        *TINY,
        "--set",
        "deterministic=true",
        "--set",
        "checkpoint_every=2",
        "--set",
        "log_every=1",
        "--set",
        "quick_knn=false",
        "--output",
        str(out),
        *extra,
    ]
    if method == "moco":
        args += ["--set", "queue_size=64"]
    return args


def _names(run: Path) -> list[str]:
    d = run / "checkpoints"
    return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


# (name, method, environment for the first process, extra flags)
KILLS = {
    "step:3": ("simclr", {"SSLBENCH_TEST_KILL_AT": "step:3"}),  # between checkpoints 2 and 4
    "ckpt_write:4": ("simclr", {"SSLBENCH_TEST_KILL_AT": "ckpt_write:4"}),  # in the middle of writing checkpoint 4
    "step:5-moco": ("moco", {"SSLBENCH_TEST_KILL_AT": "step:5"}),  # queue + momentum encoder state
}


DEFERRED_NAN = {"SSLBENCH_TEST_NAN_AT": "3", "SSLBENCH_TEST_DEFERRED_NONFINITE": "1"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run every scenario (first processes all at once, then the resumes all at once) and record
    what each left behind; the tests below check the records."""
    root = tmp_path_factory.mktemp("resume")
    data = make_image_folder(root / "data")
    env = child_env(root / "cache")
    rec: dict[str, dict] = {}

    def first(name: str, method: str, hooks: dict[str, str], *extra: str):
        out = root / name.replace(":", "_")
        rec[name] = {"dir": out}
        return name, fork_cli(_train_args(data, method, out, *extra), {**env, **hooks})

    with ThreadPoolExecutor(1) as pool:
        # the unbroken SimCLR run through the real entry point, while the forks run
        ref = pool.submit(run_subprocess, _train_args(data, "simclr", root / "ref-simclr"), env)
        children = [first("ref-moco", "moco", {})]
        children += [first(name, method, hooks) for name, (method, hooks) in KILLS.items()]
        children += [
            first("corrupt", "simclr", {"SSLBENCH_TEST_KILL_AT": "step:5"}),
            first("sigterm", "simclr", {"SSLBENCH_TEST_SIGNAL_AT": "3"}),
            first("sigint", "simclr", {"SSLBENCH_TEST_SIGNAL_AT": "3:SIGINT"}),
            first("nan-stop", "simclr", {"SSLBENCH_TEST_NAN_AT": "3"}),
            first("nan-skip", "simclr", {"SSLBENCH_TEST_NAN_AT": "3"}, "--set", "nonfinite=skip"),
            # the GPU's way of checking (read at logging steps): a checkpoint due first must not save the NaN state
            first("nan-deferred", "simclr", DEFERRED_NAN, "--set", "log_every=5"),
            first(
                "nan-deferred-sigterm",
                "simclr",
                {**DEFERRED_NAN, "SSLBENCH_TEST_SIGNAL_AT": "4"},
                "--set",
                "log_every=5",
                "--set",
                "checkpoint_every=0",
            ),
        ]
        for name, child in children:
            rec[name]["first"] = child.wait()
            rec[name]["after_first"] = _names(rec[name]["dir"])
            rec[name]["encoder_after_first"] = (rec[name]["dir"] / "encoder.safetensors").exists()
        rec["ref-simclr"] = {"dir": root / "ref-simclr", "first": ref.result()}

    # break the newest checkpoint of "corrupt": truncate its model file
    model_file = rec["corrupt"]["dir"] / "checkpoints" / "step-00000004" / "model.safetensors"
    if model_file.is_file():
        with open(model_file, "r+b") as f:
            f.truncate(model_file.stat().st_size // 2)
    sig_ckpt = rec["sigterm"]["dir"] / "checkpoints" / "step-00000003"
    rec["sigterm"]["ckpt_problem"] = ckpt.verify(sig_ckpt) if sig_ckpt.is_dir() else "missing"

    resumes = [(name, fork_cli(["train", "--output", str(rec[name]["dir"]), "--resume", "--quiet"], env)) for name in (*KILLS, "corrupt", "sigterm")]
    for name, child in resumes:
        rec[name]["resume"] = child.wait()
        rec[name]["after_resume"] = _names(rec[name]["dir"])
    return rec


def _ok(result) -> None:
    assert result.returncode == 0, result.describe()
    assert "Traceback" not in result.stderr, result.describe()


def _metric_steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_unbroken_runs_keep_the_last_k_checkpoints(runs):
    for name in ("ref-simclr", "ref-moco"):
        _ok(runs[name]["first"])
        run = runs[name]["dir"]
        assert _names(run) == ["step-00000004", "step-00000006"]  # keep_checkpoints=2, 2 was pruned
        for c in ckpt.list_checkpoints(run / "checkpoints"):
            assert ckpt.verify(c) is None
            assert {"model.safetensors", "optimizer.bin", "random_states_0.pkl", "meta.json", "manifest.json"} <= {p.name for p in c.iterdir()}
        assert ckpt.read_meta(run / "checkpoints" / "step-00000006")["step"] == 6
        assert _metric_steps(run) == list(range(1, STEPS + 1))
        assert (run / "results.json").is_file()


@pytest.mark.parametrize("point", list(KILLS))
def test_sigkill_then_resume_gives_the_unbroken_weights(runs, point):
    rec = runs[point]
    method = KILLS[point][0]
    assert rec["first"].returncode == -signal.SIGKILL, rec["first"].describe()
    expected_first = {
        "step:3": ["step-00000002"],
        "ckpt_write:4": [".tmp-step-00000004", "step-00000002"],  # the half-written one is only a temporary dir
        "step:5-moco": ["step-00000002", "step-00000004"],
    }[point]
    assert rec["after_first"] == expected_first
    _ok(rec["resume"])
    start = 4 if point == "step:5-moco" else 2
    assert f"from step {start}" in rec["resume"].stderr
    assert_same_weights(rec["dir"], runs[f"ref-{method}"]["dir"])
    assert rec["after_resume"] == ["step-00000004", "step-00000006"]  # stale temporary dirs are gone
    assert _metric_steps(rec["dir"]) == list(range(1, STEPS + 1))  # each step logged once


def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one(runs):
    rec = runs["corrupt"]
    assert rec["first"].returncode == -signal.SIGKILL and rec["after_first"] == ["step-00000002", "step-00000004"]
    _ok(rec["resume"])
    warning = [line for line in lines(rec["resume"].stderr) if "warning" in line]
    assert len(warning) == 1 and "step-00000004" in warning[0] and "truncated" in warning[0], rec["resume"].describe()
    assert "from step 2" in rec["resume"].stderr
    assert_same_weights(rec["dir"], runs["ref-simclr"]["dir"])


def test_sigterm_saves_a_checkpoint_and_resume_completes_exactly(runs):
    rec = runs["sigterm"]
    first = rec["first"]
    assert first.returncode == 128 + signal.SIGTERM, first.describe()
    assert "Traceback" not in first.stderr
    msg = [line for line in lines(first.stderr) if line.startswith("SIGTERM")]
    assert len(msg) == 1 and "saved checkpoint at step 3" in msg[0], first.describe()
    assert f"sslbench train --output {rec['dir']} --resume" in msg[0]
    assert rec["after_first"] == ["step-00000002", "step-00000003"] and rec["ckpt_problem"] is None
    assert not rec["encoder_after_first"]  # stopped early: no final artefacts
    _ok(rec["resume"])
    assert "from step 3" in rec["resume"].stderr
    assert_same_weights(rec["dir"], runs["ref-simclr"]["dir"])


def test_sigint_stops_the_same_way_with_exit_code_130(runs):
    first = runs["sigint"]["first"]
    assert first.returncode == 128 + signal.SIGINT, first.describe()
    assert any(line.startswith("SIGINT: saved checkpoint at step 3") for line in lines(first.stderr)), first.describe()
    assert runs["sigint"]["after_first"] == ["step-00000002", "step-00000003"]


def test_nan_loss_stops_with_one_line_naming_step_and_checkpoint(runs):
    rec = runs["nan-stop"]
    r = rec["first"]
    assert r.returncode == 2, r.describe()
    err = lines(r.stderr)
    assert len(err) == 1, r.describe()
    assert "non-finite loss" in err[0] and "at step 3" in err[0]
    assert str(rec["dir"] / "checkpoints" / "step-00000002") in err[0]
    assert rec["after_first"] == ["step-00000002"]


@pytest.mark.parametrize("name", ["nan-deferred", "nan-deferred-sigterm"])
def test_a_nan_found_only_at_logging_steps_is_never_saved_as_a_checkpoint(runs, name):
    """On a GPU the NaN flag of step 3 is read at logging steps (here 5). The checkpoint due at
    step 4 (or the one a SIGTERM after step 4 asks for) would hold NaN weights and be named "the
    last good checkpoint" (seen before the fix: 112 of 134 tensors NaN): the flag is read before
    every save, so the run stops at step 4 with the error naming step 3 and the checkpoint of step 2."""
    rec = runs[name]
    r = rec["first"]
    assert r.returncode == 2, r.describe()
    err = lines(r.stderr)
    assert len(err) == 1 and "non-finite loss" in err[0] and "at step 3" in err[0], r.describe()
    if name == "nan-deferred":
        assert str(rec["dir"] / "checkpoints" / "step-00000002") in err[0]
        assert rec["after_first"] == ["step-00000002"]
    else:
        assert "no checkpoint was saved yet" in err[0] and rec["after_first"] == []


def test_nan_loss_skipped_with_nonfinite_skip(runs):
    rec = runs["nan-skip"]
    _ok(rec["first"])
    assert any("non-finite loss at step 3; skipped (1/10)" in line for line in lines(rec["first"].stderr)), rec["first"].describe()
    assert ckpt.read_meta(rec["dir"] / "checkpoints" / "step-00000006")["skipped"] == 1
    assert 3 not in _metric_steps(rec["dir"]) and (rec["dir"] / "encoder.safetensors").is_file()


# ---------------------------------------------------------------------------------------------
# checkpoint.py on its own (no training)


def _fake_checkpoint(d: Path, step: int) -> Path:
    c = d / f"step-{step:08d}"
    c.mkdir(parents=True)
    (c / "model.safetensors").write_bytes(bytes(range(256)) * 8)
    (c / "meta.json").write_text(json.dumps({"step": step}))
    ckpt.write_manifest(c)
    return c


def test_manifest_detects_truncation_and_bit_flips(tmp_path, capsys):
    d = tmp_path / "checkpoints"
    old, new = _fake_checkpoint(d, 2), _fake_checkpoint(d, 4)
    (d / ".tmp-step-00000006").mkdir()
    (d / "step-notanumber").mkdir()
    assert ckpt.list_checkpoints(d) == [new, old]
    assert ckpt.verify(new) is None and ckpt.latest_valid(d) == new
    data = bytearray((new / "model.safetensors").read_bytes())
    data[100] ^= 1
    (new / "model.safetensors").write_bytes(bytes(data))
    assert "checksum" in ckpt.verify(new)
    assert ckpt.latest_valid(d) == old
    assert "step-00000004 is unusable" in capsys.readouterr().err
    (new / "model.safetensors").write_bytes(bytes(data[:10]))
    assert "truncated" in ckpt.verify(new)
    (old / "manifest.json").unlink()
    assert ckpt.latest_valid(d, warn=False) is None


class _FakeAccelerator:
    is_main_process = True
    process_index = 0

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail

    def wait_for_everyone(self) -> None:
        pass

    def save_state(self, path: str) -> None:
        Path(path).mkdir(parents=True)
        (Path(path) / "model.safetensors").write_bytes(b"x" * 100)
        if self.fail:
            raise OSError(28, "No space left on device", str(Path(path) / "optimizer.bin"))


def test_checkpoint_save_is_atomic_and_a_full_disk_keeps_the_old_ones(tmp_path):
    d = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        ckpt.save(_FakeAccelerator(), d, step, keep=2, meta={"step": step})
    assert [p.name for p in ckpt.list_checkpoints(d)] == ["step-00000006", "step-00000004"]
    ckpt.save(_FakeAccelerator(), d, 6, keep=2, meta={"step": 6, "again": True})  # re-saving a step replaces it
    assert ckpt.read_meta(d / "step-00000006") == {"step": 6, "again": True}
    with pytest.raises(UserError, match="No space left on device.*the last good checkpoint is step-00000006.*--resume"):
        ckpt.save(_FakeAccelerator(fail=True), d, 8, keep=2, meta={"step": 8})
    assert sorted(p.name for p in d.iterdir()) == ["step-00000004", "step-00000006"]
    assert all(ckpt.verify(p) is None for p in ckpt.list_checkpoints(d))
    shutil.rmtree(d)


def test_model_check_accepts_ddp_prefix_and_names_mismatches(tmp_path):
    from safetensors.torch import save_file
    from torch import nn

    class Step(nn.Module):
        def __init__(self, width: int) -> None:
            super().__init__()
            self.method = nn.Sequential(nn.Conv2d(3, width, 3), nn.BatchNorm2d(width))

    class DDPLike(nn.Module):  # what DistributedDataParallel's state_dict looks like: "module." + key
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.module = inner

    c = tmp_path / "step-00000002"
    c.mkdir()
    save_file({k: v.contiguous() for k, v in Step(8).state_dict().items()}, str(c / "model.safetensors"))
    ckpt._check_model_file(c, Step(8))
    ckpt._check_model_file(c, DDPLike(Step(8)))
    with pytest.raises(
        UserError, match=r"different model \(6 shape mismatches, e\.g\. method\.0\.bias: \(8,\) in the checkpoint vs \(16,\) in the model"
    ):
        ckpt._check_model_file(c, Step(16))
    with pytest.raises(UserError, match="unexpected keys"):
        ckpt._check_model_file(c, nn.Module())
