"""Experiment tracking (--log-with): what TensorBoard records equals metrics.jsonl; the final
k-NN and the EMA momentum are logged too; a wrong or missing tracker is one line and exit 2."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from _reliability import TINY, child_env, fork_cli, make_image_folder

pytest.importorskip("tensorboard", reason="the TensorBoard test needs the tensorboard package (pip install 'sslbench[tensorboard]')")


def _scalars(logdir: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, dict[int, float]] = {}
    for events in logdir.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    return out


@pytest.mark.slow
def test_tensorboard_events_equal_the_metrics_file(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "data")
    env = child_env(tmp_path / "cache")
    out = tmp_path / "run"
    args = [
        "train",
        "--method",
        "byol",
        "--data",
        f"imagefolder:{data}",
        "--steps",
        "6",
        *TINY,
        "--set",
        "log_every=2",
        "--log-with",
        "tensorboard",
        "--output",
        str(out),
    ]
    r = fork_cli(args, env).wait()
    assert r.returncode == 0, r.describe()
    scalars = _scalars(out / "trackers")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [rec["step"] for rec in records] == [2, 4, 6]
    for rec in records:
        for key in ("loss", "lr", "images_per_s"):
            assert scalars[key][rec["step"]] == pytest.approx(rec[key], rel=1e-6), (key, rec["step"])
    assert set(scalars["momentum"]) == {2, 4, 6} and all(0.99 <= m <= 1.0 for m in scalars["momentum"].values())
    knn = json.loads((out / "results.json").read_text())["metrics"]["knn_top1"]
    assert scalars["eval/knn_top1"] == {6: pytest.approx(knn, rel=1e-6)}
    hparams = next((out / "trackers").rglob("hparams.yml")).read_text()
    assert "method: byol" in hparams and "batch_size: 16" in hparams


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="W&B is not installed (pip install 'sslbench[wandb]')")
@pytest.mark.slow
def test_wandb_logs_offline_into_the_run_directory(tmp_path: Path) -> None:
    env = child_env(tmp_path / "cache")
    out = tmp_path / "run"
    r = fork_cli(["train", "--steps", "2", *TINY, "--log-with", "wandb", "--output", str(out), "--set", "quick_knn=false"], env).wait()
    assert r.returncode == 0, r.describe()
    assert list((out / "trackers").rglob("*.wandb")), "no offline W&B run in the run directory"


@pytest.mark.parametrize(
    ("spec", "message"),
    [("tensorbord", "unknown tracker 'tensorbord' in log_with (did you mean 'tensorboard'?)"), ("tensorboard,nope", "unknown tracker 'nope'")],
)
def test_a_wrong_tracker_is_one_line_and_exit_2(tmp_path: Path, spec: str, message: str) -> None:
    r = fork_cli(["train", "--steps", "1", *TINY, "--log-with", spec, "--output", str(tmp_path / "run")], child_env(tmp_path / "c")).wait()
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and message in lines[0], r.describe()
    assert not (tmp_path / "run").exists()  # refused before any work


def test_a_tracker_that_is_not_installed_names_its_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from sslbench.core.errors import UserError
    from sslbench.train import tracking

    monkeypatch.setattr(tracking, "_installed", lambda name: name != "aim")
    with pytest.raises(UserError, match=r'log_with=aim: the aim package is not installed; pip install "sslbench\[aim\]"'):
        tracking.parse_trackers("tensorboard,aim")
    assert tracking.parse_trackers("all") == ["tensorboard", "wandb", "mlflow", "comet_ml"]
    assert tracking.parse_trackers(None) == [] and tracking.parse_trackers("tensorboard, tensorboard") == ["tensorboard"]
