"""`sslbench eval` and `sslbench leaderboard` end to end from the CLI, on a tiny digits run."""

import dataclasses
import json
import shutil

import pytest
import torch
import yaml

from sslbench.backbones import ENCODER_FILE, create_backbone, save_encoder
from sslbench.commands.cli import main
from sslbench.config import TrainConfig
from sslbench.results import RUN_FIELDS, append_row, make_row, read_rows

TINY = "backbone_kwargs.channels=8,16,32,64"
ENV_KEYS = {"cpu", "cpu_count", "gpus", "platform", "python", "torch", "timm", "accelerate", "sslbench", "git_commit"}
# Run fields every eval row must fill (run_dir is a path; command is checked separately).
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


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run many times faster on one thread than on two on a busy 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, _one_thread):
    """A 4-step SimCLR run on 64 digits (2 steps per epoch) with the online probe on."""
    root = tmp_path_factory.mktemp("evalcli")
    mp = pytest.MonkeyPatch()
    mp.setenv("SSLBENCH_CACHE", str(root / "cache"))
    out = root / "runs" / "simclr-tiny"
    sets = ["--set", TINY, "--set", "online_probe=true"]
    if "quick_knn" in {f.name for f in dataclasses.fields(TrainConfig)}:
        sets += ["--set", "quick_knn=false"]  # eval computes the k-NN below
    rc = main(["train", "--method", "simclr", "--steps", "4", "--batch-size", "32", "--train-subset", "64", "--output", str(out), "--quiet", *sets])
    assert rc == 0
    yield out
    mp.undo()


def _error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("sslbench: error: ")
    return err[0]


def test_online_probe_logged_each_epoch(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    probe = [r for r in records if "online_probe_top1" in r]
    assert [(r["step"], r["epoch"]) for r in probe] == [(2, 1.0), (4, 2.0)]
    assert all(0.0 <= r["online_probe_top1"] <= 100.0 for r in probe)
    assert any("loss" in r for r in records)  # the SSL records are still there


def test_eval_writes_one_complete_row_per_protocol_and_fraction(run_dir, capsys):
    argv = [
        "eval",
        str(run_dir),
        "--protocol",
        "knn,linear,finetune",
        "--label-fractions",
        "0.01,0.02",
        "--finetune-epochs",
        "1",
        "--finetune-min-steps",
        "2",
        "--linear-epochs",
        "5",
    ]
    encoder_bytes = (run_dir / ENCODER_FILE).read_bytes()
    assert main(argv) == 0
    assert (run_dir / ENCODER_FILE).read_bytes() == encoder_bytes  # fine-tuning works on a copy
    table = capsys.readouterr().out
    for name in ("knn_top1", "linear_top1", "finetune_1pct_top1", "finetune_2pct_top1"):
        assert name in table
    results = run_dir.parent / "results.jsonl"  # the default: next to the run directories
    rows = read_rows(results)
    assert [r["protocol"]["name"] for r in rows] == ["knn", "linear", "finetune", "finetune"]
    assert [r["label_fraction"] for r in rows] == [None, None, 0.01, 0.02]
    summary = json.loads((run_dir / "results.json").read_text())
    for row in rows:
        assert all(row.get(k) is not None for k in FILLED), [k for k in FILLED if row.get(k) is None]
        assert set(RUN_FIELDS) <= set(row)
        assert (row["method"], row["backbone"], row["data"], row["image_size"]) == ("simclr", "resnet18", "digits", 16)
        assert (row["steps"], row["epochs"], row["images_seen"], row["batch_size"]) == (4, 2.0, 128, 32)
        assert (row["budget_kind"], row["budget"], row["seed"]) == ("steps", 4, 0)
        assert row["precision"] == summary["precision"] in ("no", "bf16")  # auto: bf16 on CUDA, no on CPU
        assert row["wall_time_s"] == summary["wall_time_s"] and row["images_per_s"] == summary["images_per_s"]
        assert row["command"] == "sslbench " + " ".join(argv)
        assert ENV_KEYS <= set(row["env"]) and row["env"]["sslbench"]
        assert row["metrics"] and all(0.0 <= v <= 100.0 for v in row["metrics"].values())
        # what the run learned from, for the leaderboard to keep differently trained runs apart
        assert row["train_config"]["backbone_kwargs.channels"] == [8, 16, 32, 64]
        assert row["train_config"]["method_cfg.temperature"] == 0.5 and row["train_config"]["steps"] == 4
        assert not {"seed", "output", "log_every", "cache_dir", "online_probe"} & set(row["train_config"])
        assert row["train_hardware"] == summary["hardware"] == row["hardware"]  # trained and evaluated here, on the CPU
    knn, linear, ft1, ft2 = rows
    assert set(knn["metrics"]) == {"knn_top1", "knn_top5"}
    assert (knn["protocol"]["k"], knn["protocol"]["temperature"], knn["protocol"]["metric"]) == (200, 0.1, "cosine")
    assert {"linear_top1", "linear_top5"} <= set(linear["metrics"]) and "linear_best_lr" not in linear["metrics"]
    assert linear["protocol"]["best_lr"] in linear["protocol"]["lr_grid"]
    assert set(ft1["metrics"]) == {"finetune_1pct_top1", "finetune_1pct_top5"}
    assert ft1["protocol"]["labelled_images"] == 10 < ft2["protocol"]["labelled_images"]  # 1 vs ~3 of ~135 per class
    assert (ft1["protocol"]["epochs"], ft1["protocol"]["min_steps"], ft1["protocol"]["steps"]) == (1, 2, 2)


def _copy_run(run_dir, dest):
    shutil.copytree(run_dir, dest, ignore=shutil.ignore_patterns("checkpoints"))
    return dest


def test_eval_of_an_encoder_from_another_backbone_fails_in_one_line(run_dir, tmp_path, capsys):
    # 1) the config names a wider backbone than the weights were saved from
    wider = _copy_run(run_dir, tmp_path / "wider")
    cfg = yaml.safe_load((wider / "config.yaml").read_text())
    cfg["backbone_kwargs"] = {"channels": [16, 32, 64, 128]}
    (wider / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    assert main(["eval", str(wider), "--results", str(tmp_path / "r.jsonl")]) == 2
    line = _error_line(capsys)
    assert "does not match the backbone" in line and "shape mismatch" in line
    # 2) encoder.safetensors swapped for a resnet34's
    swapped = _copy_run(run_dir, tmp_path / "swapped")
    save_encoder(create_backbone("resnet34", 32, channels=(8, 16, 32, 64)), swapped / ENCODER_FILE, meta={})
    assert main(["eval", str(swapped), "--results", str(tmp_path / "r.jsonl")]) == 2
    assert "unexpected keys" in _error_line(capsys)
    assert not (tmp_path / "r.jsonl").exists()  # nothing was evaluated or stored


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--protocol", "finetune", "--label-fractions", "0.1,1.5"], r"label fraction must be in (0, 1]"),
        (["--protocol", "finetune", "--label-fractions", "0"], r"label fraction must be in (0, 1]"),
        (["--protocol", "knn,linaer"], "unknown protocol 'linaer' (did you mean 'linear'?)"),
    ],
)
def test_eval_rejects_bad_options_in_one_line(run_dir, tmp_path, capsys, extra, message):
    assert main(["eval", str(run_dir), "--results", str(tmp_path / "r.jsonl"), *extra]) == 2
    assert message in _error_line(capsys)
    assert not (tmp_path / "r.jsonl").exists()


def test_eval_of_a_directory_that_is_not_a_run(tmp_path, capsys):
    assert main(["eval", str(tmp_path)]) == 2
    assert "not an sslbench run directory" in _error_line(capsys)


# ---------------------------------------------------------------------------------------------
# sslbench leaderboard


def _rows(path):
    for method, seed, top1 in [("simclr", 0, 80.0), ("simclr", 1, 82.0), ("byol", 0, 85.5)]:
        run = {
            "method": method,
            "backbone": "resnet18",
            "data": "digits",
            "image_size": 32,
            "budget_kind": "steps",
            "budget": 3,
            "seed": seed,
            "epochs": 1.5,
            "images_per_s": 100.0,
        }
        append_row(path, make_row(metrics={"knn_top1": top1}, protocol={"name": "knn"}, run=run))


def test_leaderboard_cli_renders_md_csv_html_and_a_plot(tmp_path, capsys):
    results = tmp_path / "results.jsonl"
    _rows(results)
    assert main(["leaderboard", str(results), "--format", "md"]) == 0
    md = capsys.readouterr().out
    assert "### digits / resnet18 / steps=3 / 32px" in md
    assert "| simclr " in md and "81.00 ± 1.41" in md and "85.50" in md
    assert main(["leaderboard", str(tmp_path), "--format", "csv"]) == 0  # a directory holding results.jsonl
    csv_lines = capsys.readouterr().out.splitlines()
    assert csv_lines[0].startswith("data,backbone,budget_kind,budget,image_size,method") and len(csv_lines) == 3
    assert main(["leaderboard", str(results), "--format", "html", "--output", str(tmp_path / "lb.html"), "--plot", str(tmp_path / "lb.png")]) == 0
    html = (tmp_path / "lb.html").read_text()
    assert "<table>" in html and "<td>byol</td>" in html
    assert (tmp_path / "lb.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_leaderboard_cli_errors(tmp_path, capsys):
    assert main(["leaderboard", str(tmp_path / "missing.jsonl")]) == 2
    assert "not found" in _error_line(capsys)
    _rows(tmp_path / "results.jsonl")
    assert main(["leaderboard", str(tmp_path / "results.jsonl"), "--format", "pdf"]) == 2
    assert "invalid choice" in _error_line(capsys)


@pytest.mark.parametrize("keep", [True, False])
def test_cpu_eval_follows_the_runs_keep_freed_memory(run_dir, tmp_path, monkeypatch, keep):
    import sslbench.commands.evaluate as commands

    calls = []
    monkeypatch.setattr(commands, "keep_freed_memory", lambda: calls.append(1) or True)
    run = _copy_run(run_dir, tmp_path / "run")
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["keep_freed_memory"] = keep
    (run / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    assert main(["eval", str(run), "--protocol", "knn", "--device", "cpu", "--results", str(tmp_path / "r.jsonl")]) == 0
    assert len(calls) == (1 if keep else 0)


def test_hardware_names_the_device_that_ran_not_any_gpu_present(monkeypatch):
    """The row's hardware named the GPUs whenever CUDA was available, also for --device cpu."""
    from sslbench.results import hardware_summary

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: "NVIDIA H100 80GB HBM3")
    assert hardware_summary(torch.device("cpu")).startswith("cpu: ")
    assert hardware_summary("cuda:0") == "1x NVIDIA H100 80GB HBM3"


def test_data_read_from_disk_is_scored_by_knn_and_linear_like_in_memory_data(tmp_path, monkeypatch, capsys):
    """A run on data above max_memory_gb trains from disk; `sslbench eval` refused it ("evaluation
    needs in-memory splits") although the trainer pointed there. k-NN and linear now read the
    files with DataLoader workers: the same pixels, so the same scores as in memory."""
    from _reliability import make_image_folder

    monkeypatch.setenv("SSLBENCH_CACHE", str(tmp_path / "cache"))
    data = make_image_folder(tmp_path / "data", classes=3, train=8, test=4, size=20)
    run = tmp_path / "runs" / "disk"
    assert (
        main(
            [
                "train",
                "--method",
                "simclr",
                "--data",
                f"imagefolder:{data}",
                "--image-size",
                "16",
                "--steps",
                "2",
                "--batch-size",
                "8",
                "--output",
                str(run),
                "--set",
                TINY,
                "--set",
                "max_memory_gb=0",
                "--set",
                "num_workers=0",
            ]
        )
        == 0
    )
    assert "score the run with `sslbench eval" in capsys.readouterr().err
    common = ["--protocol", "knn,linear", "--linear-epochs", "3"]
    assert main(["eval", str(run), *common, "--results", str(tmp_path / "disk.jsonl")]) == 0
    assert main(["eval", str(run), *common, "--max-memory-gb", "8", "--results", str(tmp_path / "mem.jsonl")]) == 0
    disk, mem = read_rows(tmp_path / "disk.jsonl"), read_rows(tmp_path / "mem.jsonl")
    assert [r["metrics"] for r in disk] == [r["metrics"] for r in mem]
    capsys.readouterr()
    # fine-tuning needs the images in memory: one line naming the flag
    assert main(["eval", str(run), "--protocol", "finetune", "--label-fractions", "0.5"]) == 2
    err = _error_line(capsys)
    assert "does not fit in memory (max_memory_gb=0)" in err and "--max-memory-gb" in err
