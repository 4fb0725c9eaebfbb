"""Launch a test module's ``--worker`` entry point as ``world`` gloo processes on one machine and
collect what each rank saved (``rank{r}.pt`` in the output folder): the shared harness of the
tests that compare N processes with one on a method's internals (tests/test_dist.py,
tests/test_moco.py, tests/test_dino.py). The worker's argv is ``--worker RANK WORLD PORT OUT_DIR
[EXTRA...]``."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

import sslbench


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for the process group's rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_gloo_workers(script: str, world: int, out_dir: Path, *extra: str, timeout: float = 150) -> list[dict[str, Any]]:
    """Run ``python script --worker r world port out_dir *extra`` for every rank r (one thread each,
    importing the same sslbench as this process, installed or not), wait for all of them (killing any
    left over), fail with every rank's output when one failed, and return the saved results in rank
    order."""
    port = free_port()
    root = str(Path(sslbench.__file__).resolve().parents[1])
    pythonpath = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": pythonpath}
    procs = [
        subprocess.Popen(
            [sys.executable, script, "--worker", str(r), str(world), str(port), str(out_dir), *extra],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(world)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for r, p in enumerate(procs):
        assert p.returncode == 0, f"worker {r} failed (rc={p.returncode}):\n" + "\n".join(logs)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(world)]
