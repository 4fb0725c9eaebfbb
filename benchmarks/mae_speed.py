"""MAE speed benchmark (not a test): how much cheaper is a masked step than a full ViT step?

In one run, on the same random batch of (B, 3, S, S) images and the same ViT, it measures the
median images/s of:

  (a) MAE's training step: the encoder on the class token and the 25% visible patches, the decoder
      on all patches, the loss, backward and an AdamW step (``methods/mae.py``);
  (b) the ViT's forward + backward over all patches (``forward_features`` and a mean-square loss on
      its tokens, no optimizer step): what a method that encodes whole images pays per view;
  (c) MAE's encoder alone on the visible patches (forward + backward), for the encoder's share of (a);

and prints a/b and c/b. He et al. (2022, Sec. 5) report a 2.8-4.1x wall-clock speed-up of MAE's
pretraining over encoding all patches (ViT-L, decoder 8 x 512, on TPUs).

    python benchmarks/mae_speed.py                                       # CPU: ViT-Tiny, patch 4, 32 px
    python benchmarks/mae_speed.py --backbone vit_base_patch16_224 --image-size 224 --batch 256 \\
        --precision bf16 --decoder 512x8x16                               # GPU: the paper's ViT-B setting
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from sslbench.backbones import create_backbone
from sslbench.core.hostmem import keep_freed_memory
from sslbench.core.method import Batch, StepInfo
from sslbench.methods.mae import MAE, MAEConfig, random_masking


def timed(steps: dict[str, Callable[[], None]], rounds: int, warmup: int, device: torch.device) -> dict[str, float]:
    """Median seconds of each step, the steps interleaved round by round (a, b, c, a, b, c, ...), so
    that a change in the machine's load over the run touches them alike; ``warmup`` rounds first."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(warmup + rounds):
        for name, step in steps.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backbone", default="vit_tiny_patch16_224")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=10, help="timed rounds (one step of each kind per round)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--precision", choices=("no", "bf16"), default="no")
    p.add_argument("--decoder", default=None, metavar="DIMxDEPTHxHEADS", help="decoder size (default: MAEConfig's, 128x2x4)")
    p.add_argument("--mask-ratio", type=float, default=0.75)
    args = p.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        keep_freed_memory()  # as the trainer does on the CPU (sslbench/core/hostmem.py)
    cfg = MAEConfig(mask_ratio=args.mask_ratio)
    if args.decoder:
        cfg.decoder_dim, cfg.decoder_depth, cfg.decoder_heads = (int(v) for v in args.decoder.lower().split("x"))
    cfg.validate()
    torch.manual_seed(0)
    mae = MAE(create_backbone(args.backbone, args.image_size), cfg).to(device).train()
    vit = mae.encoder
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device)
    batch = Batch([x], torch.arange(args.batch), StepInfo(0, 0, 1, 1, 0.0, 0))
    opt_mae = torch.optim.AdamW(mae.parameters(), lr=1e-6)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == "bf16" else contextlib.nullcontext()

    def mae_step() -> None:
        with autocast:
            loss, _ = mae.training_step(batch)
        loss.backward()
        opt_mae.step()
        opt_mae.zero_grad(set_to_none=True)

    def vit_step() -> None:
        with autocast:
            loss = vit.forward_features(x).float().pow(2).mean()
        loss.backward()
        vit.zero_grad(set_to_none=True)

    ids_keep, _, _ = random_masking(batch.uniform(0, mae.grid[0] * mae.grid[1]), mae.keep)

    def encoder_step() -> None:
        with autocast:
            loss = mae.encode_visible(x, ids_keep).float().pow(2).mean()
        loss.backward()
        mae.zero_grad(set_to_none=True)

    seconds = timed({"a": mae_step, "b": vit_step, "c": encoder_step}, args.steps, args.warmup, device)
    results = {name: args.batch / t for name, t in seconds.items()}
    n = mae.grid[0] * mae.grid[1]
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"{args.backbone} at {args.image_size} px ({n} patches of {mae.patch} px, {mae.keep} visible), batch {args.batch}, "
        f"decoder {cfg.decoder_dim}x{cfg.decoder_depth}x{cfg.decoder_heads}, precision {args.precision}, {where}"
    )
    print(f"(a) MAE training step                      {results['a']:10.1f} images/s")
    print(f"(b) ViT forward+backward, all patches      {results['b']:10.1f} images/s")
    print(f"(c) MAE encoder alone, visible patches     {results['c']:10.1f} images/s")
    print(f"a/b = {results['a'] / results['b']:.2f}x   c/b = {results['c'] / results['b']:.2f}x")


if __name__ == "__main__":
    main()
