"""Safe loading (issue 7): checkpoints, encoders and decode caches never unpickle code.

The payload is a pickle whose ``__reduce__`` runs ``touch MARKER``; each test checks the marker is
never created (and, as a control, that plain ``pickle.load`` of the same bytes does create it).

Policy (docs/reliability.md): a crafted file that does not match its checkpoint's manifest is
corruption (the checkpoint is skipped with a warning, the one before it is used); one that matches
its manifest (someone rewrote the manifest too) is refused with a one-line error, exit code 2,
naming the file.
"""

from __future__ import annotations

import os
import pickle
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from _reliability import TINY, child_env, fork_cli, lines, make_image_folder, run_subprocess

from sslbench.core.errors import UserError
from sslbench.train import checkpoint as ckpt


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _evil_raw(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps({"state": _Payload(marker)}))


def _evil_torch(path: Path, marker: Path) -> None:
    torch.save({"state": {}, "param_groups": [], "x": _Payload(marker)}, path)


def test_the_payload_is_live_without_weights_only(tmp_path):
    marker = tmp_path / "control"
    _evil_raw(tmp_path / "evil.pkl", marker)
    with open(tmp_path / "evil.pkl", "rb") as f:
        pickle.load(f)
    assert marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("make", [_evil_raw, _evil_torch], ids=["raw-pickle", "torch-save"])
def test_checkpoint_pickles_are_loaded_weights_only(tmp_path, make):
    from accelerate.utils import load as accelerate_load

    marker = tmp_path / "pwned"
    evil = tmp_path / "random_states_0.pkl"
    make(evil, marker)
    with pytest.raises(UserError, match=r"refusing to load .*random_states_0\.pkl.*not a weights-only"):
        ckpt._load_pickle(evil)
    with pytest.raises(pickle.UnpicklingError):  # what Accelerate's load_state uses, by itself
        accelerate_load(str(evil), map_location="cpu")
    assert not marker.exists()


def test_decode_cache_is_loaded_weights_only(tmp_path):
    from sslbench.data import _read_cache

    marker = tmp_path / "pwned"
    evil = tmp_path / "digits-train-32px-0123.pt"
    _evil_torch(evil, marker)
    assert _read_cache(evil) is None  # ignored (and rebuilt by the caller)
    assert not marker.exists()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 4-step run with checkpoints at steps 2 and 4."""
    root = tmp_path_factory.mktemp("safe")
    data = make_image_folder(root / "data")
    env = child_env(root / "cache")
    run = root / "run"
    r = fork_cli(
        [
            "train",
            "--method",
            "simclr",
            "--data",
            f"imagefolder:{data}",
            "--steps",
            "4",
            *TINY,
            "--set",
            "checkpoint_every=2",
            "--set",
            "quick_knn=false",
            "--output",
            str(run),
        ],
        env,
    ).wait()
    assert r.returncode == 0, r.describe()
    return root, run, env


def test_encoder_loading_reads_safetensors_only(trained, tmp_path):
    from sslbench.config.build import load_encoder

    _, run, _ = trained
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    marker = tmp_path / "pwned"
    _evil_torch(copy / "encoder.safetensors", marker)
    with pytest.raises(UserError, match="not a readable safetensors file"):
        load_encoder(copy)
    assert not marker.exists()
    assert load_encoder(run).num_features == 64  # the real one loads


def test_crafted_checkpoint_files_never_run(trained):
    root, run, env = trained
    cases = {  # name: (file to replace in step-4, rewrite the manifest so it matches)
        "rng-no-manifest": ("random_states_0.pkl", False),
        "optimizer-manifest": ("optimizer.bin", True),
        "rng-manifest": ("random_states_0.pkl", True),
    }
    dirs, markers = {}, {}
    for name, (file, rewrite) in cases.items():
        d = root / f"tampered-{name}"
        shutil.copytree(run, d)
        step4 = d / "checkpoints" / "step-00000004"
        markers[name] = root / f"pwned-{name}"
        _evil_torch(step4 / file, markers[name])
        if rewrite:
            ckpt.write_manifest(step4)
            assert ckpt.verify(step4) is None
        dirs[name] = d
    resume = lambda name: ["train", "--output", str(dirs[name]), "--resume", "--quiet"]  # noqa: E731
    with ThreadPoolExecutor(1) as pool:
        real = pool.submit(run_subprocess, resume("rng-manifest"), env)  # through the real entry point
        children = {name: fork_cli(resume(name), env) for name in ("rng-no-manifest", "optimizer-manifest")}
        results = {name: child.wait() for name, child in children.items()}
        results["rng-manifest"] = real.result()

    for name, marker in markers.items():
        assert not marker.exists(), f"{name}: the crafted pickle ran"

    # not matching the manifest: corrupt -> skipped with a warning, resumed from step 2, finishes
    r = results["rng-no-manifest"]
    assert r.returncode == 0, r.describe()
    warning = [line for line in lines(r.stderr) if line.startswith("warning")]
    assert len(warning) == 1 and "step-00000004" in warning[0], r.describe()
    assert "random_states_0.pkl is truncated" in warning[0] or "random_states_0.pkl is corrupt" in warning[0]
    assert "from step 2" in r.stderr

    # matching the manifest: refused, one line, exit 2, nothing trained
    for name, file in (("optimizer-manifest", "optimizer.bin"), ("rng-manifest", "random_states_0.pkl")):
        r = results[name]
        assert r.returncode == 2, r.describe()
        err = lines(r.stderr)
        assert len(err) == 1 and "Traceback" not in r.stderr, r.describe()
        assert "refusing to load" in err[0] and file in err[0] and "step-00000004" in err[0]
        assert "posix.system" in err[0]  # names what the pickle tried to call
