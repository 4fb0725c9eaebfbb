"""The package installs as one `sslbench` tree: wheel and editable installs import everything, and
nothing called `methods`, `backbones` or `evals` lands at the top of site-packages."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
IMPORTS = "import sslbench, sslbench.methods.simclr, sslbench.methods.moco, sslbench.backbones, sslbench.evals.knn, sslbench.commands.cli, sslbench.train.trainer; print(sslbench.methods.__file__)"


@pytest.mark.slow
def test_wheel_contains_only_the_sslbench_tree_and_imports(tmp_path):
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(REPO)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    wheel = next((tmp_path / "dist").glob("sslbench-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops <= {"sslbench"} | {t for t in tops if t.endswith(".dist-info")}, tops
    assert "sslbench/methods/simclr.py" in names and "sslbench/evals/knn.py" in names
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "sslbench = sslbench.commands.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()
    target = tmp_path / "site"
    inst = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(target), str(wheel)], capture_output=True, text=True, timeout=600
    )
    assert inst.returncode == 0, inst.stderr[-2000:]
    # run from an empty directory so neither the repo nor the editable install is on the path first
    env = {"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin", "PYTHONNOUSERSITE": "1"}
    out = subprocess.run(
        [sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(target)!r}); {IMPORTS}"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().startswith(str(target))


def test_editable_or_installed_package_imports_everything(tmp_path):
    out = subprocess.run([sys.executable, "-c", IMPORTS], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]


def test_python_dash_m_and_console_script_agree(tmp_path):
    out = subprocess.run([sys.executable, "-m", "sslbench", "list", "methods"], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert out.returncode == 0 and "simclr" in out.stdout
