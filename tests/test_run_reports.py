"""A run that says what it does, and records what ran (issue 20).

- The start banner names the method, backbone and its size, the data and its size, the image size
  and why, the batch, the budget, the precision, the devices and the output directory; the end
  summary says where the run is, what it holds and how to evaluate it; plain progress lines (a
  log, a pipe) carry an ETA; ``--quiet`` prints nothing.
- ``config.yaml``, ``results.json`` and result rows record the effective precision (``auto``
  resolved), the device, the image size and the defaulted budget.
- A one-class data set trains (labels are unused) with one warning and no meaningless k-NN.
"""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pytest
import torch
import yaml
from _reliability import child_env, lines, make_image_folder, run_forked

from sslbench.core.method import ViewSpec
from sslbench.core.progress import TrainProgress, clock
from sslbench.train.batches import Plan

NARROW = ["--set", "backbone_kwargs.channels=8,16,32,64"]


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    root = tmp_path_factory.mktemp("talk")
    return {"root": root, "env": child_env(root / "cache"), "data": make_image_folder(root / "data")}


@pytest.fixture(scope="module")
def talking_run(setting):
    """2 steps, default precision (auto), not quiet, then an eval of it."""
    out = setting["root"] / "run"
    r = run_forked(
        ["train", "--data", f"imagefolder:{setting['data']}", "--steps", "2", "--batch-size", "16", *NARROW, "--output", str(out)], setting["env"]
    )
    assert r.returncode == 0, r.describe()
    e = run_forked(["eval", str(out), "--protocol", "knn"], setting["env"])
    assert e.returncode == 0, e.describe()
    return {"out": out, "train": r, "eval": e, "row": json.loads((setting["root"] / "results.jsonl").read_text().splitlines()[-1])}


def test_the_start_banner_names_what_the_run_trains_and_where(talking_run, setting):
    err, out = talking_run["train"].stderr, talking_run["out"]
    head = lines(err)[:7]
    assert re.fullmatch(r"sslbench: simclr on resnet18 \(\S+ parameters; \S+ more in the method's heads\)", head[0]), head
    assert head[1] == f"  data: imagefolder:{setting['data']}, 64 training images in 4 classes (in memory)"
    assert head[2] == "  image size: 32 px (the default for imagefolder; --image-size to change)", head[2]
    assert head[3] == "  views: 2 x 32 px per image", head[3]
    head = head[:3] + head[4:]
    assert head[3].startswith("  batch 16 (lars, lr ") and "2 steps = 0.5 epochs of 4 steps" in head[3] and "warm-up" in head[3], head[3]
    assert head[4] == "  precision no (fp32) on cpu (1 thread), 1 process", head[4]  # auto: fp32 on the CPU
    assert head[5] == f"  output: {out}"


def test_plain_progress_lines_carry_an_eta_and_the_end_summary_says_what_to_run_next(talking_run):
    err, out = lines(talking_run["train"].stderr), talking_run["out"]
    assert any(re.fullmatch(r"step 2/2  loss \S+  lr \S+  \S+ img/s  elapsed \d+s  eta 0s", line) for line in err), err
    start = err.index(f"saved {out}:")
    tail = err[start:]
    assert any(line.split()[0] == "encoder.safetensors" for line in tail[1:]), tail
    assert any(line.split()[0] == "checkpoints/" and "step-00000002" in line for line in tail[1:]), tail
    assert tail[-1] == f"evaluate it: sslbench eval {out} --protocol knn,linear"


def test_the_end_summary_names_every_file_of_the_run(talking_run):
    """Every file and folder the run left (curves.png included) has its line in the end summary (issue 34)."""
    err, out = lines(talking_run["train"].stderr), talking_run["out"]
    tail = err[err.index(f"saved {out}:") + 1 : -1]
    named = {line.split()[0].rstrip("/") for line in tail}
    assert {p.name for p in out.iterdir()} <= named, (sorted(p.name for p in out.iterdir()), tail)
    assert "curves.png" in named


def test_run_files_share_the_umask_mode(talking_run):
    """safetensors creates its files 0600: the weights, the checkpoints' files and every other run
    file get the mode of a new file under the umask (0644 under 022), one mode for all (issue 34)."""
    from sslbench.core.rundir import file_mode

    modes = {str(p.relative_to(talking_run["out"])): oct(p.stat().st_mode & 0o777) for p in talking_run["out"].rglob("*") if p.is_file()}
    assert "encoder.safetensors" in modes and any(k.startswith("checkpoints/") and k.endswith(".safetensors") for k in modes), modes
    assert set(modes.values()) == {oct(file_mode())}, modes


def test_records_name_what_ran(talking_run, setting):
    out, row = talking_run["out"], talking_run["row"]
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["precision"] == "no" and cfg["image_size"] == 32 and cfg["steps"] == 2 and cfg["epochs"] is None
    summary = json.loads((out / "results.json").read_text())
    assert summary["precision"] == "no" and summary["device"] == "cpu" and summary["image_size"] == 32
    assert summary["batch_size"] == 16 and summary["steps_per_epoch"] == 4 and summary["train_images"] == 64
    assert summary["optimizer"] == cfg["optimizer"] and summary["lr"] == cfg["lr"] and "warmup_steps" in summary
    assert row["precision"] == "no" and row["image_size"] == 32 and row["train_config"]["precision"] == "no"
    assert row["protocol"]["precision"] == "no" and row["eval_device"] == "cpu"


def test_a_defaulted_budget_is_recorded(setting):
    from sslbench.config import DEFAULT_EPOCHS, build_config

    cfg = build_config(flags={"data": "digits"})
    assert cfg.epochs == DEFAULT_EPOCHS and cfg.steps is None and cfg.precision in ("no", "bf16") and cfg.image_size == 16
    assert build_config(flags={"steps": 5}).epochs is None
    assert build_config(sets=["time_budget_s=60"]).epochs is None  # a time budget alone stays alone


def test_quiet_is_quiet(setting):
    out = setting["root"] / "quiet"
    r = run_forked(
        ["train", "--data", f"imagefolder:{setting['data']}", "--steps", "2", "--batch-size", "16", *NARROW, "--quiet", "--output", str(out)],
        setting["env"],
    )
    assert r.returncode == 0, r.describe()
    assert lines(r.stderr) == [] and lines(r.stdout) == [], r.describe()
    # the quick k-NN's caveat (k=200 on 64 training images) goes where its figures go: results.json
    (note,) = json.loads((out / "results.json").read_text())["warnings"]
    assert note.startswith("k-NN k=200 is more than the 64 training images in its memory bank"), note


KNN_K_BEYOND_64 = (
    "k-NN k=200 is more than the 64 training images in its memory bank, so it runs with k=64: every test image is scored by a vote "
    "of all 64, not of its nearest neighbours, and trained and untrained features may score alike; set knn_k below 64"
)


def test_a_knn_k_beyond_the_training_images_is_said_once_with_the_k_that_ran_and_recorded(talking_run):
    """k=200 on 64 training images: one warning line with the k that ran, in the quick k-NN's line
    too; results.json's ``warnings`` and the eval row's protocol record it (issue 34: "k-NN with
    k=200 on 48 training images gives trained = untrained without a word")."""
    train, out = talking_run["train"], talking_run["out"]
    warned = [line for line in lines(train.stderr) if line.startswith("warning: ")]
    assert len(warned) == 1 and warned[0].startswith("warning: " + KNN_K_BEYOND_64), train.describe()
    (knn_line,) = [line for line in lines(train.stdout) if line.startswith("k-NN top-1")]
    assert "(k=64: knn_k=200 cut to the training images, T=0.1)" in knn_line, knn_line
    assert json.loads((out / "results.json").read_text())["warnings"] == [warned[0].removeprefix("warning: ")]
    protocol = talking_run["row"]["protocol"]
    assert protocol["k"] == 200 and protocol["k_effective"] == 64 and protocol["warnings"] == [warned[0].removeprefix("warning: ")]
    assert [line for line in lines(talking_run["eval"].stderr) if line.startswith("warning: ")] == warned


def test_tiny_images_are_warned_of_once_and_recorded(setting):
    """2x2 px images, upscaled 16x to 32 px: one warning line, recorded in results.json (issue 34)."""
    data = make_image_folder(setting["root"] / "tiny", classes=2, train=8, test=4, size=2)
    out = setting["root"] / "tiny-run"
    r = run_forked(
        ["train", "--data", f"imagefolder:{data}", "--steps", "1", "--batch-size", "8", *NARROW, "--quiet", "--set", "quick_knn=false"]
        + ["--output", str(out)],
        setting["env"],
    )
    assert r.returncode == 0, r.describe()
    (line,) = lines(r.stderr)
    assert line.startswith(f"warning: imagefolder:{data}'s training images are 2 px (median shorter side), upscaled 16x to 32 px: below 8 px"), line
    assert json.loads((out / "results.json").read_text())["warnings"] == [line.removeprefix("warning: ")]


def test_the_default_data_and_common_upscaling_do_not_warn_of_tiny_images(tmp_path):
    """The quick start's digits (8 px originals at the default 16 px) is the smallest data that
    trains well, and CIFAR's 32 px upscaled to 224 px is common practice: neither warns."""
    from sslbench.data import default_image_size, load_split
    from sslbench.train.run_setup import tiny_images_warning

    digits = load_split("digits", "train", default_image_size("digits"), cache_dir=tmp_path)
    assert digits.source_side == 8 and tiny_images_warning("digits", digits.source_side, 16) is None
    assert tiny_images_warning("cifar10", 32, 224) is None and tiny_images_warning("x", None, 32) is None  # None: not known
    assert tiny_images_warning("x", 7, 32) is not None and tiny_images_warning("x", 4, 4) is not None


def test_a_one_class_data_set_trains_with_one_warning_and_no_knn(setting):
    data = make_image_folder(setting["root"] / "onecls", classes=1, train=16, test=4)
    out = setting["root"] / "onecls-run"
    r = run_forked(
        ["train", "--data", f"imagefolder:{data}", "--steps", "2", "--batch-size", "8", *NARROW, "--quiet", "--output", str(out)], setting["env"]
    )
    assert r.returncode == 0, r.describe()
    assert len(lines(r.stderr)) == 1 and "has a single class" in r.stderr and "quick k-NN is skipped" in r.stderr, r.describe()
    summary = json.loads((out / "results.json").read_text())
    assert summary["metrics"] == {} and summary["warnings"] == [lines(r.stderr)[0].removeprefix("warning: ")]  # recorded too


def test_a_large_backbone_at_the_default_16_px_says_so():
    """`--backbone resnet50` on the default data (digits, 16 px): the banner says the size is the
    data's default and that such a backbone is made for larger images."""
    from sslbench.backbones import create_backbone
    from sslbench.config import build_config
    from sslbench.train.report import start_banner

    cfg = build_config(flags={"backbone": "resnet50", "output": "runs/x"})
    encoder = create_backbone("resnet50", 16)
    method = torch.nn.Module()
    method.encoder = encoder
    run = _banner_run(cfg, method, [ViewSpec(cfg.aug, 16)] * 2)
    text = start_banner(run)  # type: ignore[arg-type]
    assert text[2] == "  image size: 16 px (the default for digits; --image-size to change)"
    assert text[-1].startswith("note: resnet50 (23.5M parameters) is made for images of ~224 px; here it trains at 16 px (the default for digits)")


@pytest.mark.parametrize(
    ("method", "sets", "expected"),
    [
        ("dino", ["method_cfg.local_crops=2"], "  views: 2 x 16 px + 2 x 8 px per image; ViT patches of 2 px (64 per 16 px view)"),
        (
            "mae",
            [],
            "  views: 1 x 16 px per image; ViT patches of 2 px (64 per 16 px view); mask ratio 0.75 (75% of the patches masked: removed (MAE, MSN) or replaced by a mask token (SimMIM))",
        ),
    ],
)
def test_the_banner_names_the_views_the_patch_size_and_the_mask_ratio(method, sets, expected):
    """Multi-crop's local crops, a ViT's patch size and MAE's mask ratio decide what a step costs (issue 34)."""
    from sslbench.config import build_config
    from sslbench.config.build import build_method
    from sslbench.core.method import default_views
    from sslbench.train.report import start_banner

    cfg = build_config(flags={"method": method, "backbone": "vit_tiny_patch16_224", "image_size": 16, "output": "runs/x"}, sets=sets)
    m = build_method(cfg)
    run = _banner_run(cfg, m, default_views(m, cfg.aug, 16))
    assert start_banner(run)[3] == expected  # type: ignore[arg-type]


def test_bf16_on_a_cpu_without_native_bf16_says_it_is_slow(monkeypatch):
    import sslbench.train.report as report
    from sslbench.config import build_config

    cfg = build_config(flags={"precision": "bf16", "output": "runs/x", "image_size": 32}, sets=["backbone_kwargs.channels=8,16,32,64"])
    method = torch.nn.Module()
    method.encoder = torch.nn.Linear(2, 2)
    run = _banner_run(cfg, method, [ViewSpec(cfg.aug, 16)] * 2)
    monkeypatch.setattr(report, "cpu_has_bf16", lambda: False)
    assert report.start_banner(run)[-1].startswith("note: this CPU has no native bf16")  # type: ignore[arg-type]
    monkeypatch.setattr(report, "cpu_has_bf16", lambda: True)
    assert not any("bf16" in line for line in report.start_banner(run)[6:])  # type: ignore[arg-type]


def _banner_run(cfg, method, specs) -> SimpleNamespace:
    """The fields of a Run that start_banner reads: 5 epochs of 10 steps on 50 images of 10 classes."""
    train_split = _Split(torch.arange(10).repeat(5))
    return SimpleNamespace(
        cfg=cfg,
        plan=Plan(5, 50, 5, 256, 256),
        method=method,
        train_split=train_split,
        device=torch.device("cpu"),
        world=1,
        run_dir="runs/x",
        time_based=False,
        specs=specs,
    )


class _Split:
    def __init__(self, labels: torch.Tensor) -> None:
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)


def test_plain_progress_lines_have_an_eta(monkeypatch, capsys):
    now = [100.0]
    monkeypatch.setattr("sslbench.core.progress.time.monotonic", lambda: now[0])
    bar = TrainProgress(100, 0, enabled=True, plain_every_s=0)
    assert not bar.rich  # captured stderr is not a terminal
    now[0] = 110.0
    bar.update(10, loss=1.0, lr=0.1, ips=50.0)
    assert capsys.readouterr().err == "step 10/100  loss 1.0000  lr 0.1  50 img/s  elapsed 10s  eta 1m30s\n"
    timed = TrainProgress(2**62, 0, enabled=True, plain_every_s=0, time_budget_s=60.0, unbounded=True)
    now[0] = 125.0
    timed.update(30, loss=1.0, lr=0.1, ips=50.0)
    assert capsys.readouterr().err == "step 30  loss 1.0000  lr 0.1  50 img/s  elapsed 15s  eta 45s\n"
    assert [clock(s) for s in (5, 65, 7260)] == ["5s", "1m05s", "2h01m"]
