"""The method registry: built-ins, helpful unknown-name errors, third-party entry points."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from sslbench.core.errors import UserError
from sslbench.core.registry import METHODS, get_method


def test_builtin_simclr_is_registered():
    assert "simclr" in METHODS.names()
    assert get_method("simclr").name == "simclr"


def test_unknown_method_lists_valid_names_and_close_match():
    with pytest.raises(UserError) as err:
        get_method("simclrr")
    msg = str(err.value)
    assert "did you mean 'simclr'" in msg and "valid:" in msg and "simclr" in msg.split("valid:")[1]


PLUGIN = textwrap.dedent(
    '''
    """A third-party method, found only through the sslbench.methods entry-point group."""
    from dataclasses import dataclass

    import torch
    import torch.nn.functional as F
    from torch import nn

    from sslbench.core.heads import encode_views, mlp
    from sslbench.core.method import Method, MethodConfig
    from sslbench.core.registry import register_method


    @dataclass
    class ToyConfig(MethodConfig):
        dim: int = 16  # projector output


    @register_method("toyplug")
    class ToyPlug(Method):
        Config = ToyConfig
        description = "test plugin: negative cosine between views"
        paper = "none"

        def __init__(self, backbone, cfg):
            super().__init__()
            self.encoder = backbone
            self.head = mlp(backbone.num_features, 32, cfg.dim, 2)

        def training_step(self, batch):
            z0, z1 = (self.head(h) for h in encode_views(self.encoder, batch.views))
            loss = -F.cosine_similarity(z0, z1.detach(), dim=1).mean()
            return loss, {"loss": loss.detach()}
    '''
)


@pytest.mark.slow
def test_entry_point_plugin_is_found_and_trains(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "toyplug_pkg.py").write_text(PLUGIN)
    info = site / "toyplug_pkg-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toyplug-pkg\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[sslbench.methods]\ntoyplug = toyplug_pkg\n")
    env = {**os.environ, "PYTHONPATH": str(site) + os.pathsep + os.environ.get("PYTHONPATH", ""), "SSLBENCH_CACHE": str(tmp_path / "cache")}
    listed = subprocess.run([sys.executable, "-m", "sslbench", "list", "methods"], env=env, capture_output=True, text=True, timeout=300)
    assert listed.returncode == 0, listed.stderr
    assert "toyplug" in listed.stdout
    out = tmp_path / "run"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "sslbench",
            "train",
            "--method",
            "toyplug",
            "--steps",
            "3",
            "--batch-size",
            "32",
            "--output",
            str(out),
            "--quiet",
            "--set",
            "backbone_kwargs.channels=8,16,32,64",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["step"] == 3
    assert (out / "encoder.safetensors").is_file()
    assert "knn_top1" in json.loads((out / "results.json").read_text())["metrics"]
