"""Speed benchmark (not a test): training data from tar shards (``shards:DIR``) vs in memory.

Prints images/s of the trainer's data stream (:func:`sslbench.train.batches.stream_batches`: each
step's global batch with SimCLR's two augmented views, on the CPU) for

  * ``memory``: the image folder decoded once into memory (what ``imagefolder:PATH`` trains from;
    the decoding is not timed, it happens once per run and is cached);
  * ``shards, W workers``: the same images written by ``sslbench shard`` and read per sample,
    decoded by W DataLoader workers every epoch (what ``shards:DIR`` trains from), W = 0 and
    ``--workers``.

Each variant streams ``--steps`` steps of ``--batch`` images (one DataLoader start, as once per
epoch in training), ``--repeats`` times, interleaved round robin in one process; the medians are
printed with the CPU model, the core count and the load average before and after.

    python benchmarks/shard_speed.py                             # /tmp/cifar10 if present, else a generated folder
    python benchmarks/shard_speed.py --data /path/to/imagefolder --size 32 --images 10000
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sslbench.core.augment import AugmentConfig
from sslbench.core.method import ViewSpec
from sslbench.data import ImageSplit, load_split
from sslbench.data.shards import ShardSplit, write_shards
from sslbench.train.batches import Plan, stream_batches


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def generated_folder(root: Path, n: int, side: int) -> Path:
    """``root/{train,test}/c<k>/*.jpg``: ``n`` random JPEGs in 10 classes (quality 90)."""
    rng = np.random.default_rng(0)
    for split, count in (("train", n), ("test", 10)):
        for i in range(count):
            d = root / split / f"c{i % 10}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(d / f"{i:06d}.jpg", quality=90)
    return root


def subset_folder(src: Path, dst: Path, n: int) -> Path:
    """Links to the first ``n`` training images of ``src`` (round robin over classes) and its test split."""
    classes = sorted(p.name for p in (src / "train").iterdir() if p.is_dir())
    files = {c: sorted((src / "train" / c).iterdir()) for c in classes}
    taken = 0
    for k in range(max(len(f) for f in files.values())):
        for c in classes:
            if taken < n and k < len(files[c]):
                (dst / "train" / c).mkdir(parents=True, exist_ok=True)
                os.symlink(files[c][k], dst / "train" / c / files[c][k].name)
                taken += 1
    for c in classes:
        (dst / "test" / c).mkdir(parents=True, exist_ok=True)
        first = sorted((src / "test" / c).iterdir())[0]
        os.symlink(first, dst / "test" / c / first.name)
    return dst


def images_per_s(split: ImageSplit | ShardSplit, specs: list[ViewSpec], plan: Plan, start: int, workers: int) -> float:
    cpu = torch.device("cpu")
    t0 = time.perf_counter()
    n = 0
    for _, views, _ in stream_batches(split, specs, plan, seed=0, start_step=start, rank=0, device=cpu, num_workers=workers, data_on_device=True):
        n += views[0].shape[0]
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=Path("/tmp/cifar10"), help="image folder (PATH/train, PATH/test); generated when absent")
    ap.add_argument("--images", type=int, default=4096, help="training images used (a subset of --data)")
    ap.add_argument("--size", type=int, default=32, help="training image size (px)")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=8, help="steps per timed stream")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers reading the shards")
    ap.add_argument("--shard-size", type=int, default=1000)
    args = ap.parse_args()

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="shard-speed-") as tmp:
        root = Path(tmp)
        if (args.data / "train").is_dir():
            folder, what = subset_folder(args.data, root / "images", args.images), f"{args.data} (first {args.images} training images)"
        else:
            folder, what = generated_folder(root / "images", args.images, args.size), f"{args.images} generated {args.size} px JPEGs"
        write_shards(f"imagefolder:{folder}", root / "shards", args.shard_size, image_size=args.size, cache_root=root / "cache")
        memory = load_split(f"imagefolder:{folder}", "train", args.size, cache_dir=root / "cache")
        shards = load_split(f"shards:{root / 'shards'}", "train", args.size)
        assert isinstance(memory, ImageSplit) and isinstance(shards, ShardSplit)
        specs = [ViewSpec(AugmentConfig(), args.size)] * 2  # SimCLR's two views
        steps_per_epoch = len(memory) // args.batch
        if steps_per_epoch < args.steps:
            raise SystemExit(f"--images {len(memory)} give {steps_per_epoch} steps of {args.batch}; need --steps {args.steps}")

        def stream(split: ImageSplit | ShardSplit, workers: int, start: int) -> float:
            return images_per_s(split, specs, Plan(steps_per_epoch, start + args.steps, 0, args.batch, args.batch), start, workers)

        variants = {
            "memory": lambda start: stream(memory, 0, start),
            "shards, 0 workers": lambda start: stream(shards, 0, start),
            f"shards, {args.workers} workers": lambda start: stream(shards, args.workers, start),
        }
        load0 = os.getloadavg()
        rates: dict[str, list[float]] = {k: [] for k in variants}
        for r in range(args.repeats):
            start = r * steps_per_epoch  # a new epoch each repeat: a new order, new views
            for name, fn in variants.items():
                rates[name].append(fn(start))
        load1 = os.getloadavg()
    print(f"CPU: {cpu_model()} ({os.cpu_count()} cores); torch threads 1; load average {load0[0]:.2f} before, {load1[0]:.2f} after")
    print(f"data: {what}, {args.size} px, batch {args.batch}, {args.steps} steps per stream, 2 SimCLR views, shards of {args.shard_size}")
    for name, values in rates.items():
        print(f"{name:>20}: {statistics.median(values):10.0f} images/s (median of {len(values)}: {', '.join(f'{v:.0f}' for v in values)})")


if __name__ == "__main__":
    main()
