"""Peak memory of one SimCLR training step with and without the gradient cache, on the CPU.

Each configuration runs one full training step (``sslbench train --steps 1``, digits data at 32 px,
fp32, no end-of-run k-NN) in a fresh Python process and reports that process's peak resident set
size (Linux: ``VmHWM`` of ``/proc/self/status``, the process's own high-water mark; elsewhere
``resource.getrusage(RUSAGE_SELF).ru_maxrss``): before training (imports, data, model) and after the
step. The difference is what the step itself needed: activations kept for the backward
pass (without the cache: the whole batch; with it: one chunk) plus gradients and optimizer state.

    python benchmarks/grad_cache_memory.py                       # resnet18, batch 1024, chunk 64
    python benchmarks/grad_cache_memory.py --batch-size 256 --chunk 32 --channels 16,32,64,128

Peak RSS is the honest CPU figure (torch's allocations are invisible to tracemalloc). On a GPU use
``torch.cuda.max_memory_allocated`` instead; the ratio is similar.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

# Runs in the fresh child process: peak RSS before and after one training step. On Linux the
# peak is VmHWM from /proc/self/status: ru_maxrss of a freshly started process also counts the
# parent's resident memory at the fork (the kernel carries the forked copy's high-water mark over
# exec), so a parent that holds torch would hide the figure. Elsewhere: ru_maxrss.
_CHILD = r"""
import json, resource, sys
from sslbench.commands.cli import main

def peak_mb():
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # KiB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 if sys.platform != "darwin" else 1024 * 1024)

import sslbench.train.trainer, sslbench.methods, timm, accelerate  # imports are part of the baseline
before = peak_mb()
rc = main(sys.argv[1:])
print("GRAD_CACHE_MEMORY " + json.dumps({"rc": rc, "baseline_mb": before, "peak_mb": peak_mb()}))
"""


def measure(
    *,
    batch_size: int,
    chunk: int,
    backbone: str = "resnet18",
    image_size: int = 32,
    channels: str | None = None,
    extra_sets: tuple[str, ...] = (),
    threads: int = 2,
    timeout_s: float = 1800,
    cache_dir: str | None = None,
) -> dict[str, float]:
    """Run one SimCLR step with gradient-cache ``chunk`` (0: off) in a fresh process.

    Returns ``{'baseline_mb', 'peak_mb', 'step_mb'}`` (``step_mb = peak - baseline``)."""
    with tempfile.TemporaryDirectory(prefix="sslbench-gcmem-") as tmp:
        # The arguments in flag/value pairs, not one per line:
        # fmt: off
        args = [
            "train", "--method", "simclr", "--backbone", backbone, "--image-size", str(image_size),
            "--steps", "1", "--batch-size", str(batch_size), "--precision", "no", "--quiet",
            "--output", str(Path(tmp) / "run"), "--set", "quick_knn=false",
        ]
        # fmt: on
        if chunk:
            args += ["--grad-cache-chunk", str(chunk)]
        if channels:
            args += ["--set", f"backbone_kwargs.channels={channels}"]
        for s in extra_sets:
            args += ["--set", s]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "CUDA_VISIBLE_DEVICES": ""}  # the CPU, even beside a GPU
        if cache_dir is not None:
            env["SSLBENCH_CACHE"] = cache_dir
        proc = subprocess.run([sys.executable, "-c", _CHILD, *args], env=env, capture_output=True, text=True, timeout=timeout_s, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("GRAD_CACHE_MEMORY ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"measurement run failed (rc={proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    out = json.loads(lines[-1].split(" ", 1)[1])
    if out["rc"] != 0:
        raise RuntimeError(f"sslbench train returned {out['rc']}:\n{proc.stderr[-3000:]}")
    return {"baseline_mb": out["baseline_mb"], "peak_mb": out["peak_mb"], "step_mb": out["peak_mb"] - out["baseline_mb"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--chunk", type=int, default=64, help="gradient-cache chunk (samples)")
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--channels", help="narrow ResNet widths, e.g. 16,32,64,128 (default: the full model)")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    print(f"SimCLR, {a.backbone} at {a.image_size} px, batch {a.batch_size}, fp32, CPU, one training step per fresh process")
    rows = []
    for chunk in (0, a.chunk):
        r = measure(batch_size=a.batch_size, chunk=chunk, backbone=a.backbone, image_size=a.image_size, channels=a.channels, threads=a.threads)
        label = "without gradient cache" if chunk == 0 else f"gradient cache, chunk {chunk}"
        rows.append((label, r))
        print(
            f"{label:<32} peak RSS {r['peak_mb']:8.0f} MiB   (before training {r['baseline_mb']:6.0f} MiB; step {r['step_mb']:8.0f} MiB)", flush=True
        )
    (_, plain), (_, cached) = rows
    print(
        f"the training step needs {plain['step_mb'] / max(cached['step_mb'], 1e-9):.1f}x less memory with the gradient cache"
        f" (peak RSS {plain['peak_mb'] / cached['peak_mb']:.1f}x lower)"
    )


if __name__ == "__main__":
    main()
