"""Bitwise reference of training (not a test): proves a refactor of the trainer or the method
plugins leaves users' results unchanged bit for bit.

For each method it trains 20 steps (seed 0, narrow ResNet-18, 32 px digits, fp32, NCHW, 1 thread,
CPU, deterministic algorithms, a metrics row every step) through the CLI, each in its own
subprocess, and hashes (sha256) ``encoder.safetensors``, ``method.safetensors`` and
``metrics.jsonl`` without its timing fields (the canonical JSON of each row's other fields).

    python benchmarks/bitwise_reference.py --write tests/data/bitwise_reference.json  # store
    python benchmarks/bitwise_reference.py --check tests/data/bitwise_reference.json  # compare

``--check`` prints "same"/"DIFFERENT" per method and artefact and exits 1 on any difference.
The hashes hold on one software and hardware environment (recorded under "environment"): on
another torch version or CPU, regenerate the reference from the code before the refactor.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

METHODS = ("simclr", "moco", "mocov3", "byol", "simsiam")
ARTEFACTS = ("encoder", "method", "metrics")
TIMING_FIELDS = frozenset({"images_per_s", "wall_time_s", "time", "elapsed_s"})  # vary run to run
SETTINGS = ("backbone_kwargs.channels=8,16,32,64", "channels_last=false", "quick_knn=false", "log_every=1")


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def sha256_metrics(path: Path) -> str:
    """The hash of every row of ``metrics.jsonl`` without its timing fields, as canonical JSON."""
    h = hashlib.sha256()
    for line in path.read_text(encoding="utf-8").splitlines():
        row = {k: v for k, v in json.loads(line).items() if k not in TIMING_FIELDS}
        h.update((json.dumps(row, sort_keys=True, separators=(",", ":")) + "\n").encode())
    return h.hexdigest()


def train_and_hash(method: str, work: Path) -> dict[str, str]:
    """Train ``method`` in a fresh subprocess (1 thread, CPU only) and hash its artefacts."""
    run_dir = work / method
    cmd = [
        sys.executable,
        "-m",
        "sslbench",
        "train",
        "--method",
        method,
        "--backbone",
        "resnet18",
        "--steps",
        "20",
        "--batch-size",
        "32",
        "--image-size",
        "32",
        "--precision",
        "no",
        "--seed",
        "0",
        "--output",
        str(run_dir),
        "--quiet",
        "--set",
        f"cache_dir={work / 'cache'}",
    ]
    for setting in SETTINGS:
        cmd += ["--set", setting]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "ACCELERATE_MIXED_PRECISION"):
        env.pop(var, None)
    subprocess.run(cmd, env=env, check=True)
    return {
        "encoder": sha256_file(run_dir / "encoder.safetensors"),
        "method": sha256_file(run_dir / "method.safetensors"),
        "metrics": sha256_metrics(run_dir / "metrics.jsonl"),
    }


def environment() -> dict[str, str]:
    import torch

    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        models = [ln.split(":", 1)[1].strip() for ln in cpuinfo.read_text().splitlines() if ln.startswith("model name")]
        cpu = models[0] if models else cpu
    return {"torch": torch.__version__, "cpu": cpu, "python": platform.python_version()}


def check(stored: dict[str, Any], current: dict[str, Any]) -> bool:
    """Print the comparison; True when every artefact of every method is the same."""
    env = stored.get("environment", {})
    for key in sorted(set(env) | set(current["environment"])):
        was, now = env.get(key), current["environment"].get(key)
        if was != now:
            print(f"note: environment differs: {key} {was!r} (stored) vs {now!r} (here)")
    ok = True
    for method in METHODS:
        for artefact in ARTEFACTS:
            same = stored.get(method, {}).get(artefact) == current[method][artefact]
            ok &= same
            print(f"{method:8} {artefact:8} {'same' if same else 'DIFFERENT'}")
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--write", type=Path, metavar="FILE", help="store the hashes as JSON in FILE")
    group.add_argument("--check", type=Path, metavar="FILE", help="compare with FILE; exit 1 on any difference")
    args = parser.parse_args()
    stored = json.loads(args.check.read_text(encoding="utf-8")) if args.check else None  # fail before training
    result: dict[str, Any] = {"environment": environment()}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sslbench-bitwise-") as tmp:
        for method in METHODS:
            result[method] = train_and_hash(method, Path(tmp))
    print(f"# {len(METHODS)} runs in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    text = json.dumps(result, indent=2) + "\n"
    print(text, end="")
    if args.write:
        args.write.parent.mkdir(parents=True, exist_ok=True)
        args.write.write_text(text, encoding="utf-8")
    return 0 if stored is None or check(stored, result) else 1


if __name__ == "__main__":
    sys.exit(main())
