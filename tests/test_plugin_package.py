"""An out-of-tree plugin package, installed with pip, extends every registry through sslbench.api alone.

The package (written here, installed by ``pip install --target``) holds a method, an evaluation
protocol, a data source, a sub-command and a training callback, each a module that imports
sslbench only through ``sslbench.api`` and is found through its entry-point group. The CLI then
lists, trains, evaluates and runs them in fresh processes, as a user's shell would, and
runs sslbench.testing's checks on the installed method.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PYPROJECT = """
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "sslbench-toyplugins"
version = "0.1.0"

[project.entry-points."sslbench.methods"]
toyplug = "toyplugins.method"

[project.entry-points."sslbench.protocols"]
toy_norm = "toyplugins.protocol"

[project.entry-points."sslbench.data_sources"]
toysrc = "toyplugins.source"

[project.entry-points."sslbench.commands"]
toyhello = "toyplugins.command"

[project.entry-points."sslbench.callbacks"]
toy_steps = "toyplugins.callback"

[tool.setuptools]
packages = ["toyplugins"]
"""

MODULES = {
    "__init__.py": '"""Toy sslbench plugins (tests/test_plugin_package.py)."""\n',
    "method.py": '''
        """A contrastive toy method: NT-Xent between two views' projections."""

        from dataclasses import dataclass

        from sslbench.api import Batch, Method, MethodConfig, NTXentLoss, encode_views, feature_dim, mlp, register_method


        @dataclass
        class ToyConfig(MethodConfig):
            dim: int = 16  # projector output
            temperature: float = 0.5  # NT-Xent temperature


        @register_method("toyplug")
        class ToyPlug(Method):
            Config = ToyConfig
            description = "out-of-tree test plugin: NT-Xent on an MLP projector"
            paper = "none"

            def __init__(self, backbone, cfg):
                super().__init__()
                self.encoder = backbone
                self.head = mlp(feature_dim(backbone), 32, cfg.dim, 2)
                self.loss_fn = NTXentLoss(cfg.temperature)

            def training_step(self, batch: Batch):
                z0, z1 = (self.head(h) for h in encode_views(self.encoder, batch.views))
                loss = self.loss_fn(z0, z1)
                return loss, {"loss": loss.detach()}
    ''',
    "protocol.py": '''
        """A label-free toy protocol: the mean L2 norm of the test features."""

        from sslbench.api import EvalContext, Score, register_protocol


        @register_protocol("toy_norm", description="mean L2 norm of the test features (toy plugin)", uses_labels=False)
        def toy_norm(ctx: EvalContext, fraction):
            _, test = ctx.features()
            return Score({"toy_norm": float(test.norm(dim=1).mean())}, {})
    ''',
    "source.py": '''
        """toysrc:N: N seeded images per split, two classes (dark and bright), no files."""

        import torch

        from sslbench.api import ImageSplit, UserError, register_data_source


        @register_data_source("toysrc", arg="N", description="N seeded toy images per split, two classes (toy plugin)", image_size=16)
        def load(arg, split, size, cache_root, max_memory_gb, download):
            if not arg.isdigit() or int(arg) < 2:
                raise UserError(f"toysrc:{arg}: N must be an int >= 2, e.g. toysrc:64")
            n = int(arg)
            gen = torch.Generator().manual_seed(0 if split == "train" else 1)
            labels = torch.arange(n, dtype=torch.int64) % 2
            base = (labels * 150 + 50).view(n, 1, 1, 1).float()
            noise = torch.randint(-40, 41, (n, 3, size, size), generator=gen).float()
            images = (base + noise).clamp(0, 255).to(torch.uint8)
            return ImageSplit(images, labels, ["dark", "bright"])
    ''',
    "command.py": '''
        """sslbench toyhello NAME: a sub-command from a plugin."""

        from sslbench.api import register_command


        @register_command("toyhello")
        def register(sub):
            p = sub.add_parser("toyhello", help="say hello (toy plugin)")
            p.add_argument("who")
            p.set_defaults(func=lambda args: print(f"hello {args.who}") or 0)
    ''',
    "callback.py": '''
        """A callback that writes how many steps it saw into the run directory."""

        from sslbench.api import Callback, register_callback


        @register_callback("toy_steps")
        class ToySteps(Callback):
            """counts the training steps into RUN_DIR/toy_steps.txt (toy plugin)"""

            def __init__(self):
                self.steps = 0

            def on_step_end(self, run, batch, control):
                self.steps += 1

            def on_train_end(self, run, steps_done):
                if run.main:
                    (run.run_dir / "toy_steps.txt").write_text(str(self.steps))
    ''',
}


@pytest.fixture(scope="module")
def plugin_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The package written and pip-installed into a target folder; the environment that sees it."""
    root = tmp_path_factory.mktemp("plugin")
    src = root / "src"
    (src / "toyplugins").mkdir(parents=True)
    (src / "pyproject.toml").write_text(PYPROJECT)
    for name, text in MODULES.items():
        (src / "toyplugins" / name).write_text(textwrap.dedent(text).lstrip())
    site = root / "site"
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index", "--target", str(site), str(src)]
    done = subprocess.run(pip, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert any(site.glob("sslbench_toyplugins-*.dist-info/entry_points.txt"))
    path = os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "SSLBENCH_CACHE": str(root / "cache"), "root": str(root)}


def _sslbench(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sslbench", *args], env=env, capture_output=True, text=True, timeout=600)


def test_the_plugin_modules_import_sslbench_only_through_the_api() -> None:
    for name, text in MODULES.items():
        tree = ast.parse(textwrap.dedent(text))
        used = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module and n.module.startswith("sslbench")}
        assert used <= {"sslbench.api"}, (name, used)


@pytest.mark.slow
def test_every_kind_of_extension_is_listed(plugin_env: dict[str, str]) -> None:
    for kind, name in [
        ("methods", "toyplug"),
        ("protocols", "toy_norm"),
        ("data-sources", "toysrc:N"),
        ("commands", "toyhello"),
        ("callbacks", "toy_steps"),
    ]:
        listed = _sslbench(plugin_env, "list", kind)
        assert listed.returncode == 0, listed.stderr
        assert name in listed.stdout, (kind, listed.stdout)
        assert "could not load" not in listed.stderr, listed.stderr
    hello = _sslbench(plugin_env, "toyhello", "world")
    assert hello.returncode == 0 and hello.stdout.strip() == "hello world", hello.stderr


@pytest.mark.slow
def test_the_plugins_train_and_evaluate_through_the_cli(plugin_env: dict[str, str]) -> None:
    out = Path(plugin_env["root"]) / "run"
    env = {**plugin_env, "SSLBENCH_CALLBACKS": "toy_steps"}
    train = _sslbench(
        env,
        *("train", "--method", "toyplug", "--data", "toysrc:48", "--steps", "3", "--batch-size", "16", "--output", str(out), "--quiet"),
        *("--set", "backbone_kwargs.channels=8,16,32,64", "--set", "knn_k=5"),
    )
    assert train.returncode == 0, train.stderr
    assert (out / "toy_steps.txt").read_text() == "3"  # the callback, named in $SSLBENCH_CALLBACKS, saw every step
    summary = json.loads((out / "results.json").read_text())
    assert summary["metrics"]["knn_top1"] > 0  # the quick k-NN ran on the plugin's data source
    assert "image_size: 16" in (out / "config.yaml").read_text()  # the source's own resolution
    results = Path(plugin_env["root"]) / "results.jsonl"
    ev = _sslbench(plugin_env, "eval", str(out), "--protocol", "toy_norm", "--results", str(results))
    assert ev.returncode == 0, ev.stderr
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert [r["protocol"]["name"] for r in rows] == ["toy_norm"]
    assert rows[0]["metrics"]["toy_norm"] > 0
    bad = _sslbench(plugin_env, "train", "--method", "toyplug", "--data", "toysrc:x", "--steps", "1", "--output", str(out) + "-bad")
    assert bad.returncode == 2 and "toysrc:x: N must be an int >= 2" in bad.stderr, bad.stderr


@pytest.mark.parametrize("page,module", [("write-your-own-protocol.md", "protocol.py"), ("write-your-own-data-source.md", "source.py")])
def test_the_docs_quote_the_tested_plugin_modules(page: str, module: str) -> None:
    text = (Path(__file__).resolve().parents[1] / "docs" / page).read_text()
    assert textwrap.dedent(MODULES[module]).strip() in text, f"docs/{page} must quote tests/test_plugin_package.py's {module} verbatim"


@pytest.mark.slow
def test_the_installed_method_passes_sslbench_testing(plugin_env: dict[str, str]) -> None:
    """What a plugin author runs on the installed package: every contract check, 2 processes = 1
    and resume = unbroken included."""
    code = "from sslbench.testing import check_method; print(check_method('toyplugins.method:ToyPlug'))"
    done = subprocess.run([sys.executable, "-c", code], env=plugin_env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    report = ast.literal_eval(done.stdout.strip().splitlines()[-1])
    assert report["check_two_processes_equal_one"] == "ok" and report["check_resume_equals_unbroken"] == "ok", report
