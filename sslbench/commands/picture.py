"""The reconstruction picture of a trained run, and the ``sslbench picture RUN_DIR`` command.

For a method that predicts pixels (``Method.supports_reconstruction``, e.g. MAE), the picture is
a PNG grid with one row per test image and four columns: the image, the masked input the model saw
(removed patches grey), the model's reconstruction of every pixel, and the reconstruction with the
visible patches pasted back. :func:`sslbench.commands.pipeline.train_and_score` writes it into the run
directory (``reconstructions.png``) at the end of training; ``sslbench picture`` draws it on
demand. The trainer knows nothing of it: this is the command layer, which asks the trained method
for its reconstructions through :meth:`sslbench.core.method.Method.reconstruct` and writes the file.

The images are ``n`` class-balanced test images (fixed by ``seed``), in the evaluation view
(resize, centre crop, normalise) at the run's image size; the masks are the method's own
per-sample masks for those test indices (epoch 0, ``seed``). Each tile is the image scaled up by an
integer factor (nearest neighbour) to at least :data:`MIN_TILE` px.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor

from sslbench.core.augment import IMAGENET_MEAN, IMAGENET_STD, eval_batch
from sslbench.core.errors import UserError
from sslbench.core.method import Batch, StepInfo
from sslbench.core.registry import register_command
from sslbench.core.rundir import RunDir, write_atomic

__all__ = ["COLUMNS", "HEADER", "MIN_TILE", "PAD", "picture_size", "reconstruction_grid", "supports_picture", "write_picture"]

COLUMNS = ("original", "masked input", "reconstruction", "+ visible patches")
MIN_TILE = 128  # tiles are scaled up (integer factor) to at least this many px
PAD = 2  # px of white between and around the tiles
HEADER = 14  # px of column titles above the tiles
MASKED_GREY = 0.5  # the colour of the removed patches in the masked input, on [0, 1]


def tile_size(image_size: int) -> int:
    """The side of one tile: ``image_size`` times the smallest integer that reaches :data:`MIN_TILE`."""
    return image_size * max(1, math.ceil(MIN_TILE / image_size))


def picture_size(n: int, image_size: int) -> tuple[int, int]:
    """(width, height) in px of the picture of ``n`` images of ``image_size`` px."""
    t = tile_size(image_size)
    return len(COLUMNS) * t + (len(COLUMNS) + 1) * PAD, HEADER + n * t + (n + 1) * PAD


def supports_picture(method_name: str) -> bool:
    """Whether runs of ``method_name`` have a reconstruction picture."""
    from sslbench.core.registry import get_method

    return bool(get_method(method_name).supports_reconstruction)


def _pixels(x: Tensor) -> Tensor:
    """Normalised (B, 3, S, S) -> [0, 1] (B, 3, S, S)."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * std + mean).clamp(0, 1)


def reconstruction_grid(images: Tensor, prediction: Tensor, visible: Tensor) -> Image.Image:
    """The picture: ``images`` and ``prediction`` normalised (B, 3, S, S), ``visible`` (B, 1, S, S)
    of 0/1 -> an RGB image of :func:`picture_size`."""
    x, pred, vis = _pixels(images.float().cpu()), _pixels(prediction.float().cpu()), visible.float().cpu()
    columns = [x, x * vis + MASKED_GREY * (1 - vis), pred, x * vis + pred * (1 - vis)]
    n, s = x.shape[0], x.shape[-1]
    t = tile_size(s)
    width, height = picture_size(n, s)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for c, title in enumerate(COLUMNS):
        draw.text((PAD + c * (t + PAD) + 2, 1), title, fill="black")
    for r in range(n):
        for c, col in enumerate(columns):
            tile = (col[r].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            img = Image.fromarray(tile, "RGB").resize((t, t), Image.Resampling.NEAREST)
            canvas.paste(img, (PAD + c * (t + PAD), HEADER + PAD + r * (t + PAD)))
    return canvas


def _test_images(cfg: Any, n: int, seed: int) -> tuple[Tensor, Tensor]:
    """``n`` class-balanced test images (uint8 (n, 3, H, W)) and their indices in the test split."""
    from sslbench.data import ImageSplit, _fit, balanced_subset, load_split, store_size

    size = int(cfg.image_size)
    split = load_split(cfg.data, "test", size, cache_dir=cfg.cache_dir, max_memory_gb=cfg.max_memory_gb)
    idx = balanced_subset(split.labels, min(n, len(split)), seed)
    if isinstance(split, ImageSplit):
        return split.images[idx], idx
    store = split.size if split.size is not None else store_size(size)
    arrays = [np.asarray(_fit(split.open(int(i)), store)) for i in idx]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous(), idx


def write_picture(run_dir: str | Path, output: str | Path | None = None, *, n: int = 8, seed: int = 0) -> Path:
    """Draw the reconstruction picture of the finished run ``run_dir`` into ``output`` (default
    ``RUN_DIR/reconstructions.png``, written atomically); returns its path. A run of a method that
    does not reconstruct images is a one-line :class:`UserError`."""
    from sslbench.config import load_run_config
    from sslbench.config.build import load_trained_method
    from sslbench.core.registry import METHODS

    if n < 1:
        raise UserError(f"--images must be >= 1, got {n}")
    cfg = load_run_config(run_dir)
    if not supports_picture(cfg.method):
        able = sorted(name for name, cls in METHODS.items() if cls.supports_reconstruction)
        raise UserError(
            f"{run_dir} is a {cfg.method} run; the reconstruction picture needs a method that reconstructs images ({', '.join(able) or 'none registered'})"
        )
    out = Path(output) if output is not None else RunDir(run_dir).picture
    if out.suffix.lower() != ".png":
        raise UserError(f"the picture is a PNG: pass an --output ending in .png, got {out}")
    cfg, method = load_trained_method(run_dir)
    images, idx = _test_images(cfg, n, seed)
    size = int(cfg.image_size)  # type: ignore[arg-type]  # always resolved in a saved config
    x = eval_batch(images, size)
    info = StepInfo(step=0, epoch=0, steps_per_epoch=1, total_steps=1, progress=0.0, seed=seed)
    with torch.no_grad():
        prediction, visible = method.reconstruct(Batch([x], idx, info))
    picture = reconstruction_grid(x, prediction, visible)
    write_atomic(out, lambda tmp: picture.save(tmp, format="PNG"), "pass a writable --output")
    return out


def cmd_picture(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} does not exist")
    out = write_picture(run_dir, args.output, n=args.images, seed=args.seed)
    print(f"wrote {out}", file=sys.stderr)
    return 0


@register_command("picture")
def register_picture(sub: Any) -> None:
    p = sub.add_parser("picture", help="draw a run's test images, masked inputs and reconstructions (MAE) as a PNG")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a finished run directory of a method that reconstructs images (mae)")
    p.add_argument("--output", metavar="FILE.png", help="where to write the PNG (default RUN_DIR/reconstructions.png)")
    p.add_argument("--images", type=int, default=8, help="test images, one per row (default 8)")
    p.add_argument("--seed", type=int, default=0, help="which test images and masks (default 0)")
    p.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_picture)
