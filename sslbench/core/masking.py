"""Blockwise masks for masked image modelling in a timm vision transformer (iBOT, DINOv2).

- :func:`block_mask`: BEiT's blockwise masking (Bao et al. 2022, Alg. 1), as iBOT's
  ``ImageFolderMask`` (``pred_shape='block'``) and DINOv2's ``MaskingGenerator`` draw it, from a
  row of counter-based uniforms (:meth:`sslbench.core.method.Batch.uniform`), so a sample's mask is
  a pure function of (seed, epoch, sample): the same on every process and after a resume.
- :func:`block_masks`: one per sample, all at once on the device (no host read);
  :func:`mask_weights`: each masked patch's share of its view.

The masked encoder itself is :func:`sslbench.core.masked_image.encode_patches` (``replace`` and
``mask_token``: iBOT's ``prepare_tokens``/``mask_model``, DINOv2's ``prepare_tokens_with_masks``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor, nn

__all__ = ["BLOCK_DRAWS", "block_draws", "block_mask", "block_masks", "mask_weights", "patch_grid"]

BLOCK_DRAWS = 4  # uniforms one block attempt uses: area, aspect, top, left


def block_mask(u: Iterator[float], grid: tuple[int, int], target: float, min_area: float, max_block: float, aspect: tuple[float, float]) -> Tensor:
    """One (H, W) bool mask of about ``target`` patches in rectangular blocks (BEiT's Alg. 1).

    While fewer than ``target`` patches are masked: up to 10 attempts at a block of area
    ``U(min_area, min(target - masked, max_block))`` and aspect ``exp(U(log a0, log a1))``, side
    ``round(sqrt(area * aspect))`` x ``round(sqrt(area / aspect))``, strictly smaller than the grid,
    at a uniform position; it is kept when it adds between 1 and the remaining count of new
    patches; stop when 10 attempts add none. Each attempt takes :data:`BLOCK_DRAWS` values of
    ``u``; the mask stops early when ``u`` runs out (the callers give it enough for every patch to
    be its own block). iBOT: ``min_area = (min(H, W) // 3) ** 2``, ``max_block`` unbounded;
    DINOv2: ``min_area = 4``, ``max_block = N / 2``, ``target`` an integer.
    """
    h_grid, w_grid = grid
    mask = torch.zeros(h_grid, w_grid, dtype=torch.bool)
    log_a = (math.log(aspect[0]), math.log(aspect[1]))
    count = 0
    try:
        while count < target:
            most = min(target - count, max_block)
            delta = 0
            for _ in range(10):
                area = min_area + next(u) * (most - min_area)
                ratio = math.exp(log_a[0] + next(u) * (log_a[1] - log_a[0]))
                h, w = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
                top_u, left_u = next(u), next(u)
                if w < w_grid and h < h_grid:
                    top, left = int(top_u * (h_grid - h + 1)), int(left_u * (w_grid - w + 1))  # random.randint, inclusive
                    new = h * w - int(mask[top : top + h, left : left + w].sum())
                    if 0 < new <= most:
                        mask[top : top + h, left : left + w] = True
                        delta = new
                if delta > 0:
                    break
            if delta == 0:
                break
            count += delta
    except StopIteration:
        pass
    return mask


def mask_weights(masks: Tensor) -> Tensor:
    """(S, N) bool -> (M,): for each masked patch (row-major, as ``masks.nonzero()``), 1 / the masked
    count of its row: the weights of the official per-view mean over masked patches."""
    per_row = 1.0 / masks.sum(dim=1).clamp(min=1).float()
    return per_row.unsqueeze(1).expand_as(masks)[masks]


def patch_grid(vit: nn.Module, size: int) -> tuple[int, int]:
    """The patch grid (H, W) of a ViT on (size x size) images."""
    p = int(vit.patch_embed.patch_size[0])  # type: ignore[index, union-attr]
    return size // p, size // p


def block_masks(
    u: Tensor, grid: tuple[int, int], targets: Tensor | list[float], min_area: float, max_block: float, aspect: tuple[float, float]
) -> Tensor:
    """:func:`block_mask` for every sample at once, on ``u``'s device and with no value read back to
    the host: ``u`` (B, n) counter-based uniforms (row i feeds sample i), ``targets`` the B patch
    counts to mask -> (B, H * W) bool, row-major. Equal to :func:`block_mask` row by row (tests):
    every sample runs the same fixed number of attempts, ``n // BLOCK_DRAWS`` (attempt k takes the
    row's values ``4k .. 4k + 3``, as the sequential loop does), in float64 as Python's floats; a
    sample that has reached its target, or whose last 10 attempts added nothing, stops changing."""
    b, h_grid, w_grid, dev = u.shape[0], grid[0], grid[1], u.device
    u = u.to(torch.float64)
    target = targets.to(dev, torch.float64) if isinstance(targets, Tensor) else torch.tensor(targets, dtype=torch.float64, device=dev)
    log_a0, log_a1 = math.log(aspect[0]), math.log(aspect[1])
    mask = torch.zeros(b, h_grid, w_grid, dtype=torch.bool, device=dev)
    count = torch.zeros(b, dtype=torch.float64, device=dev)
    fails = torch.zeros(b, dtype=torch.long, device=dev)  # failed attempts in the current round of 10
    done = ~(count < target)
    rows = torch.arange(h_grid, device=dev).view(1, -1, 1)
    cols = torch.arange(w_grid, device=dev).view(1, 1, -1)
    for k in range(u.shape[1] // BLOCK_DRAWS):
        area_u, ratio_u, top_u, left_u = u[:, BLOCK_DRAWS * k : BLOCK_DRAWS * (k + 1)].unbind(dim=1)
        most = torch.clamp(target - count, max=max_block)
        area = min_area + area_u * (most - min_area)
        ratio = torch.exp(log_a0 + ratio_u * (log_a1 - log_a0))
        h, w = torch.round(torch.sqrt(area * ratio)), torch.round(torch.sqrt(area / ratio))
        fits = (w < w_grid) & (h < h_grid)
        top = torch.floor(top_u * (h_grid - h + 1)).view(-1, 1, 1)  # random.randint, inclusive
        left = torch.floor(left_u * (w_grid - w + 1)).view(-1, 1, 1)
        rect = (rows >= top) & (rows < top + h.view(-1, 1, 1)) & (cols >= left) & (cols < left + w.view(-1, 1, 1))
        new = (rect & ~mask).flatten(1).sum(dim=1).to(torch.float64)
        ok = ~done & fits & (new > 0) & (new <= most)
        mask |= rect & ok.view(-1, 1, 1)
        count = count + torch.where(ok, new, 0.0)
        fails = torch.where(ok, 0, fails + 1)
        done = done | (ok & ~(count < target)) | (fails >= 10)
    return mask.flatten(1)


def block_draws(grid: tuple[int, int]) -> int:
    """Uniforms per sample for :func:`block_masks`: enough for every patch to be its own block and
    40 failed attempts."""
    return BLOCK_DRAWS * (grid[0] * grid[1] + 40)
