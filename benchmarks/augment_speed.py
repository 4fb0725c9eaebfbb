"""Speed benchmark (not a test): the batched SimCLR augmentation (`sslbench.core.augment.BatchAugment`).

Prints the median milliseconds to augment one training step's two views:

  * 2 views x 256 images of 32 px (CIFAR-size sources), the configuration of issue 6: a 2-core CPU
    SimCLR step of a narrow ResNet-18 spends ~0.7 s in the backbone, so the two views should cost
    well under ~40 ms for the step to reach >= 0.9 of the backbone's speed;
  * 2 views x 64 images of 224 px from 256 px sources.

On the CPU each figure is taken with 1 and with 2 threads (`torch.set_num_threads`). Variants are
timed interleaved in one process (round robin over repeats) and the medians are reported, both
wall clock and process CPU time (all threads; less sensitive than wall clock to other load on the
machine, whose load average is printed before and after), and the minor page faults per step.
`--ops` also counts the aten operators of one view with torch.profiler.

Page faults: glibc gives freed heap memory back to the OS and serves allocations of more than
its (adaptive) mmap threshold with fresh mappings, so each step's multi-MB temporaries are
faulted in again, which on a virtual machine costs about a quarter of the CPU augmentation
time. `--retain-freed-memory` sets glibc's M_TRIM_THRESHOLD and M_MMAP_THRESHOLD (mallopt) first,
as a CPU trainer process could, to show the step without that cost.

    python benchmarks/augment_speed.py                    # CPU, 1 and 2 threads
    python benchmarks/augment_speed.py --device cuda      # GPU (also 1024 images of 32 px)
"""

from __future__ import annotations

import argparse
import ctypes
import os
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from sslbench.core.augment import AugmentConfig, BatchAugment


@dataclass
class Case:
    name: str
    batch: int
    source: int  # source side (px)
    size: int  # output side (px)


CASES = {
    "32": Case("2 views x 256 x 32 px", 256, 32, 32),
    "224": Case("2 views x 64 x 224 px (256 px sources)", 64, 256, 224),
    "32-1024": Case("2 views x 1024 x 32 px", 1024, 32, 32),
}


def make_step(case: Case, device: torch.device, seed: int = 0) -> Callable[[int], torch.Tensor]:
    """Two SimCLR views of one batch, as the trainer computes them (one BatchAugment per view)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (case.batch, 3, case.source, case.source), dtype=torch.uint8, generator=g)
    images = images.to(device)
    index = torch.arange(case.batch, device=device)
    augs = [BatchAugment(AugmentConfig(), case.size) for _ in range(2)]

    def step(epoch: int) -> torch.Tensor:
        views = [aug(images, index, seed=seed, epoch=epoch, view=v) for v, aug in enumerate(augs)]
        if device.type == "cuda":
            torch.cuda.synchronize()
        return views[-1]

    return step


def count_ops(case: Case, device: torch.device) -> int:
    """aten operators dispatched for one view (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    step = make_step(case, device)
    step(0)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step(1)
    return sum(e.count for e in prof.key_averages() if e.key.startswith("aten::")) // 2


def retain_freed_memory() -> bool:
    """glibc only: keep freed memory in the heap (no trimming) and serve allocations of up to 32 MiB
    from it, so that a step's temporaries are not faulted in again every step."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_trim_threshold, 1 << 30)) and bool(libc.mallopt(m_mmap_threshold, 32 << 20))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--threads", default="1,2", help="CPU thread counts, comma-separated")
    ap.add_argument("--cases", default=None, help=f"comma-separated, of {','.join(CASES)} (default: 32,224; cuda adds 32-1024)")
    ap.add_argument("--repeats", type=int, default=15, help="timed repeats of each variant (the 224 px case: a third)")
    ap.add_argument("--ops", action="store_true", help="also count aten operators per view")
    ap.add_argument("--retain-freed-memory", action="store_true", help="tune glibc's malloc first (see above)")
    args = ap.parse_args()
    if args.retain_freed_memory and not retain_freed_memory():
        raise SystemExit("mallopt is not available (not glibc?)")

    device = torch.device(args.device)
    names = args.cases.split(",") if args.cases else (["32", "224", "32-1024"] if device.type == "cuda" else ["32", "224"])
    threads = [int(t) for t in args.threads.split(",")] if device.type == "cpu" else [torch.get_num_threads()]
    malloc = "glibc malloc retaining freed memory" if args.retain_freed_memory else "default malloc"
    print(f"torch {torch.__version__}, device {device}, {os.cpu_count()} CPU cores, {malloc}, load average {os.getloadavg()}")

    for name in names:
        case = CASES[name]
        step = make_step(case, device)
        repeats = max(3, args.repeats // 3) if case.size > 100 else args.repeats
        walls: dict[int, list[float]] = {t: [] for t in threads}
        cpus: dict[int, list[float]] = {t: [] for t in threads}
        faults: dict[int, list[int]] = {t: [] for t in threads}
        for t in threads:  # warm-up (one-time allocations, caches) with every thread count
            torch.set_num_threads(t)
            step(0)
        for r in range(repeats):
            for t in threads:
                torch.set_num_threads(t)
                f = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                c, w = time.process_time(), time.perf_counter()
                step(r + 1)
                walls[t].append((time.perf_counter() - w) * 1e3)
                cpus[t].append((time.process_time() - c) * 1e3)
                faults[t].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f)
        for t in threads:
            label = f"{t} thread{'s' if t > 1 else ''}" if device.type == "cpu" else device.type
            print(
                f"{case.name:42s} {label:10s} median {statistics.median(walls[t]):9.2f} ms wall"
                f" (min {min(walls[t]):8.2f}), {statistics.median(cpus[t]):9.2f} ms CPU"
                f"  [{1e3 * statistics.median(walls[t]) / (2 * case.batch):7.1f} us/image,"
                f" {statistics.median(faults[t]):7.0f} page faults]"
            )
        if args.ops:
            print(f"{'':42s} aten operators per view: {count_ops(case, device)}")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
