"""`sslbench export RUN DIR`: timm loads the folder (``local-dir:``) and gives the run's features.

Run directories are made without training (config.yaml + an encoder with perturbed weights and
BatchNorm statistics): what matters is that timm rebuilds the same network and loads the same
numbers. Cases: a small-image ResNet (sslbench's CIFAR stem), a 224 px ResNet and a small ViT.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import pytest
import timm
import torch
from safetensors.torch import load_file

from sslbench.backbones import ENCODER_FILE, create_backbone, save_encoder
from sslbench.commands.cli import main
from sslbench.commands.export import CONFIG_FILE, WEIGHTS_FILE, export_encoder, push_to_hub
from sslbench.config import build_config, dump_yaml
from sslbench.config.build import load_encoder
from sslbench.core.augment import IMAGENET_MEAN, IMAGENET_STD

REPO = Path(__file__).resolve().parents[1]

CASES = {
    "resnet-32px": ("resnet18", 32, {"channels": [8, 16, 32, 64]}),
    "resnet-224px": ("resnet18", 224, {"channels": [8, 16, 32, 64]}),
    "vit-32px": ("vit_tiny_patch16_224", 32, {"depth": 2}),
}


def _fake_run(root: Path, name: str, backbone: str, image_size: int, kwargs: dict) -> Path:
    """A finished-looking run: config.yaml and an encoder whose every weight and BN statistic differs from init."""
    cfg = build_config(
        file_values={"backbone_kwargs": kwargs}, flags={"method": "simclr", "backbone": backbone, "image_size": image_size, "steps": 1}
    )
    run = root / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(dump_yaml(cfg))
    model = create_backbone(backbone, image_size, **kwargs)
    gen = torch.Generator().manual_seed(len(name))
    with torch.no_grad():
        for key, t in model.state_dict().items():
            if t.is_floating_point():
                noise = torch.randn(t.shape, generator=gen)
                t.copy_(noise.abs() + 0.5 if key.endswith("running_var") else t + 0.05 * noise)
    save_encoder(model, run / ENCODER_FILE, meta={})
    return run


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """case -> (run dir, export dir), exported through the command line."""
    root = tmp_path_factory.mktemp("export")
    out = {}
    for case, (backbone, size, kwargs) in CASES.items():
        run = _fake_run(root / "runs", case, backbone, size, kwargs)
        assert main(["export", str(run), str(root / "hub" / case)]) == 0
        out[case] = (run, root / "hub" / case)
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_timm_loads_the_export_with_the_runs_features(exported, case) -> None:
    run, folder = exported[case]
    backbone, size, _ = CASES[case]
    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    encoder = load_encoder(run)
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = encoder(x), model(x)
    assert theirs.shape == ours.shape == (3, encoder.num_features)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-6)
    state = load_file(str(folder / WEIGHTS_FILE))
    assert state.keys() == encoder.state_dict().keys()  # timm's own key names, nothing else

    config = json.loads((folder / CONFIG_FILE).read_text())
    pcfg = config["pretrained_cfg"]
    assert pcfg["input_size"] == [3, size, size]
    assert pcfg["mean"] == list(IMAGENET_MEAN) and pcfg["std"] == list(IMAGENET_STD)  # the run's normalisation
    assert config["num_classes"] == 0 and config["num_features"] == encoder.num_features
    assert config["sslbench"]["method"] == "simclr" and config["sslbench"]["backbone"] == backbone
    data_cfg = timm.data.resolve_data_config({}, model=model)  # what a timm user gets
    assert tuple(data_cfg["input_size"]) == (3, size, size) and data_cfg["interpolation"] == "bilinear"
    assert tuple(data_cfg["mean"]) == IMAGENET_MEAN and tuple(data_cfg["std"]) == IMAGENET_STD
    assert data_cfg["crop_pct"] == (1.0 if size < 96 else 0.875)


def test_architectures_and_model_arguments(exported) -> None:
    configs = {case: json.loads((folder / CONFIG_FILE).read_text()) for case, (_, folder) in exported.items()}
    assert configs["resnet-32px"]["architecture"] == "sslbench_cifar_resnet"
    assert configs["resnet-32px"]["model_args"] == {"base": "resnet18", "channels": [8, 16, 32, 64], "num_classes": 0}
    assert configs["resnet-224px"]["architecture"] == "resnet18"
    assert configs["vit-32px"]["model_args"] == {"img_size": 32, "patch_size": 4, "dynamic_img_size": True, "depth": 2, "num_classes": 0}
    assert "import sslbench.backbones" in (exported["resnet-32px"][1] / "README.md").read_text()


def test_plain_timm_in_a_fresh_process(exported) -> None:
    """224 px ResNet and ViT exports need nothing but timm; the small-image stem needs the sslbench import."""
    code = (
        "import sys, timm, torch\n"
        "for folder, size in ((sys.argv[1], 224), (sys.argv[2], 32)):\n"
        "    m = timm.create_model('local-dir:' + folder, pretrained=True).eval()\n"
        "    print(tuple(m(torch.zeros(1, 3, size, size)).shape))\n"
        "assert not any(name.startswith('sslbench') for name in sys.modules)\n"
        "import sslbench.backbones\n"
        "print(timm.create_model('local-dir:' + sys.argv[3], pretrained=True).num_features)\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    argv = [str(exported[c][1]) for c in ("resnet-224px", "vit-32px", "resnet-32px")]
    done = subprocess.run([sys.executable, "-c", code, *argv], check=False, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["(1,", "64)", "(1,", "192)", "64"]


def test_refusals_are_one_line(exported, tmp_path, capsys) -> None:
    run, folder = exported["resnet-32px"]
    cases = [
        (["export", str(run), str(folder)], "is not empty; choose a new folder or pass --overwrite"),
        (["export", str(tmp_path / "nope"), str(tmp_path / "x")], "does not exist"),
        (["export", str(run), str(run)], "not the run directory"),
        (["export", str(run), str(tmp_path / "y"), "--push-to-hub", "bad repo id!"], "is not a Hub repository id"),
    ]
    for argv, phrase in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and phrase in err[0], (argv, err)
    assert main(["export", str(run), str(folder), "--overwrite"]) == 0


def test_push_to_hub_uploads_the_folder(exported, monkeypatch, capsys) -> None:
    _, folder = exported["vit-32px"]

    class FakeApi:
        calls: ClassVar[list] = []

        def create_repo(self, repo_id, **kwargs):
            self.calls.append(("create_repo", repo_id, kwargs))
            return type("Url", (), {"repo_id": "me/" + repo_id})()

        def upload_folder(self, **kwargs):
            self.calls.append(("upload_folder", kwargs))
            return type("Info", (), {"commit_url": "https://huggingface.co/me/enc/commit/1"})()

    url = push_to_hub(folder, "enc", private=True, api=FakeApi())
    assert url.endswith("/commit/1")
    (_, repo, kw), (_, upload) = FakeApi.calls
    assert repo == "enc" and kw["private"] and kw["exist_ok"]
    assert upload["repo_id"] == "me/enc" and upload["folder_path"] == str(folder)
    assert set(upload["allow_patterns"]) == {"config.json", "model.safetensors", "README.md"}
    # without a network (offline mode here): one line, and the folder is written in full first
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    run = exported["vit-32px"][0]
    target = folder.parent / "offline"
    assert main(["export", str(run), str(target), "--push-to-hub", "me/enc"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "could not upload" in err[0] and "the folder is complete" in err[0], err
    assert {p.name for p in target.iterdir()} == {"config.json", "model.safetensors", "README.md"}


def test_export_encoder_returns_the_folder(exported, tmp_path) -> None:
    run, _ = exported["resnet-224px"]
    out = export_encoder(run, tmp_path / "again", verify=False)
    assert (out / CONFIG_FILE).is_file() and (out / WEIGHTS_FILE).is_file()
