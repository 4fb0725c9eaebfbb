"""Accuracy benchmark (not a test): SimCLR (or any method) on a CIFAR-10 subset, on the CPU.

The recipe of the spine issue: a 10,000-image class-balanced subset of CIFAR-10's training set,
20 epochs, batch 256, ResNet-18 with channels 16-32-64-128 and a CIFAR stem, bf16, channels_last,
then k-NN (k=200, cosine, temperature 0.1, weighted) on the 10,000 test images. It prints the k-NN
top-1 of the trained and the untrained encoder and the images/s the run trained at.

    python benchmarks/cifar10_knn.py                      # SimCLR, CIFAR-10 from ../shared
    python benchmarks/cifar10_knn.py --methods simclr,moco,byol,simsiam
    python benchmarks/cifar10_knn.py --data imagefolder:/path/to/cifar10 --epochs 5

The CIFAR-10 JPEG copy is extracted from ../shared/data/cifar10-jpeg/cifar10-jpeg.tar.gz into a
temporary directory unless --data is given.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import ensure_cifar, hardware


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="data spec (default: CIFAR-10 JPEG from ../shared)")
    ap.add_argument("--methods", default="simclr")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--subset", type=int, default=10000)
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output", default="runs/bench-cifar10")
    args = ap.parse_args()
    data = args.data or ensure_cifar()
    print(f"hardware: {hardware()}", flush=True)
    for method in args.methods.split(","):
        out = Path(args.output) / f"{method}-seed{args.seed}"
        # The arguments in flag/value pairs, not one per line:
        # fmt: off
        cmd = [
            sys.executable, "-m", "sslbench", "train", "--method", method, "--backbone", "resnet18",
            "--data", data, "--train-subset", str(args.subset), "--epochs", str(args.epochs),
            "--batch-size", str(args.batch_size), "--precision", args.precision, "--seed", str(args.seed),
            "--image-size", "32", "--set", "backbone_kwargs.channels=16,32,64,128", "--output", str(out), "--quiet",
        ]
        # fmt: on
        print("$ " + " ".join(cmd), flush=True)
        t = time.perf_counter()
        subprocess.run(cmd, check=True)
        res = json.loads((out / "results.json").read_text())
        m = res["metrics"]
        print(
            f"{method}: k-NN top-1 {m['knn_top1']:.2f}% (untrained {m['untrained_knn_top1']:.2f}%), "
            f"{res['images_per_s']:.1f} images/s, {res['epochs']} epochs, wall {time.perf_counter() - t:.0f}s",
            flush=True,
        )


if __name__ == "__main__":
    main()
