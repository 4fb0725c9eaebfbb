"""What a training run says about itself: the start banner and the end summary (stderr, main
process, not with ``--quiet``).

The banner names everything that decides what the run trains and where it goes: the method, the
backbone and its size, the data and its size, the image size and why, the views (sizes and counts;
a ViT's patch size, a masking method's mask ratio), the batch, the budget, the precision, the
devices and the run directory. The summary says where the run is, what it holds
and the command that evaluates it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from sslbench.core.optim import scale_lr
from sslbench.core.rundir import RunDir
from sslbench.train import checkpoint as ckpt

if TYPE_CHECKING:
    from sslbench.train.run_setup import Run

LARGE_BACKBONE_PARAMS = 20_000_000  # backbones this large are made for ImageNet-size images
SMALL_IMAGE_PX = 32  # ... and say so when trained at this size or less


def parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def millions(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 100_000 else f"{n / 1e3:.0f}k"


def image_size_reason(data: str, image_size: int) -> str:
    """Why a run trains at ``image_size``: the data's default, or set."""
    from sslbench.data import default_image_size

    if image_size == default_image_size(data):
        return f"the default for {data.split(':', 1)[0]}; --image-size to change"
    return "set by --image-size or the config"


def _devices(run: Run) -> str:
    device = run.device
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        where = f"{run.world} x {name}" if run.world > 1 else name
    else:
        threads = torch.get_num_threads()
        where = f"cpu ({threads} thread{'s' if threads > 1 else ''}{' each' if run.world > 1 else ''})"
    return f"{where}, {run.world} process{'es' if run.world > 1 else ''}"


def _budget(run: Run) -> str:
    plan, cfg = run.plan, run.cfg
    if run.time_based:
        return f"until the time budget of {cfg.time_budget_s:g}s is spent ({_n(plan.steps_per_epoch, 'step')} per epoch)"
    epochs = plan.total_steps / plan.steps_per_epoch
    text = f"{_n(plan.total_steps, 'step')} = {_n(epochs, 'epoch')} of {_n(plan.steps_per_epoch, 'step')}"
    if cfg.time_budget_s is not None:
        text += f", or the time budget of {cfg.time_budget_s:g}s if spent first"
    return text


def _n(count: float, noun: str) -> str:
    """``1 step``, ``2 steps``, ``1.43 epochs``."""
    shown = f"{count:,}" if isinstance(count, int) or float(count).is_integer() else f"{count:.3g}"
    return f"{shown.removesuffix('.0')} {noun}{'' if count == 1 else 's'}"


def _views(run: Run) -> str:
    """``2 x 16 px + 6 x 8 px per image; ViT patches of 2 px (64 per 16 px view); mask ratio 0.75``:
    the views a step encodes (multi-crop's local crops included), and for a vision transformer its
    patch size and for a masking method its mask ratio, which decide what a step costs."""
    from sslbench.core.heads import patch_side

    groups: list[list[int]] = []  # [size, count] in the method's order
    for spec in run.specs:
        if groups and groups[-1][0] == spec.size:
            groups[-1][1] += 1
        else:
            groups.append([spec.size, 1])
    text = " + ".join(f"{n} x {size} px" for size, n in groups) + " per image"
    patch = patch_side(run.method.encoder)
    if hasattr(run.method.encoder, "patch_embed"):
        size = run.cfg.image_size or patch
        text += f"; ViT patches of {patch} px ({(size // patch) ** 2} per {size} px view)"
    ratio = getattr(getattr(run.method, "cfg", None), "mask_ratio", None)
    if isinstance(ratio, float):
        text += f"; mask ratio {ratio:g} ({ratio:.0%} of the patches masked: removed (MAE, MSN) or replaced by a mask token (SimMIM))"
    return text


def start_banner(run: Run) -> list[str]:
    """The lines printed when a run starts."""
    cfg, plan, method = run.cfg, run.plan, run.method
    assert cfg.image_size is not None
    backbone_n = parameters(method.encoder)
    heads_n = parameters(method) - backbone_n
    split = run.train_split
    where = "in memory" if not hasattr(split, "samples") else "read from disk"
    classes = len(set(split.labels.tolist())) if len(split) else 0
    assert cfg.lr is not None and cfg.lr_scaling is not None
    scaled = f", lr {cfg.lr:g} scaled {cfg.lr_scaling} -> {scale_lr(cfg.lr, plan.global_batch, cfg.lr_scaling):g}"
    lines = [
        f"sslbench: {cfg.method} on {cfg.backbone} ({millions(backbone_n)} parameters; {millions(heads_n)} more in the method's heads)",
        f"  data: {cfg.data}, {len(split):,} training images in {classes} classes ({where})",
        f"  image size: {cfg.image_size} px ({image_size_reason(cfg.data, cfg.image_size)})",
        f"  views: {_views(run)}",
        f"  batch {plan.global_batch} ({cfg.optimizer}{scaled}), {_budget(run)}, warm-up {_n(plan.warmup_steps, 'step')}",
        f"  precision {cfg.precision}{' (fp32)' if cfg.precision == 'no' else ''} on {_devices(run)}",
        f"  output: {run.run_dir}",
    ]
    if cfg.precision == "bf16" and run.device.type == "cpu" and not cpu_has_bf16():
        lines.append(
            "note: this CPU has no native bf16 (AVX512-BF16 or AMX): bf16 autocast is emulated and typically several times "
            "slower than fp32 here; --precision no is faster"
        )
    if backbone_n >= LARGE_BACKBONE_PARAMS and cfg.image_size <= SMALL_IMAGE_PX:
        lines.append(
            f"note: {cfg.backbone} ({millions(backbone_n)} parameters) is made for images of ~224 px; here it trains at "
            f"{cfg.image_size} px ({image_size_reason(cfg.data, cfg.image_size).split(';')[0]}): pass --image-size or larger --data "
            "to give it room, or use a smaller backbone (resnet18)"
        )
    return lines


def cpu_has_bf16() -> bool:
    """Whether the CPU has native bf16 instructions (``avx512_bf16`` or ``amx_bf16`` in /proc/cpuinfo;
    True where that cannot be read: no note is better than a wrong one)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            flags = f.read()
    except OSError:
        return True
    return "avx512_bf16" in flags or "amx_bf16" in flags or "flags" not in flags


def _size(path: Path) -> str:
    try:
        n = path.stat().st_size
    except OSError:
        return "?"
    return f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{n / 2**10:.0f} kB"


def end_summary(run_dir: str | os.PathLike[str]) -> list[str]:
    """The lines printed when a run has finished: where it is, what it holds, how to evaluate it."""
    run = RunDir(run_dir)
    held = []
    for path, what in (
        (run.encoder, "the backbone's weights (timm key names)"),
        (run.method, "the whole method, heads included"),
        (run.results, "what ran: speed, precision, device, quick k-NN"),
        (run.config, "the resolved config"),
        (run.metrics, "loss, lr, images/s per logged step"),
        (run.curves, "the loss and lr curves (sslbench plot)"),
        (run.picture, "test images and their reconstructions"),
        (run.budget, "the budget compare gave the run"),
    ):
        if path.is_file():
            held.append(f"  {path.name:<20} {what} ({_size(path)})")
    if run.trackers.is_dir():
        held.append(f"  {run.trackers.name + '/':<20} the experiment trackers' logs")
    checkpoints = ckpt.list_checkpoints(run.checkpoints)
    if checkpoints:
        held.append(f"  {'checkpoints/':<20} {checkpoints[0].name}: the full training state, to resume or extend the run")
    return [f"saved {run.path}:", *held, f"evaluate it: sslbench eval {run.path} --protocol knn,linear"]
