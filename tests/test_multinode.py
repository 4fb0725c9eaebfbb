"""Two machines compute what one process computes (issue 32): two "nodes" of one process each on
the loopback address, as ``torchrun --nnodes 2 --node_rank 0|1 --master_addr 127.0.0.1`` starts
them on two machines (gloo), against one process, for SimCLR, MoCo, DINO (2 global + 6 local
crops) and MAE on in-memory digits, and SimCLR on the same digits as tar shards (``shards:DIR``;
what a shard reader could get wrong across nodes, each process's share of a batch, does not depend
on the method, and tests/test_shards.py runs MoCo on shards over 2 processes).

Unlike ``--standalone`` (tests/test_multiprocess.py), each node runs its own torchrun agent, and
the agents meet at node 0's address and port (static rendezvous): the global rank, world size and
``LOCAL_RANK`` come from two launchers, and node 1's process is the main process of its machine but
not of the run (it must not write the run's files). The runs and the comparison are
tests/test_multiprocess.py's (sslbench.testing: 3 steps of batch 16 at 32 px, fp32, seed 3, the
tiny backbones; :func:`sslbench.testing.assert_two_processes_equal_one` and
:func:`~sslbench.testing.assert_ranks_agree`); DINO trains with SGD for the reason given there.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from _backbones import tiny

from sslbench.data.shards import write_shards
from sslbench.testing import (
    CALLBACKS_ENV,
    RANK_STATE_ENV,
    RUN_TIMEOUT_S,
    _driver_command,
    _finished_jobs,
    _job,
    _with_callback,
    assert_ranks_agree,
    assert_two_processes_equal_one,
    child_env,
    resolve_method,
    run_group,
    train_argv,
)

pytestmark = pytest.mark.slow

METHODS = ("simclr", "moco", "dino", "mae")
SGD = ("--optimizer", "sgd", "--lr", "0.05")
METHOD_ARGS = {"dino": SGD}  # AdamW and rounding: see tests/test_multiprocess.py
KEYS = [f"{m}-memory" for m in METHODS] + ["simclr-shards"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def node_command(argv: list[str], node_rank: int, port: int) -> list[str]:
    """One node's launcher: the torchrun line of docs/distributed.md with 1 process per node."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "2",
        "--node_rank",
        str(node_rank),
        "--nproc_per_node",
        "1",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(port),
        *argv,
    ]


class NodeRuns:
    """The 1-process references (one driver process, one after the other) and the 2-node pairs
    (one pair at a time), all started in the background."""

    def __init__(self, root: Path, shards: Path, keys: list[str]) -> None:
        self.root, self.shards = root, shards
        self.env = child_env((), {"PYTHONPATH": str(Path(__file__).parent), "SSLBENCH_CACHE": str(root / "cache")})
        self.pool = ThreadPoolExecutor(max_workers=2)
        jobs = [_job(key, resolve_method(key.split("-")[0]), self.argv(key, 1)) for key in keys]
        self.reference = self.pool.submit(run_group, _driver_command(jobs), self.env, RUN_TIMEOUT_S * len(keys) // 2, root / "reference.log")
        self.pairs = {key: self.pool.submit(self._two_nodes, key) for key in keys}

    def out(self, key: str, world: int) -> Path:
        return self.root / f"{key}-{world}proc"

    def argv(self, key: str, world: int) -> list[str]:
        method, data = key.split("-")
        args = [*METHOD_ARGS.get(method, ()), *(["--data", f"shards:{self.shards}"] if data == "shards" else [])]
        return train_argv(method, self.out(key, world), backbone=tiny(method), args=args)

    def _two_nodes(self, key: str) -> list[subprocess.CompletedProcess[str]]:
        env = {**self.env, RANK_STATE_ENV: str(self.root / f"{key}-ranks")}
        env[CALLBACKS_ENV] = _with_callback(env, "sslbench.testing:SaveRankState")
        job = json.dumps([_job(key, resolve_method(key.split("-")[0]), self.argv(key, 2))])
        port = _free_port()
        with ThreadPoolExecutor(max_workers=2) as nodes:
            launched = [
                nodes.submit(run_group, node_command(["-m", "sslbench.testing", job], r, port), env, RUN_TIMEOUT_S, self.root / f"{key}-node{r}.log")
                for r in range(2)
            ]
            return [f.result() for f in launched]

    def check(self, key: str) -> None:
        ref = self.reference.result(timeout=RUN_TIMEOUT_S * (len(KEYS) + 1))
        assert _finished_jobs(ref.stdout).get(key) == 0, f"1-process run of {key} failed:\n{ref.stderr[-6000:]}"
        nodes = self.pairs[key].result(timeout=RUN_TIMEOUT_S * (len(KEYS) + 1))
        for r, proc in enumerate(nodes):
            assert proc.returncode == 0, f"{key}: node {r} failed (rc={proc.returncode}):\n{proc.stderr[-6000:]}"
        assert_ranks_agree(self.root / f"{key}-ranks")
        assert_two_processes_equal_one(self.out(key, 1), self.out(key, 2))  # (one metrics record a step: only node 0 wrote)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


@pytest.fixture(scope="module")
def runs(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Starts the runs of the keys whose test was collected (all, unless deselected)."""
    wanted = {
        item.callspec.params["key"] for item in request.session.items if getattr(item, "originalname", None) == "test_two_nodes_equal_one_process"
    }
    root = tmp_path_factory.mktemp("multinode")
    shards = root / "digits-shards"
    write_shards("digits", shards, 256, image_size=32, cache_root=root / "cache")
    r = NodeRuns(root, shards, [k for k in KEYS if k in wanted])
    yield r
    r.close()


@pytest.mark.parametrize("key", KEYS)
def test_two_nodes_equal_one_process(runs: NodeRuns, key: str) -> None:
    """``key`` = METHOD-DATA: both nodes end with the same state, and the 2-node run's per-step
    losses and final tensors are the 1-process run's within tests/test_multiprocess.py's tolerance."""
    runs.check(key)
