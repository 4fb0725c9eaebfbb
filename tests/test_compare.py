"""`sslbench compare`: same data, backbone, budget and seeds for every method; budgets in epochs,
steps, images or wall-clock time."""

import json
import math
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from sslbench.commands.cli import main
from sslbench.commands.compare import plan_compare
from sslbench.commands.evaluate import format_duration, parse_duration
from sslbench.config import build_config
from sslbench.core.errors import UserError
from sslbench.results import RUN_FIELDS, read_rows
from sslbench.train.callbacks import Callback
from sslbench.train.run_setup import UNBOUNDED_STEPS, make_plan
from sslbench.train.trainer import train

TINY = "backbone_kwargs.channels=8,16,32,64"
FILLED = (
    "method",
    "backbone",
    "data",
    "image_size",
    "epochs",
    "steps",
    "images_seen",
    "batch_size",
    "budget_kind",
    "budget",
    "wall_time_s",
    "images_per_s",
    "precision",
    "seed",
    "run_dir",
    "command",
    "hardware",
)


@pytest.fixture(autouse=True)
def _env(monkeypatch, tmp_path):
    monkeypatch.setenv("SSLBENCH_CACHE", str(tmp_path / "cache"))
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: far faster on one thread on a busy 2-core machine
    yield
    torch.set_num_threads(n)


def _error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sslbench: error: "), err
    return err[0]


def test_compare_cli_end_to_end(tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = [
        "compare",
        "--methods",
        "simclr,byol",
        "--backbone",
        "resnet18",
        "--data",
        "digits",
        "--steps",
        "3",
        "--batch-size",
        "32",
        "--set",
        TINY,
        "--set",
        "train_subset=64",
        "--protocol",
        "knn",
        "--output",
        str(out),
        "--quiet",
    ]
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    rows = read_rows(out / "results.jsonl")
    assert sorted(r["method"] for r in rows) == ["byol", "simclr"]
    for row in rows:
        assert all(row.get(k) is not None for k in FILLED), [k for k in FILLED if row.get(k) is None]
        assert set(RUN_FIELDS) <= set(row) and {"torch", "timm", "sslbench", "git_commit", "cpu"} <= set(row["env"])
        assert (row["backbone"], row["data"], row["image_size"], row["seed"]) == ("resnet18", "digits", 16, 0)
        assert (row["budget_kind"], row["budget"], row["steps"], row["batch_size"], row["images_seen"]) == ("steps", 3, 3, 32, 96)
        assert row["epochs"] == 1.5 and row["backbone_kwargs"] == {"channels": [8, 16, 32, 64]}
        assert row["command"] == "sslbench " + " ".join(argv)
        assert set(row["metrics"]) == {"knn_top1", "knn_top5"} and row["protocol"]["name"] == "knn"
        run = Path(row["run_dir"])
        assert run.parent == out.resolve() and (run / "encoder.safetensors").is_file()
        assert json.loads((run / "budget.json").read_text()) == {"kind": "steps", "value": 3}
    board = (out / "leaderboard.md").read_text()
    assert board in stdout
    assert "### digits / resnet18 / steps=3 / 16px" in board
    assert "| byol " in board and "| simclr " in board and "knn_top1" in board


def test_compare_unknown_method_fails_before_training(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", "--methods", "simclr,simclrr", "--steps", "1", "--output", str(out)]) == 2
    assert "unknown method 'simclrr' (did you mean 'simclr'" in _error_line(capsys)
    assert main(["compare", "--methods", "simclr", "--backbone", "resnet181", "--steps", "1", "--output", str(out)]) == 2
    assert "unknown backbone 'resnet181'" in _error_line(capsys)
    assert not out.exists()


def test_compare_that_would_fine_tune_data_read_from_disk_fails_before_training(tmp_path, capsys):
    """It trained the first method completely and then failed at its evaluation."""
    from _reliability import make_image_folder

    data = make_image_folder(tmp_path / "data", classes=2, train=4, test=2)
    out = tmp_path / "cmp"
    argv = [
        "compare",
        "--methods",
        "simclr,byol",
        "--steps",
        "1",
        "--output",
        str(out),
        "--set",
        TINY,
        "--data",
        f"imagefolder:{data}",
        "--set",
        "max_memory_gb=0",
        "--protocol",
        "knn,finetune",
    ]
    assert main(argv) == 2
    err = _error_line(capsys)
    assert "train does not fit in memory (max_memory_gb=0); finetune needs in-memory splits" in err, err
    assert not out.exists()


@pytest.mark.parametrize(
    "budget, message",
    [
        ([], "one of the arguments --epochs --steps --images --time-budget --device-hours is required"),
        (["--steps", "2", "--epochs", "1"], "not allowed with argument"),
        (["--time-budget", "ten minutes"], "cannot read the duration"),
        (["--images", "0"], "--images must be >= 1"),
    ],
)
def test_compare_budget_errors(tmp_path, capsys, budget, message):
    assert main(["compare", "--methods", "simclr", "--output", str(tmp_path / "cmp"), *budget]) == 2
    assert message in _error_line(capsys)


def test_durations():
    assert [parse_duration(t) for t in ("10m", "90s", "1.5h", "1h30m", "600", " 2 min ")] == [600, 90, 5400, 5400, 600, 120]
    assert [format_duration(s) for s in (600, 3600, 90, 2.5, 5400)] == ["10m", "1h", "90s", "2.5s", "90m"]
    for bad in ("", "0s", "m", "10 parsecs", "1h x"):
        with pytest.raises(UserError):
            parse_duration(bad)


def test_plans_share_data_backbone_and_budget(tmp_path):
    flags = {"backbone": "resnet18", "data": "digits", "batch_size": 32}
    plans = plan_compare(
        ["simclr", "moco", "byol", "simsiam"], [0, 1], ("images", 100), out_dir=tmp_path, flags=flags, sets=[TINY, "train_subset=64"]
    )
    assert [(m, s) for m, s, _ in plans] == [(m, s) for m in ("simclr", "moco", "byol", "simsiam") for s in (0, 1)]
    for method, seed, cfg in plans:
        assert (cfg.method, cfg.seed, cfg.backbone, cfg.data) == (method, seed, "resnet18", "digits")
        assert cfg.steps == math.ceil(100 / 32) and cfg.epochs is None and cfg.time_budget_s is None
        assert cfg.output == str(tmp_path / f"{method}-seed{seed}")
    # a batch larger than the (subset) training set is clipped by the trainer; the images budget follows
    ((_, _, cfg),) = plan_compare(
        ["simclr"], [0], ("images", 100), out_dir=tmp_path, flags={**flags, "batch_size": 256}, sets=[TINY, "train_subset=64"]
    )
    assert cfg.steps == math.ceil(100 / 64)
    ((_, _, cfg),) = plan_compare(["byol"], [0], ("time", "10m"), out_dir=tmp_path, flags=flags, sets=[TINY])
    assert cfg.time_budget_s == 600 and cfg.steps is None and cfg.epochs is None
    ((_, _, cfg),) = plan_compare(["byol"], [0], ("epochs", 2), out_dir=tmp_path, flags=flags, file_values={"steps": 50}, sets=[TINY])
    assert cfg.epochs == 2 and cfg.steps is None  # the comparison's budget replaces the file's


def test_time_budget_schedule():
    cfg = build_config(flags={"method": "simclr", "batch_size": 32}, sets=["time_budget_s=60"])
    sched = make_plan(cfg, 64, 1, 2)
    assert sched.total_steps == UNBOUNDED_STEPS and sched.warmup_steps == sched.steps_per_epoch == 2
    capped = build_config(flags={"method": "simclr", "batch_size": 32, "steps": 7}, sets=["time_budget_s=60"])
    assert make_plan(capped, 64, 1, 2).total_steps == 7  # steps and a time budget: whichever ends first
    with pytest.raises(UserError, match="time_budget_s must be > 0"):
        build_config(sets=["time_budget_s=0"])


def test_time_budget_stops_after_the_step_that_crosses_it(tmp_path):
    cfg = build_config(
        flags={"method": "simclr", "batch_size": 32, "train_subset": 64, "output": str(tmp_path / "run")},
        sets=[TINY, "time_budget_s=0.001"] + (["quick_knn=false"] if hasattr(build_config(), "quick_knn") else []),
    )
    result = train(cfg, quiet=True)
    assert (result.steps, result.epochs, result.images_seen) == (1, 0.5, 32) and not result.stopped_early
    summary = json.loads((tmp_path / "run" / "results.json").read_text())
    assert (summary["steps"], summary["epochs"]) == (1, 0.5)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 1
    assert (tmp_path / "run" / "encoder.safetensors").is_file()
    # Resuming the finished run (as after a full disk) only rewrites its final files: its budget
    # is spent. Before, it trained a whole second budget (25 steps became 64).
    again = train(cfg, resume=True, quiet=True)
    assert (again.steps, again.images_seen) == (1, 32)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-00000001"]
    assert json.loads((tmp_path / "run" / "results.json").read_text())["steps"] == 1


class _SlowThenStopped(Callback):
    """Each step takes at least ``seconds`` of wall time (a slow machine); a SIGTERM arrives
    during step ``stop_at`` (the run checkpoints and stops after it)."""

    def __init__(self, seconds: float, stop_at: int) -> None:
        self.seconds, self.stop_at = seconds, stop_at

    def on_step_end(self, run: Any, batch: Any, control: Any) -> None:
        time.sleep(self.seconds)
        if control.done == self.stop_at:
            control.stop_signal = signal.SIGTERM


def test_a_resumed_run_continues_its_time_budget_and_records_device_hours(tmp_path):
    """The training time of earlier sessions counts towards a resumed run's time budget (the
    checkpoint's ``train_time_s``), and ``results.json`` records processes x the total training
    time as ``device_hours``. Before, a resumed run got a fresh budget."""
    flags = {"method": "simclr", "batch_size": 32, "train_subset": 64, "output": str(tmp_path / "run")}
    first = train(build_config(flags={**flags, "steps": 6}, sets=[TINY, "quick_knn=false"]), quiet=True, callbacks=[_SlowThenStopped(0.4, stop_at=2)])
    assert first.stopped_early and first.steps == 2 and first.train_time_s >= 0.8
    # The first session spent 0.8 s of the 0.5 s budget: the resumed run stops after its first step
    # (a fresh budget would let 4 fast steps reach step 6).
    cfg = build_config(flags={**flags, "steps": 6}, sets=[TINY, "quick_knn=false", "time_budget_s=0.5"])
    again = train(cfg, resume=True, quiet=True)
    assert again.steps == 3
    # the first session's time up to its checkpoint (at least its two slow steps) plus this session's
    assert again.wall_time_s + 0.8 <= again.train_time_s <= first.train_time_s + again.wall_time_s + 0.01
    summary = json.loads((tmp_path / "run" / "results.json").read_text())
    assert summary["train_time_s"] == again.train_time_s and summary["processes"] == 1
    assert summary["device_hours"] == round(again.train_time_s / 3600, 6) > 0


def test_compare_with_a_device_hours_budget(tmp_path):
    (plan,) = plan_compare(["simclr"], [0], ("device_hours", 0.25), out_dir=tmp_path, flags={"batch_size": 32})
    cfg = plan[2]
    assert cfg.time_budget_s == 900 and cfg.steps is None and cfg.epochs is None


def test_compare_with_a_time_budget_shows_the_epochs_reached(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert (
        main(
            [
                "compare",
                "--methods",
                "simsiam",
                "--time-budget",
                "1s",
                "--batch-size",
                "32",
                "--set",
                TINY,
                "--set",
                "train_subset=64",
                "--protocol",
                "knn",
                "--output",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    (row,) = read_rows(out / "results.jsonl")
    assert (row["budget_kind"], row["budget"]) == ("time", "1s")
    assert row["steps"] >= 1 and row["epochs"] == row["steps"] / 2 and row["wall_time_s"] >= 1.0
    board = (out / "leaderboard.md").read_text()
    assert "### digits / resnet18 / time=1s / 16px" in board
    header, _, simsiam = board.splitlines()[2:5]
    cells = [c.strip() for c in simsiam.strip("|").split("|")]
    columns = [c.strip() for c in header.strip("|").split("|")]
    assert cells[0] == "simsiam" and float(cells[columns.index("epochs")]) == pytest.approx(row["epochs"], abs=0.05)


def test_rerunning_a_comparison_reuses_stored_rows_and_scores_only_what_is_missing(tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = [
        "compare",
        "--methods",
        "simclr",
        "--steps",
        "2",
        "--batch-size",
        "16",
        "--set",
        TINY,
        "--set",
        "train_subset=32",
        "--output",
        str(out),
        "--quiet",
        "--linear-epochs",
        "2",
    ]
    assert main([*argv, "--protocol", "knn"]) == 0
    assert f"1 row appended to {out / 'results.jsonl'}" in capsys.readouterr().err
    first = read_rows(out / "results.jsonl")
    assert [r["protocol"]["name"] for r in first] == ["knn"]
    encoder = (out / "simclr-seed0" / "encoder.safetensors").read_bytes()
    capsys.readouterr()

    assert main([*argv, "--protocol", "knn"]) == 0  # the same command again: nothing trained, scored or stored twice
    err = capsys.readouterr().err
    assert "reusing its stored rows" in err and read_rows(out / "results.jsonl") == first
    assert f"no rows appended to {out / 'results.jsonl'}" in err and " rows appended" not in err.replace("no rows appended", "")  # (issue 34)
    assert (out / "simclr-seed0" / "encoder.safetensors").read_bytes() == encoder

    assert main([*argv, "--protocol", "knn,linear"]) == 0  # only the linear probe is new
    rows = read_rows(out / "results.jsonl")
    assert [r["protocol"]["name"] for r in rows] == ["knn", "linear"] and rows[0] == first[0]
    assert "linear_top1" in (out / "leaderboard.md").read_text()

    capsys.readouterr()
    assert main([*argv, "--protocol", "knn", "--set", "knn_k=5"]) == 2  # another config: never overwrites the run
    assert "holds a run with another config" in _error_line(capsys)
    assert read_rows(out / "results.jsonl") == rows


def test_a_comparison_continues_whatever_its_output_is_spelled_and_a_signal_exits_143(tmp_path, monkeypatch, capsys):
    """Re-running with --output as an absolute path (or from another directory) was refused as
    "another config" (config.yaml records output). A comparison pre-empted by SIGTERM exited 2
    with the train command's resume hint; it exits 143 and names its own command."""
    from _reliability import child_env, run_forked

    monkeypatch.chdir(tmp_path)
    argv = [
        "compare",
        "--methods",
        "simclr",
        "--steps",
        "3",
        "--batch-size",
        "32",
        "--quiet",
        "--protocol",
        "knn",
        "--set",
        TINY,
        "--set",
        "train_subset=64",
        "--set",
        "checkpoint_every=1",
    ]
    env = child_env(tmp_path / "cache", SSLBENCH_TEST_SIGNAL_AT="2")
    r = run_forked([*argv, "--output", "cmp"], env)
    assert r.returncode == 143, r.describe()
    assert "resume with: sslbench compare" in r.stderr and "sslbench train --output" not in r.stderr, r.describe()
    assert main([*argv, "--output", str(tmp_path / "cmp")]) == 0  # the absolute spelling continues it
    err = capsys.readouterr().err
    assert "resuming simclr seed 0" in err and "from step 2" in err, err
    assert [r["seed"] for r in read_rows(tmp_path / "cmp" / "results.jsonl")] == [0]
