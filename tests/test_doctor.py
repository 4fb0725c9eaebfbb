"""`sslbench doctor` (issue 34): a healthy install exits 0 and prints the versions; a torchvision
from another torch build is one line naming the mismatch and the fix, exit 2; the command runs
even where torchvision cannot be imported (the failure it exists to diagnose)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from _reliability import REPO, lines

from sslbench.commands import doctor
from sslbench.commands.cli import main


@pytest.fixture(autouse=True)
def _offline_hub(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no network probe: the hub line is a note either way
    monkeypatch.setenv("SSLBENCH_CACHE", str(tmp_path / "cache"))


def test_a_healthy_install_exits_0_and_prints_the_versions(capsys):
    assert main(["doctor"]) == 0
    captured = capsys.readouterr()
    out = captured.out.splitlines()
    assert captured.err == ""
    for package in ("python", *doctor.PACKAGES):
        version = doctor.installed_version(package) if package != "python" else None
        assert any(line.split()[:1] == [package] and (version is None or version in line) for line in out), (package, out)
    assert any(line.startswith("pair") and "torch and torchvision match" in line for line in out), out
    assert any(line.startswith("devices") and "cpu" in line for line in out) and any("instruction set" in line for line in out)
    assert any(line.startswith("runs folder") and "GiB free" in line for line in out)
    assert any(line.startswith("cache folder") and "GiB free" in line for line in out)
    assert any(line.startswith("hub") and "offline by HF_HUB_OFFLINE" in line for line in out)
    assert out[-1] == "sslbench doctor: no problems found"


def test_torchvision_of_another_torch_build_is_one_line_and_exit_2(monkeypatch, capsys):
    real = doctor.installed_version
    fake = {"torch": "2.14.1+cpu", "torchvision": "0.29.1"}  # a CPU torch next to the PyPI (CUDA) torchvision
    monkeypatch.setattr(doctor, "installed_version", lambda p: fake.get(p) or real(p))
    assert main(["doctor"]) == 2
    err = lines(capsys.readouterr().err)
    assert len(err) == 1, err
    assert err[0].startswith("sslbench: error: torchvision 0.29.1 does not match torch 2.14.1+cpu (another build"), err
    assert "operator torchvision::nms does not exist" in err[0]
    assert "pip install --force-reinstall torch==2.14.1 torchvision==0.29.* --index-url https://download.pytorch.org/whl/cpu" in err[0]


@pytest.mark.parametrize(
    ("torch_version", "torchvision_version", "ok"),
    [
        ("2.14.1", "0.29.1", True),
        ("2.5.1+cpu", "0.20.1+cpu", True),
        ("2.5.1+cu121", "0.20.1+cu121", True),
        ("2.5.1+cpu", "0.20.1+cu121", False),  # another build
        ("2.5.1", "0.20.1+cpu", False),
        ("2.5.1", "0.21.0", False),  # another release
        ("2.0.1", "0.15.2", True),
    ],
)
def test_the_pair_rule(torch_version, torchvision_version, ok):
    problem = doctor.pair_problem(torch_version, torchvision_version)
    assert (problem is None) == ok, problem


def test_doctor_runs_where_torchvision_does_not_import(tmp_path):
    """A torchvision that dies at import (as a mismatched pair does): every other command would
    fail, doctor names the cause in one line and exits 2."""
    fake = tmp_path / "fake" / "torchvision"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('raise RuntimeError("operator torchvision::nms does not exist")\n')
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(fake.parent), str(REPO)]), "HF_HUB_OFFLINE": "1", "SSLBENCH_CACHE": str(tmp_path / "c")}
    r = subprocess.run([sys.executable, "-m", "sslbench", "doctor"], env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=600)
    assert r.returncode == 2, r.stderr
    err = lines(r.stderr)
    assert len(err) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "does not load with torch" in err[0] and "operator torchvision::nms does not exist" in err[0] and "pip install" in err[0]
    assert any(line.startswith("torch ") for line in r.stdout.splitlines()), r.stdout


def test_doctor_is_registered_and_the_install_section_ends_with_it():
    from sslbench.commands.cli import build_parser

    assert "doctor" in build_parser().format_help()
    readme = (Path(REPO) / "README.md").read_text()
    install = readme[readme.index("### On a machine without a GPU") :]
    install = install[: install.index("\n## ")].strip()
    assert install.endswith("```bash\nsslbench doctor\n```"), install[-200:]
