"""keep_freed_memory: large freed blocks are reused from the heap instead of being mapped afresh."""

from __future__ import annotations

import platform
import statistics
import subprocess
import sys

import pytest
import torch

from sslbench.config import TrainConfig

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# Allocate, touch and free a 64 MB tensor 20 times; print the minor page faults of each of the last
# 10 rounds (glibc's heap takes a few rounds of aligned allocations to settle). The test compares
# medians: one round that maps a block afresh (CI saw one in ten: 16,384 faults) is not the steady state.
SCRIPT = """
import resource, sys, torch
from sslbench.core.hostmem import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else None
def once():
    torch.empty(16 * 1024 * 1024, dtype=torch.float32).fill_(1.0)
for _ in range(10):
    once()
faults = []
for _ in range(10):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    once()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(applied, *faults)
"""


def _faults(mode: str) -> tuple[str, float]:
    """Whether keep_freed_memory applied, and the median minor page faults of one round."""
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True).stdout.split()
    return out[0], statistics.median(int(f) for f in out[1:])


@pytest.mark.skipif(not GLIBC, reason="keep_freed_memory tunes glibc's malloc; this C library is not glibc")
def test_freed_activations_are_reused_not_page_faulted_in_again() -> None:
    applied, kept = _faults("keep")
    _, default = _faults("default")
    assert applied == "True"
    # default glibc: every 64 MB block is a fresh mmap, ~16,384 faults (4 KiB pages) each time
    assert default > 8000, default
    assert kept < default / 20, (kept, default)


def test_on_by_default_and_can_be_turned_off() -> None:
    assert TrainConfig().keep_freed_memory is True
    assert TrainConfig(keep_freed_memory=False).keep_freed_memory is False


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks CPU training; this machine trains on CUDA")
@pytest.mark.parametrize("keep", [True, False])
def test_cpu_training_follows_the_setting(tmp_path, monkeypatch, keep) -> None:
    import sslbench.train.run_setup as run_setup
    from sslbench.commands.cli import main

    calls = []
    monkeypatch.setattr(run_setup, "keep_freed_memory", lambda: calls.append(1) or True)
    monkeypatch.setenv("SSLBENCH_CACHE", str(tmp_path / "cache"))
    rc = main(
        [
            "train",
            "--method",
            "simclr",
            "--steps",
            "1",
            "--batch-size",
            "16",
            "--train-subset",
            "32",
            "--quiet",
            "--output",
            str(tmp_path / "run"),
            "--set",
            "backbone_kwargs.channels=8,16,32,64",
            "--set",
            "quick_knn=false",
            "--set",
            f"keep_freed_memory={keep}",
        ]
    )
    assert rc == 0
    assert len(calls) == (1 if keep else 0)
