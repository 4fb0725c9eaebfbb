"""`sslbench eval --encoder SPEC`: encoders sslbench did not train score exactly like the run they
came from (issue 30).

One run directory (config.yaml + an encoder whose every weight and BatchNorm statistic differs from
init, no training: what matters is which numbers are loaded) of timm's tiny ``test_resnet`` at
16 px, evaluated with k-NN on a small image folder five ways: the run directory,
``timm:test_resnet --weights RUN/encoder.safetensors``, ``local-dir:`` of its ``sslbench export``,
``hf-hub:`` of that export placed in a hand-built hub cache (read offline), and (random weights)
``timm:test_resnet`` against the same random state dict saved as a ``.pth``. The bad inputs are in
tests/test_cli_errors.py.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import torch
from _reliability import make_image_folder

from sslbench.backbones import ENCODER_FILE, create_backbone, save_encoder
from sslbench.commands.cli import main
from sslbench.config import build_config, dump_yaml
from sslbench.results import read_rows
from sslbench.results.leaderboard import render

BACKBONE, SIZE = "test_resnet", 16  # timm's own tiny ResNet (0.4M parameters), with sslbench's small-image stem


def _fake_run(run: Path, data: str) -> None:
    cfg = build_config(file_values={}, flags={"method": "simclr", "backbone": BACKBONE, "image_size": SIZE, "data": data, "steps": 1})
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(dump_yaml(cfg))
    torch.manual_seed(5)
    model = create_backbone(BACKBONE, SIZE)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for key, t in model.state_dict().items():
            if t.is_floating_point():
                noise = torch.randn(t.shape, generator=gen)
                t.copy_(noise.abs() + 0.5 if key.endswith("running_var") else t + 0.05 * noise)
    save_encoder(model, run / ENCODER_FILE, meta={})


def _hub_cache(cache: Path, repo: str, folder: Path) -> None:
    """``folder``'s files as the cached snapshot of ``repo``, laid out as huggingface_hub caches a download."""
    commit = "0" * 40
    entry = cache / f"models--{repo.replace('/', '--')}"
    shutil.copytree(folder, entry / "snapshots" / commit)
    (entry / "refs").mkdir(parents=True)
    (entry / "refs" / "main").write_text(commit)


def _sha256(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory) -> dict[str, object]:
    """case -> the rows its `sslbench eval` appended (each case to a store of its own)."""
    import huggingface_hub.constants

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is faster on a busy 2-core machine (as tests/test_eval_cli.py)
    root = tmp_path_factory.mktemp("external")
    images = make_image_folder(root / "images", classes=4, train=24, test=12, size=SIZE)
    data = f"imagefolder:{images}"
    run = root / "run"
    _fake_run(run, data)
    assert main(["export", str(run), str(root / "export")]) == 0
    cache = root / "hub"
    _hub_cache(cache, "someone/tiny-ssl", root / "export")
    torch.manual_seed(0)  # the random init of timm:NAME --init-seed 0, saved as a .pth
    torch.save(create_backbone(BACKBONE, SIZE).state_dict(), root / "random0.pth")
    knn = ["--protocol", "knn", "--device", "cpu"]
    cases = {
        "run": ["eval", str(run), *knn],
        "timm-weights": [
            "eval",
            "--encoder",
            f"timm:{BACKBONE}",
            "--weights",
            str(run / ENCODER_FILE),
            "--image-size",
            str(SIZE),
            "--data",
            data,
            *knn,
        ],
        "local-dir": ["eval", "--encoder", f"local-dir:{root / 'export'}", "--data", data, *knn],
        "hf-hub": ["eval", "--encoder", "hf-hub:someone/tiny-ssl", "--data", data, *knn],
        "random": ["eval", "--encoder", f"timm:{BACKBONE}", "--image-size", str(SIZE), "--data", data, *knn],
        "random-again": ["eval", "--encoder", f"timm:{BACKBONE}", "--image-size", str(SIZE), "--data", data, *knn],
        "random-pth": [
            "eval",
            "--encoder",
            f"timm:{BACKBONE}",
            "--weights",
            str(root / "random0.pth"),
            "--image-size",
            str(SIZE),
            "--data",
            data,
            *knn,
        ],
    }
    rows = {}
    saved = huggingface_hub.constants.HF_HUB_CACHE
    huggingface_hub.constants.HF_HUB_CACHE = str(cache)
    try:
        for case, argv in cases.items():
            store = root / f"{case}.jsonl"
            assert main([*argv, "--results", str(store)]) == 0
            rows[case] = read_rows(store)
    finally:
        huggingface_hub.constants.HF_HUB_CACHE = saved
        torch.set_num_threads(threads)
    return {"rows": rows, "root": root, "run": run}


def _knn(rows: list[dict]) -> dict[str, float]:
    (row,) = rows
    assert row["protocol"]["name"] == "knn"
    return row["metrics"]


@pytest.mark.parametrize("case", ["timm-weights", "local-dir", "hf-hub"])
def test_the_runs_weights_score_as_the_run(evaluated, case) -> None:
    rows = evaluated["rows"]
    assert _knn(rows[case]) == _knn(rows["run"])
    assert rows[case][0]["protocol"] == {**rows["run"][0]["protocol"]}  # same k, T, bank, data, size, precision


def test_random_init_is_seeded_and_equals_its_state_dict(evaluated) -> None:
    rows = evaluated["rows"]
    assert _knn(rows["random"]) == _knn(rows["random-again"]) == _knn(rows["random-pth"])
    assert rows["random"][0]["weights"] == "random:0"
    assert rows["random-pth"][0]["weights"] == _sha256(evaluated["root"] / "random0.pth")


def test_rows_are_keyed_by_name_and_checksum(evaluated) -> None:
    rows, root, run = evaluated["rows"], evaluated["root"], evaluated["run"]
    expect = {
        "timm-weights": (f"timm:{BACKBONE}", _sha256(run / ENCODER_FILE)),
        "local-dir": ("local-dir:export", _sha256(root / "export" / "model.safetensors")),
        "hf-hub": ("hf-hub:someone/tiny-ssl", _sha256(root / "export" / "model.safetensors")),
        "random": (f"timm:{BACKBONE}", "random:0"),
    }
    for case, (name, weights) in expect.items():
        (row,) = rows[case]
        assert (row["encoder"], row["method"], row["weights"]) == (name, name, weights), case
        assert row["train_config"] == {"encoder": name, "weights": weights}
        assert row["backbone"] == BACKBONE and row["image_size"] == SIZE and row["run_dir"] is None
    # the export's weights are the run's encoder's, written by another file: same numbers, another checksum
    assert rows["local-dir"][0]["encoder_source"]["sslbench"]["method"] == "simclr"


def test_external_rows_render_in_the_leaderboard(evaluated) -> None:
    rows = evaluated["rows"]
    table = render([*rows["run"], *rows["timm-weights"], *rows["random"], *rows["local-dir"]], "md")
    assert "/ encoder=external / 16px" in table
    weights = rows["timm-weights"][0]["weights"]
    assert f"timm:{BACKBONE} [weights={weights}]" in table and f"timm:{BACKBONE} [weights=random:0]" in table
    assert "| local-dir:export " in table  # one configuration of its name: no label
    assert "/ steps=1 / 16px" in table  # the run keeps its own group
