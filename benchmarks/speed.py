"""Speed benchmark (not a test): is training bound by the model's arithmetic or by data handling?

In one run on the current machine it measures the median images/s (training images, two views
each) of:

  (a) the backbone's forward + backward alone on random tensors of the training shapes: the ceiling;
  (b) the full sslbench SimCLR training step (`sslbench.train.trainer.train`) on in-memory data with
      batched augmentation on the training device;
  (c) the same training step fed by the per-image torchvision/DataLoader path (workers decode and
      augment each image), forced with `max_memory_gb=0`;

prints b/a and b/c, and appends the figures with the hardware to `leaderboards/speed.md`.

    python benchmarks/speed.py --data imagefolder:/tmp/cifar10 --configs narrow32       # CPU
    python benchmarks/speed.py --data imagefolder:/tmp/cifar10 --configs narrow32,r50   # GPU
    python benchmarks/speed.py ... --profile   # also: where (b)'s step time goes (torch.profiler)

Images come from an image folder (CIFAR-10 from ../shared/data/cifar10-jpeg by default, extracted
to a temporary directory); the ResNet-50 configuration upsamples them to 224 px.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_TAR = REPO.parent / "shared/data/cifar10-jpeg/cifar10-jpeg.tar.gz"


@dataclass
class Setup:
    name: str
    backbone: str
    backbone_kwargs: dict
    image_size: int
    batch_cpu: int
    batch_gpu: int
    train_subset_cpu: int
    train_subset_gpu: int


SETUPS = {
    "narrow32": Setup("narrow ResNet-18 (16-32-64-128), 32 px", "resnet18", {"channels": (16, 32, 64, 128)}, 32, 256, 1024, 10000, 50000),
    "r18": Setup("ResNet-18 (CIFAR stem), 32 px", "resnet18", {}, 32, 256, 1024, 10000, 50000),
    "r50": Setup("ResNet-50, 224 px", "resnet50", {}, 224, 16, 256, 640, 10000),
}


def hardware() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (1 GPU), {os.cpu_count()} CPU cores"
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, no GPU"


def ceiling(setup: Setup, batch: int, precision: str, channels_last: bool, compile_: bool, repeats: int, device: torch.device) -> float:
    """(a): backbone forward + backward on random (2B, 3, S, S) tensors; images/s counts B."""
    from sslbench.backbones import create_backbone

    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = True  # as the trainer sets it on CUDA
    model = create_backbone(setup.backbone, setup.image_size, **setup.backbone_kwargs).to(device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    if compile_:
        model = torch.compile(model)
    x = torch.randn(2 * batch, 3, setup.image_size, setup.image_size, device=device).contiguous(memory_format=fmt)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=precision == "bf16"):
            out = model(x)
        out.float().square().mean().backward()
        model.zero_grad(set_to_none=True)  # as the trainer does

    for _ in range(3):
        step()
    rates = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        n = max(1, int(2 if device.type == "cpu" else 10))
        for _ in range(n):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        rates.append(n * batch / (time.perf_counter() - t))
    return statistics.median(rates)


def train_argv(
    setup: Setup,
    data: str,
    batch: int,
    subset: int,
    precision: str,
    channels_last: bool,
    compile_: bool,
    per_image: bool,
    steps: int,
    log_every: int,
    workers: int,
    keep_freed: bool,
    out: str,
) -> list[str]:
    """``sslbench`` arguments of a SimCLR training run of ``setup`` writing to ``out``."""
    # The arguments in flag/value pairs, not one per line:
    # fmt: off
    argv = [
        "train", "--method", "simclr", "--backbone", setup.backbone,
        "--data", data, "--image-size", str(setup.image_size), "--batch-size", str(batch),
        "--steps", str(steps), "--precision", precision, "--train-subset", str(subset), "--quiet",
        "--set", f"log_every={log_every}", "--set", f"channels_last={channels_last}",
        "--set", f"compile={compile_}", "--set", "checkpoint_every=0",
        "--set", f"num_workers={workers}", "--set", f"max_memory_gb={0 if per_image else 64}",
        "--set", f"keep_freed_memory={keep_freed}", "--set", "quick_knn=false", "--output", out,
    ]
    # fmt: on
    for k, v in setup.backbone_kwargs.items():
        argv += ["--set", f"backbone_kwargs.{k}=" + (",".join(map(str, v)) if isinstance(v, tuple) else str(v))]
    return argv


def _metrics(out: str) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def _median_rate(out: str) -> float:
    rows = _metrics(out)
    rates = [r["images_per_s"] for r in rows[1:]] or [rows[-1]["images_per_s"]]
    return statistics.median(rates)


def full_step(
    setup: Setup,
    data: str,
    batch: int,
    subset: int,
    precision: str,
    channels_last: bool,
    compile_: bool,
    per_image: bool,
    steps: int,
    log_every: int,
    workers: int,
    keep_freed: bool,
) -> float:
    """(b)/(c): the real trainer; the median of its logged images/s windows after the first."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [
            sys.executable,
            "-m",
            "sslbench",
            *train_argv(setup, data, batch, subset, precision, channels_last, compile_, per_image, steps, log_every, workers, keep_freed, out),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
        return _median_rate(out)


SCOPES = ("sslbench.core.augment", "sslbench.forward", "sslbench.backward", "sslbench.optimizer")


def profile_step(
    setup: Setup, data: str, batch: int, subset: int, precision: str, steps: int, workers: int, keep_freed: bool, device: torch.device
) -> list[str]:
    """Where (b)'s time goes: torch.profiler over an in-process training run of ``steps`` steps.

    Reports the trainer's named ranges (augmentation, forward, backward, optimizer) per step
    against the step's wall time, and the operators with the most self time (CPU time on a CPU,
    kernel time on a GPU). Markdown lines."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from sslbench.commands.cli import main as cli_main

    gpu = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    with tempfile.TemporaryDirectory() as out:
        argv = train_argv(setup, data, batch, subset, precision, True, False, False, steps, steps, workers, keep_freed, out)
        with profile(activities=acts) as prof:
            if cli_main(argv) != 0:
                raise RuntimeError(f"sslbench {' '.join(argv)} failed")
        rows = _metrics(out)
    step_ms = 1000.0 * batch / rows[-1]["images_per_s"]  # one window: all the steps (profiler on)
    events = prof.key_averages()
    lines = [
        f"\nProfile of (b), {setup.name}, batch {batch}, {precision}, {steps} steps under torch.profiler "
        f"(`--profile`): {step_ms:,.1f} ms per step with the profiler on.\n",
        "| range | CPU ms/step | " + ("GPU ms/step | " if gpu else "") + "share of step |",
        "|---|---|" + ("---|" if gpu else "") + "---|",
    ]
    # The host-side range events only: with CUDA activity a range also appears as a GPU-side
    # annotation under the same name, whose span would count its kernels a second time.
    ranges = [e for e in events if e.key in SCOPES and e.device_type == DeviceType.CPU]
    for scope in SCOPES:
        cpu_us = sum(e.cpu_time_total for e in ranges if e.key == scope)
        dev_us = sum(e.device_time_total for e in ranges if e.key == scope)
        main_us = dev_us if gpu else cpu_us
        lines.append(
            f"| {scope.split('.')[1]} | {cpu_us / 1000 / steps:,.1f} | "
            + (f"{dev_us / 1000 / steps:,.1f} | " if gpu else "")
            + f"{main_us / 1000 / steps / step_ms:.0%} |"
        )
    key = "self_device_time_total" if gpu else "self_cpu_time_total"
    ops = sorted((e for e in events if not e.key.startswith("sslbench.") and getattr(e, key) > 0), key=lambda e: -getattr(e, key))
    total = sum(getattr(e, key) for e in ops)
    lines += [
        "",
        f"Top operators by self {'GPU' if gpu else 'CPU'} time over the whole run (setup included):",
        "",
        "| operator | ms/step | share |",
        "|---|---|---|",
    ]
    lines += [f"| `{e.key}` | {getattr(e, key) / 1000 / steps:,.2f} | {getattr(e, key) / total:.1%} |" for e in ops[:12]]
    return lines


def _rate(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}"


def ensure_cifar() -> str:
    if not SHARED_TAR.is_file():
        sys.exit(f"no --data given and {SHARED_TAR} is absent: pass --data imagefolder:PATH")
    root = Path(tempfile.gettempdir()) / "sslbench-bench-cifar10"
    if not (root / "train").is_dir():
        root.mkdir(parents=True, exist_ok=True)
        with tarfile.open(SHARED_TAR) as tar:
            tar.extractall(root, filter="data")
        inner = next(p for p in root.rglob("train") if p.is_dir())
        if inner.parent != root:
            for sub in ("train", "test"):
                (inner.parent / sub).rename(root / sub)
    return f"imagefolder:{root}"


def subset_folder(data: str, per_class: int) -> str:
    """An image folder with the first ``per_class`` training images of each class (symlinks), so
    that large-image setups decode only what they train on."""
    src = Path(data.split(":", 1)[1])
    dst = Path(tempfile.gettempdir()) / f"sslbench-bench-subset-{per_class}"
    if not (dst / "train").is_dir():
        for cls in sorted(p for p in (src / "train").iterdir() if p.is_dir()):
            (dst / "train" / cls.name).mkdir(parents=True, exist_ok=True)
            for f in sorted(cls.iterdir())[:per_class]:
                (dst / "train" / cls.name / f.name).symlink_to(f.resolve())
        (dst / "test").symlink_to((src / "test").resolve())
    return f"imagefolder:{dst}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="data spec (default: CIFAR-10 from ../shared)")
    ap.add_argument("--configs", default="narrow32,r50")
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=0, help="training steps for (b)/(c) (default: 6 windows)")
    ap.add_argument("--compile", action="store_true", help="also measure torch.compile variants of (a) and (b)")
    ap.add_argument("--skip-per-image", action="store_true")
    ap.add_argument(
        "--profile", action="store_true", help="also profile (b): time per step in augmentation, forward, backward, optimizer; top operators"
    )
    ap.add_argument(
        "--default-malloc",
        action="store_true",
        help="leave glibc malloc as it is in (a), (b) and (c) (default: keep_freed_memory, as the trainer does on CPU)",
    )
    ap.add_argument("--workers", type=int, default=2 if not torch.cuda.is_available() else 12)
    ap.add_argument("--out", default=str(REPO / "leaderboards/speed.md"))
    args = ap.parse_args()
    data = args.data or ensure_cifar()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    keep_freed = not args.default_malloc
    if keep_freed and not gpu:
        from sslbench.core.hostmem import keep_freed_memory

        keep_freed_memory()  # what the trainer does on CPU, so (a) and (b) share the allocator
    hw = hardware()
    lines = [
        f"\n## {time.strftime('%Y-%m-%d')} on {hw}\n",
        f"torch {torch.__version__}, precision {args.precision}, channels_last, "
        f"malloc {'default' if args.default_malloc or gpu else 'keep_freed_memory'}, data `{data.split(':')[0]}` (CIFAR-10 JPEG), "
        f"command: `python benchmarks/speed.py {' '.join(sys.argv[1:])}`\n",
        "| setup | batch | (a) ceiling img/s | (b) sslbench img/s | (c) per-image img/s | b/a | b/c |",
        "|---|---|---|---|---|---|---|",
    ]
    profiles: list[str] = []
    for key in args.configs.split(","):
        setup = SETUPS[key]
        batch = setup.batch_gpu if gpu else setup.batch_cpu
        subset = setup.train_subset_gpu if gpu else setup.train_subset_cpu
        log_every = 20 if gpu else 5
        steps = args.steps or log_every * 6
        setup_data = data
        if setup.image_size > 64 and data.startswith("imagefolder:"):
            setup_data = subset_folder(data, max(1, subset // 10))
        variants = [False, True] if args.compile else [False]
        for comp in variants:
            a = ceiling(setup, batch, args.precision, True, comp, args.repeats, device)
            b = full_step(setup, setup_data, batch, subset, args.precision, True, comp, False, steps, log_every, args.workers, keep_freed)
            c = float("nan")
            if not comp and not args.skip_per_image:
                c = full_step(setup, setup_data, batch, subset, args.precision, True, False, True, steps, log_every, args.workers, keep_freed)
            name = setup.name + (" + torch.compile" if comp else "")
            c_txt, bc_txt = ("not run", "") if math.isnan(c) else (_rate(c), f"{b / c:.2f}")  # c is NaN when skipped
            row = f"| {name} | {batch} | {_rate(a)} | {_rate(b)} | {c_txt} | {b / a:.2f} | {bc_txt} |"
            print(row, flush=True)
            lines.append(row)
        if args.profile:
            profiles += profile_step(setup, setup_data, batch, subset, args.precision, 30 if gpu else 10, args.workers, keep_freed, device)
    text = "\n".join(lines + profiles) + "\n"
    out = Path(args.out)
    if not out.exists():
        out.write_text(
            "# Training speed\n\nMedian images/s (training images, two views each) from `benchmarks/speed.py`.\n"
            "(a) backbone forward+backward alone on random tensors, (b) the full sslbench SimCLR step with batched\n"
            "augmentation on the training device, (c) the full step on the per-image DataLoader path.\n"
        )
    with open(out, "a") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
