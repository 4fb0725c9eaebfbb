"""What the method contract hands a training step, through the real trainer: views of several sizes,
the step info (progress, also under a time budget), and per-sample randomness that is the same on
1 or 2 processes and across a kill and resume. The toy methods are in tests/_toy_methods.py."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import _toy_methods
import pytest
import torch
from _reliability import FAULTS, TESTS, child_env, fork_cli, make_image_folder, run_group
from _steps import batch as make_batch
from _steps import info as step_info
from safetensors.torch import load_file

from sslbench.config import build_config
from sslbench.core.heads import encode_views
from sslbench.core.method import cosine_schedule
from sslbench.train.run_setup import setup_run
from sslbench.train.trainer import default_callbacks, train_loop

TINY = ["backbone_kwargs.channels=8,16,32,64", "checkpoint_every=0", "quick_knn=false", "log_every=1", "channels_last=false"]


@pytest.fixture
def toys():
    _toy_methods.register()
    yield _toy_methods.TOYS
    _toy_methods.unregister()


def _run(method: str, tmp_path: Path, *sets: str, steps: int | None = 3):
    flags = {"method": method, "batch_size": 16, "image_size": 32, "precision": "no", "output": str(tmp_path / method)}
    if steps is not None:
        flags["steps"] = steps
    cfg = build_config(flags=flags, sets=[*TINY, *sets])
    run = setup_run(cfg, quiet=True)
    cbs = sorted(default_callbacks(True), key=lambda c: c.order)
    done, _ = train_loop(run, cbs)
    for cb in cbs:
        cb.on_train_end(run, done)
    return run


def test_views_of_two_sizes_reach_the_step_and_are_encoded_per_size(toys, tmp_path):
    run = _run("toy_multicrop", tmp_path)
    assert run.method.seen == [(16, 3, 32, 32)] * 2 + [(16, 3, 16, 16)] * 2
    assert [s.size for s in run.specs] == [32, 32, 16, 16]
    # encode_views: one forward per size, the same features as encoding each view alone (eval mode)
    calls = []
    enc = run.method.encoder.eval()
    handle = enc.register_forward_hook(lambda m, i, o: calls.append(i[0].shape))
    views = [torch.randn(4, 3, s, s) for s in (32, 16, 32, 16)]
    with torch.no_grad():
        together = encode_views(enc, views)
        handle.remove()
        alone = [enc(v) for v in views]
    assert calls == [(8, 3, 32, 32), (8, 3, 16, 16)]
    for a, b in zip(together, alone):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_the_step_info_carries_the_progress(toys, tmp_path):
    run = _run("toy_progress", tmp_path, steps=4)
    assert run.method.seen == [(s, 4, int(s / 4 * 1e6)) for s in range(4)]
    logged = [json.loads(line)["progress"] for line in (tmp_path / "toy_progress" / "metrics.jsonl").read_text().splitlines()]
    assert logged == [0.0, 0.25, 0.5, 0.75]


def test_under_a_time_budget_alone_the_progress_is_the_elapsed_share(toys, tmp_path):
    run = _run("toy_progress", tmp_path, "time_budget_s=4", steps=None)
    progress = [p for _, _, p in run.method.seen]
    assert len(progress) >= 3 and progress[0] == 0
    assert progress == sorted(progress) and 0 < progress[-1] <= 1e6  # moves with the clock, within [0, 1]
    # and a cosine schedule follows it (BYOL's momentum no longer stays at its start value)
    assert cosine_schedule(step_info(3, 2**62, progress=0.5), 0.99, 1.0) == pytest.approx(0.995)
    assert cosine_schedule(step_info(3, 2**62, progress=1.0), 0.99, 1.0) == 1.0
    assert cosine_schedule(step_info(5, 10), 0.99, 1.0) == pytest.approx(0.995)


def test_per_sample_randomness_is_a_function_of_the_sample_not_the_batch():
    idx = torch.tensor([5, 1, 9, 3])
    full = make_batch([torch.zeros(4, 3, 8, 8)], index=idx, seed=7).uniform(0, 6)
    half = make_batch([torch.zeros(2, 3, 8, 8)], index=idx[2:], seed=7).uniform(0, 6)
    assert torch.equal(full[2:], half)
    assert not torch.equal(full, make_batch([torch.zeros(4, 3, 8, 8)], index=idx, seed=8).uniform(0, 6))
    assert not torch.equal(full, make_batch([torch.zeros(4, 3, 8, 8)], index=idx, seed=7).uniform(1, 6))
    backbone = torch.nn.Flatten()
    backbone.num_features = 8  # type: ignore[assignment]
    mask = _toy_methods.ToyMask(backbone).mask  # the mask keeps exactly half of the squares
    m = mask(make_batch([torch.zeros(4, 3, 8, 8)], index=idx))
    assert m.shape == (4, 1, 8, 8) and (m.flatten(1).sum(1) == 32).all()


def _plugin_site(root: Path) -> Path:
    """A site folder whose entry point registers the toys in every process (torchrun's too)."""
    site = root / "site"
    info = site / "sslbench_toys-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: sslbench-toys\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[sslbench.methods]\ntoys = _toy_plugin\n")
    return site


def _args(out: Path, data: Path, *extra: str) -> list[str]:
    args = [
        "train",
        "--method",
        "toy_mask",
        "--steps",
        "6",
        "--batch-size",
        "16",
        "--image-size",
        "16",
        "--precision",
        "no",
        "--data",
        f"imagefolder:{data}",
        "--seed",
        "2",
        "--quiet",
        "--output",
        str(out),
        "--set",
        "deterministic=true",
    ]
    for s in (*TINY, "checkpoint_every=2", *extra):
        args += ["--set", s]
    return args


@pytest.mark.slow
def test_a_masked_method_trains_the_same_on_two_processes_and_after_a_kill(toys, tmp_path):
    data = make_image_folder(tmp_path / "data")
    env = child_env(tmp_path / "cache")
    site = _plugin_site(tmp_path)
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(TESTS), env["PYTHONPATH"]])
    # unbroken, killed after step 3 then resumed (forked children: the toys are registered here)
    ref = fork_cli(_args(tmp_path / "ref", data), env)
    killed = fork_cli(_args(tmp_path / "killed", data), {**env, "SSLBENCH_TEST_KILL_AT": "step:3"})
    assert ref.wait().returncode == 0, ref.wait().describe()
    assert killed.wait().returncode == -9, killed.wait().describe()
    resumed = fork_cli(["train", "--output", str(tmp_path / "killed"), "--resume", "--quiet"], env).wait()
    assert resumed.returncode == 0 and "from step 2" in resumed.stderr, resumed.describe()
    a, b = load_file(str(tmp_path / "ref" / "method.safetensors")), load_file(str(tmp_path / "killed" / "method.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "resumed toy_mask run differs from the unbroken one"
    # two processes (torchrun, gloo): the masks of each sample are the same, so the weights agree
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "sslbench", *_args(tmp_path / "two", data)]
    proc = run_group(cmd, {**env, "SSLBENCH_CALLBACKS": FAULTS}, 420, tmp_path / "two.log")
    assert proc.returncode == 0, proc.stderr[-3000:]
    c = load_file(str(tmp_path / "two" / "method.safetensors"))
    for k in a:
        if a[k].is_floating_point():
            err = (a[k].double() - c[k].double()).abs().max().item()
            assert err <= 1e-5 * max(a[k].abs().max().item(), 0.1) + 1e-7, f"{k}: 2 processes differ by {err}"
    one = [json.loads(x)["masked"] for x in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    two = [json.loads(x)["masked"] for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert one == pytest.approx(two, abs=1e-7) and all(m == 0.5 for m in one)
