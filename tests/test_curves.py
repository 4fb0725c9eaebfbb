"""Training curves: ``write_curves(run_dir)`` after a run, and ``sslbench plot`` of two runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from sslbench.commands.cli import main
from sslbench.commands.curves import CURVES_FILE, CURVES_SIZE, read_metrics, write_curves

TINY = [
    "--steps",
    "4",
    "--batch-size",
    "16",
    "--train-subset",
    "32",
    "--image-size",
    "16",
    "--precision",
    "no",
    "--quiet",
    "--set",
    "backbone_kwargs.channels=8,16,32,64",
    "--set",
    "log_every=1",
    "--set",
    "online_probe=true",
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> list[Path]:
    """Two 4-step runs (SimCLR and BYOL) on 32 digits, with the online probe (evaluated each 2-step epoch)."""
    root = tmp_path_factory.mktemp("curves")
    mp = pytest.MonkeyPatch()
    mp.setenv("SSLBENCH_CACHE", str(root / "cache"))
    out = []
    for method in ("simclr", "byol"):
        run = root / method
        assert main(["train", "--method", method, "--output", str(run), *TINY]) == 0
        out.append(run)
    mp.undo()
    return out


def _png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as img:
        assert img.format == "PNG"
        return img.size


def test_write_curves_after_a_run(runs) -> None:
    run = runs[0]
    (run / CURVES_FILE).unlink(missing_ok=True)  # whatever the trainer wrote: this checks the function itself
    records = read_metrics(run)
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in records if "online_probe_top1" in r] == [2, 4]
    path = write_curves(run)
    assert path == run / CURVES_FILE and _png_size(path) == CURVES_SIZE == (1000, 750)


def test_plot_overlays_two_runs(runs, tmp_path, monkeypatch, capsys) -> None:
    out = tmp_path / "both.png"
    assert main(["plot", *map(str, runs), "--output", str(out)]) == 0
    assert _png_size(out) == CURVES_SIZE and str(out) in capsys.readouterr().out
    monkeypatch.chdir(tmp_path)  # default output: ./curves.png for several runs, RUN/curves.png for one
    assert main(["plot", *map(str, runs)]) == 0 and _png_size(tmp_path / CURVES_FILE) == CURVES_SIZE
    assert main(["plot", str(runs[1])]) == 0 and _png_size(runs[1] / CURVES_FILE) == CURVES_SIZE


def test_partial_and_odd_metrics(tmp_path) -> None:
    """No probe, a NaN loss, a record without a step and a torn last line (a killed run) still plot."""
    run = tmp_path / "run"
    run.mkdir()
    lines = [json.dumps({"step": s, "loss": float("nan") if s == 2 else 5.0 - s, "lr": 0.1, "images_per_s": 100.0}) for s in (1, 2, 3)]
    (run / "metrics.jsonl").write_text("\n".join([*lines, json.dumps({"loss": 1.0}), '{"step": 4, "lo']))
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3]
    assert _png_size(write_curves(run)) == CURVES_SIZE


@pytest.mark.parametrize(
    "argv,phrase",
    [
        (["plot", "{tmp}/missing"], "does not exist"),
        (["plot", "{tmp}/empty"], "metrics.jsonl not found"),
        (["plot", "{run}", "--output", "{tmp}/curves.xyz"], "unknown image type .xyz"),
    ],
)
def test_plot_errors_are_one_line(runs, tmp_path, capsys, argv, phrase) -> None:
    (tmp_path / "empty").mkdir()
    argv = [a.format(tmp=tmp_path, run=runs[0]) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and phrase in err[0], err
