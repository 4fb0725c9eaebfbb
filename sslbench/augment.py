"""SimCLR/BYOL augmentations, batched on the training device, plus a per-image reference.

Two implementations of one pipeline::

    RandomResizedCrop -> HorizontalFlip -> ColorJitter (random op order) -> Grayscale
        -> GaussianBlur (images >= ``blur_min_size`` only) -> Solarize -> Normalize

* :class:`BatchAugment` works on a whole uint8 ``(B, 3, H, W)`` batch on the training device (CPU
  or CUDA) with no per-sample Python work. All of its randomness comes from
  :func:`counter_uniform`, a counter-based hash of ``(seed, epoch, sample index, view)``, so a
  sample's view does not depend on the batch it sits in, on the number of processes, or on any
  RNG state; a resumed run sees exactly the views of an unbroken one. On an accelerator every
  operation runs on the whole batch and is selected per sample without a host synchronisation;
  on the CPU, where data-dependent shapes are free, each operation runs only on the samples
  that draw it (see :meth:`BatchAugment.apply`); both give the same views.
* :func:`per_image_transform` is the same pipeline built from ``torchvision.transforms.v2``; it is
  the reference the batched path is tested against and the path for data that does not fit in
  memory (its randomness is torch's global RNG, which callers seed per sample).

The batched operations follow torchvision's functional formulas (``adjust_brightness``,
``adjust_contrast``, ``adjust_saturation``, ``adjust_hue``, ``rgb_to_grayscale``,
``gaussian_blur``, ``solarize``, and ``resized_crop`` with antialiased bilinear resizing), so for
the same random parameters the two paths agree to float rounding.

Crop and resize are one separable resampling per sample, ``out = Wy @ image @ Wx^T``, with the
per-sample weights of PyTorch's antialiased bilinear interpolation restricted to the crop box (the
flip reverses the rows of ``Wx``): on an accelerator as two batched matmuls with dense ``(S, H)``
/ ``(S, W)`` matrices, on the CPU as two weighted row gathers (``embedding_bag``) over the few
nonzero taps. Unlike ``grid_sample`` this reproduces ``torchvision``'s ``resized_crop`` also when
the crop is *down*-scaled (antialiasing) and at the crop borders, and a full-image crop of an
``S x S`` image is the identity.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import PIL.Image
import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.transforms import v2 as T
from torchvision.transforms.v2 import functional as TF

from .errors import UserError

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "AugmentConfig",
    "BatchAugment",
    "blur_kernel_size",
    "counter_uniform",
    "eval_batch",
    "eval_resize_size",
    "eval_transform",
    "per_image_transform",
    "resolve_jitter_strength",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

# Images smaller than this (CIFAR, STL at 64 px) get the weaker jitter and the eval view without a
# border crop, following the SimCLR paper's CIFAR recipe.
_SMALL_IMAGE = 96


@dataclass
class AugmentConfig:
    """Strengths and probabilities of the SimCLR/BYOL augmentation pipeline."""

    crop_scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop area range (fraction of the image)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # RandomResizedCrop aspect-ratio range, sampled log-uniformly
    flip_p: float = 0.5  # horizontal flip probability
    jitter_p: float = 0.8  # colour jitter probability
    jitter_strength: float | None = None  # s: brightness=contrast=saturation=0.8s, hue=0.2s; None: 0.5 below 96 px, else 1
    grayscale_p: float = 0.2  # grayscale probability
    blur_p: float = 0.5  # Gaussian blur probability; only applied when image_size >= blur_min_size
    blur_min_size: int = 96  # blur is off for smaller (CIFAR-size) images, as in the SimCLR paper
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # blur sigma range (uniform); kernel ~10% of the side, odd
    solarize_p: float = 0.0  # solarize probability (x -> 1 - x where x >= 0.5, on [0, 1] images)


def _validate(cfg: AugmentConfig, image_size: int) -> None:
    """Raise :class:`UserError` naming the first invalid field of ``cfg`` (or ``image_size``)."""
    if int(image_size) != image_size or image_size < 1:
        raise UserError(f"image_size must be a positive integer, got {image_size!r}")
    for name in ("flip_p", "jitter_p", "grayscale_p", "blur_p", "solarize_p"):
        p = getattr(cfg, name)
        if not 0.0 <= p <= 1.0:
            raise UserError(f"aug.{name} is a probability in [0, 1], got {p}")
    pairs = {"crop_scale": cfg.crop_scale, "crop_ratio": cfg.crop_ratio, "blur_sigma": cfg.blur_sigma}
    for name, pair in pairs.items():
        if len(pair) != 2 or not 0 < pair[0] <= pair[1]:
            raise UserError(f"aug.{name} must be two numbers with 0 < min <= max, got {pair}")
    if cfg.crop_scale[1] > 1:
        raise UserError(f"aug.crop_scale must satisfy 0 < min <= max <= 1, got {cfg.crop_scale}")
    s = cfg.jitter_strength
    if s is not None and not 0 <= s <= 2.5:
        raise UserError(f"aug.jitter_strength must be in [0, 2.5] (hue = 0.2*s <= 0.5) or None, got {s}")
    if cfg.blur_min_size < 1:
        raise UserError(f"aug.blur_min_size must be >= 1, got {cfg.blur_min_size}")


def resolve_jitter_strength(cfg: AugmentConfig, image_size: int) -> float:
    """The colour-jitter strength s: ``cfg.jitter_strength``, or 0.5 below 96 px and 1.0 otherwise."""
    if cfg.jitter_strength is not None:
        return float(cfg.jitter_strength)
    return 0.5 if image_size < _SMALL_IMAGE else 1.0


def blur_kernel_size(image_size: int) -> int:
    """Gaussian blur kernel side: about 10% of the image side, made odd (23 at 224 px, 9 at 96 px)."""
    k = max(int(0.1 * image_size), 1)
    return k if k % 2 == 1 else k + 1


def _blur_enabled(cfg: AugmentConfig, image_size: int) -> bool:
    return image_size >= cfg.blur_min_size and cfg.blur_p > 0


def _jitter_ranges(cfg: AugmentConfig, image_size: int) -> dict[str, tuple[float, float]]:
    """Factor ranges as torchvision's ColorJitter(0.8s, 0.8s, 0.8s, 0.2s) samples them."""
    s = resolve_jitter_strength(cfg, image_size)
    x, h = 0.8 * s, 0.2 * s
    blend = (max(0.0, 1.0 - x), 1.0 + x)
    return {"brightness": blend, "contrast": blend, "saturation": blend, "hue": (-h, h)}


# ---------------------------------------------------------------------------------------------
# Counter-based randomness

_MASK64 = (1 << 64) - 1


def _signed64(v: int) -> int:
    """The int64 with the same 64 low bits as ``v``."""
    v &= _MASK64
    return v - (1 << 64) if v >= (1 << 63) else v


_GAMMA = _signed64(0x9E3779B97F4A7C15)  # splitmix64 increment (golden ratio)
_MIX1 = _signed64(0xBF58476D1CE4E5B9)
_MIX2 = _signed64(0x94D049BB133111EB)


def _mix64_int(z: int) -> int:
    """splitmix64's finaliser on a Python int (exact, unsigned 64-bit)."""
    z &= _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def _shr(z: Tensor, k: int) -> Tensor:
    """Logical right shift of int64 bit patterns (torch's ``>>`` is arithmetic on int64)."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def _mix64(z: Tensor) -> Tensor:
    """splitmix64's finaliser on int64 tensors; int64 multiplication wraps modulo 2**64."""
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    return z ^ _shr(z, 31)


def _stream_key(seed: int, epoch: int, view: int) -> int:
    """Hash the per-call scalars into one 64-bit key (as a signed int64 value)."""
    h = 0
    for v in (seed, epoch, view):
        h = _mix64_int((h ^ (v & _MASK64)) + 0x9E3779B97F4A7C15)
    return _signed64(h)


def counter_uniform(seed: int, epoch: int, index: Tensor, view: int, n: int) -> Tensor:
    """``(B, n)`` float32 uniforms in [0, 1), a pure function of ``(seed, epoch, index[b], view, column)``.

    A vectorised splitmix64: ``(seed, epoch, view)`` are hashed into a key on the host, each
    sample's stream state is ``mix64((index ^ key) + gamma)`` and column ``c`` is
    ``mix64(state + (c + 1) * gamma)``; the top 24 bits become the float. Computed with int64
    ops on ``index.device``, independent of any RNG state and of the other rows; column ``c`` is
    the same whatever ``n`` is.
    """
    if index.dim() != 1:
        raise ValueError(f"index must be 1-D (B,), got shape {tuple(index.shape)}")
    index = index.to(torch.int64)
    state = _mix64((index ^ _stream_key(seed, epoch, view)) + _GAMMA)
    cols = (torch.arange(1, n + 1, device=index.device, dtype=torch.int64) * _GAMMA).unsqueeze(0)
    bits = _shr(_mix64(state.unsqueeze(1) + cols), 40)  # top 24 bits
    return bits.to(torch.float32) * (1.0 / (1 << 24))


# Column layout of one sample's uniforms in BatchAugment.sample_params. Fixed, so adding a
# parameter at the end never changes the existing ones.
_CROP_ATTEMPTS = 10
_COL_CROP = 0  # 4 per attempt: area, log-ratio, top, left
_COL_FLIP = _COL_CROP + 4 * _CROP_ATTEMPTS
_COL_JITTER = _COL_FLIP + 1
_COL_FACTORS = _COL_JITTER + 1  # brightness, contrast, saturation, hue
_COL_ORDER = _COL_FACTORS + 4  # 4 keys, argsorted into the op order
_COL_GRAY = _COL_ORDER + 4
_COL_BLUR = _COL_GRAY + 1
_COL_SIGMA = _COL_BLUR + 1
_COL_SOLARIZE = _COL_SIGMA + 1
_N_COLS = _COL_SOLARIZE + 1

# Colour-jitter op ids, as torchvision's ColorJitter numbers them in ``fn_idx``.
_BRIGHTNESS, _CONTRAST, _SATURATION, _HUE = 0, 1, 2, 3


def _param_dtype(device: torch.device) -> torch.dtype:
    """float64 for crop geometry (as torchvision's Python floats) where the device has it."""
    return torch.float32 if device.type == "mps" else torch.float64


# ---------------------------------------------------------------------------------------------
# Batched operations on float32 images in [0, 1]; per-sample parameters are (B,) tensors.
#
# Cost model (CPU). A 256 x 3 x 32 x 32 batch is 3 MiB, so an elementwise pass is ~0.1-0.2 ms on
# one core, but some kernels are 10-30x slower than that: ``torch.where``, comparisons that
# produce ``bool`` images, ``remainder``/``fmod``, ``aminmax``/``max(dim)``/``argmax`` over the
# channels, ``addcmul`` with two per-sample scalars, and any kernel whose innermost dimension is
# tiny. Image-sized work therefore uses only arithmetic, ``amax``/``amin``, ``clamp``, ``lerp``
# and comparisons written into float tensors (exact 0/1 masks). On the CPU, where data-dependent
# shapes cost nothing, each operation runs only on the samples that need it (``index_select`` /
# ``index_copy_``); on other devices the same operations run on the whole batch and per-sample
# selection is ``torch.where`` or a 0/1 blend factor, with no host sync.


def _to_float(images: Tensor) -> Tensor:
    """uint8 -> float32 in [0, 1] as torchvision's ``to_dtype(scale=True)``; float passes through."""
    if images.is_floating_point():
        return images
    if images.dtype != torch.uint8:
        raise ValueError(f"images must be uint8 or floating point, got {images.dtype}")
    return images.to(torch.float32).mul_(1.0 / 255.0)


def _check_batch(images: Tensor) -> None:
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W), got shape {tuple(images.shape)}")
    if not images.is_floating_point() and images.dtype != torch.uint8:
        raise ValueError(f"images must be uint8 or floating point, got {images.dtype}")


def _per_sample(v: Tensor) -> Tensor:
    """(B,) -> (B, 1, 1, 1) for broadcasting over images."""
    return v.view(-1, 1, 1, 1)


def _filter_geometry(start: Tensor, length: Tensor, out_size: int, flip: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample ``(inv_scale (B, 1), support (B, 1), centre (B, out_size))`` of PyTorch's
    antialiased bilinear resize of the span ``[start, start + length)`` to ``out_size`` (span
    coordinates; ``centre`` reversed where ``flip``)."""
    dtype, device = torch.float32, start.device
    scale = (length.to(dtype) / out_size).unsqueeze(1)  # (B, 1)
    downscale = scale >= 1.0
    inv_scale = torch.where(downscale, 1.0 / scale, torch.ones_like(scale))
    support = torch.where(downscale, scale, torch.ones_like(scale))  # filter half-width, input pixels
    centre = scale * (torch.arange(out_size, device=device, dtype=dtype) + 0.5)  # (B, out)
    if flip is not None:
        centre = torch.where(flip.unsqueeze(1), centre.flip(1), centre)
    return inv_scale, support, centre


def _resample_weights(start: Tensor, length: Tensor, in_size: int, out_size: int, flip: Tensor | None = None, gain: float = 1.0) -> Tensor:
    """``(B, out_size, in_size)`` float32 weights resizing ``[start, start + length)`` to ``out_size``.

    These are PyTorch's antialiased bilinear weights (``interpolate(..., antialias=True,
    align_corners=False)``, what torchvision's ``resize`` uses): output pixel ``i`` is centred at
    ``scale * (i + 0.5)`` in the span, with ``scale = length / out_size``; the triangle filter is
    widened by ``scale`` when downscaling; weights outside the span are dropped and each row is
    renormalised (which is the usual clamp-to-edge when upscaling). Where ``flip``, the rows are
    in reverse order (a mirrored output). Every row sums to ``gain``.
    """
    inv_scale, _, centre = _filter_geometry(start, length, out_size, flip)
    local = torch.arange(in_size, device=start.device, dtype=torch.int64) - start.unsqueeze(1)  # (B, in)
    outside = (local < 0) | (local >= length.unsqueeze(1))
    pos = (local.to(torch.float32) + 0.5).masked_fill_(outside, math.inf)  # dropped taps get weight 0
    dist = (pos.unsqueeze(1) - centre.unsqueeze(2)).mul_(inv_scale.unsqueeze(2)).abs_()  # filter units
    weights = torch.rsub(dist, 1.0).clamp_(min=0.0)  # the triangle filter
    total = weights.sum(dim=2, keepdim=True)
    return weights.div_(total if gain == 1.0 else total.mul_(1.0 / gain))


def _resample_taps(start: Tensor, length: Tensor, out_size: int, flip: Tensor | None = None, gain: float = 1.0) -> tuple[Tensor, Tensor]:
    """The nonzero entries of :func:`_resample_weights`' rows: ``(index, weight)``, both
    ``(K, B, out_size)`` (taps first, so no kernel runs with an inner dimension of size K), with
    ``index`` the input position (int32) and ``K`` the most taps any row has (2 when upscaling).
    ``K`` comes from the data: a host sync off the CPU."""
    inv_scale, support, centre = _filter_geometry(start, length, out_size, flip)
    taps = int(torch.ceil(2.0 * support.max()).item())
    # First tap: the smallest j with j + 0.5 > centre - support; the window then holds every j
    # with |j + 0.5 - centre| < support (a window tap that rounding puts the other way has
    # weight 0 from the filter anyway). Positions are small integers, exact in float32.
    first = torch.floor(centre - support - 0.5).add_(1.0)  # (B, out)
    local = first + torch.arange(taps, device=start.device, dtype=torch.float32).view(-1, 1, 1)  # (K, B, out)
    dist = (local + 0.5 - centre).mul_(inv_scale).abs_()
    weights = torch.rsub(dist, 1.0).clamp_(min=0.0)
    last = (length - 1).to(torch.float32).view(1, -1, 1)
    clamped = torch.minimum(local.clamp(min=0.0), last)
    weights.mul_(torch.eq(local, clamped, out=torch.empty_like(local)))  # taps outside the span: 0
    total = weights.sum(dim=0)
    weights = weights.div_(total if gain == 1.0 else total.mul_(1.0 / gain))
    index = clamped.add_(start.to(torch.float32).view(1, -1, 1)).to(torch.int32)
    return index, weights


def _resized_crop(images: Tensor, top: Tensor, left: Tensor, height: Tensor, width: Tensor, flip: Tensor, size: int, dense: bool = False) -> Tensor:
    """Crop each sample's box, resize it to ``size x size``, mirror it where ``flip``.

    uint8 (scaled by 1/255, folded into the weights) or float images in; contiguous float32
    ``(B, 3, size, size)`` clamped to [0, 1] out (the clamp only removes rounding overshoot: the
    resampling is convex). The resize is separable. By default each direction is one
    ``embedding_bag`` (a weighted gather of image rows, over the few nonzero taps; the tap count
    is read from the data: the CPU's way); with ``dense=True`` (accelerators) it is
    ``Wy @ image @ Wx^T`` as two batched matmuls with dense weight matrices (no host sync).
    """
    b, _, h, w = images.shape
    gain = 1.0 / 255.0 if images.dtype == torch.uint8 else 1.0
    if b == 0:
        return torch.empty((0, 3, size, size), device=images.device)
    if dense:
        return _resized_crop_matmul(images, top, left, height, width, flip, size, gain)
    # Width first, on the transposed image (rows of H pixels); the uint8 -> float conversion does
    # the transposition. Bag (b, c, j) sums the taps of output column j over rows (b, c, w).
    x_t = torch.empty((b, 3, w, h), dtype=torch.float32)
    x_t.copy_(images.transpose(2, 3))
    cols = _gather_rows(x_t.view(-1, h), *_resample_taps(left, width, size, flip=flip), rows_per_image=w)
    # (B, 3, H, S_x), in x_t's memory where it fits: at 224 px a fresh allocation costs more
    # (page faults) than the copy.
    store = x_t.view(-1) if size <= w else torch.empty(b * 3 * h * size, dtype=torch.float32)
    rows = store[: b * 3 * h * size].view(b, 3, h, size).copy_(cols.view(b, 3, size, h).transpose(2, 3))
    out = _gather_rows(rows.view(-1, size), *_resample_taps(top, height, size, gain=gain), rows_per_image=h)
    return out.view(b, 3, size, size).clamp_(0.0, 1.0)


def _gather_rows(table: Tensor, index: Tensor, weights: Tensor, rows_per_image: int) -> Tensor:
    """``out[(b, c, i)] = sum_k weights[k, b, i] * table[(b, c, index[k, b, i])]`` for a table of
    ``B * 3 * rows_per_image`` rows: one ``embedding_bag`` in sum mode."""
    taps, b, size = index.shape
    base = torch.arange(0, b * 3 * rows_per_image, rows_per_image, device=index.device, dtype=index.dtype)
    base = base.view(1, b, 3, 1)
    bags = torch.stack((index.unsqueeze(2) + base).unbind(0), dim=-1).view(-1, taps)  # (B * 3 * S, K)
    per_sample = torch.stack(weights.unsqueeze(2).expand(taps, b, 3, size).unbind(0), dim=-1).view(-1, taps)
    return F.embedding_bag(bags, table, per_sample_weights=per_sample, mode="sum")


def _resized_crop_matmul(images: Tensor, top: Tensor, left: Tensor, height: Tensor, width: Tensor, flip: Tensor, size: int, gain: float) -> Tensor:
    """:func:`_resized_crop` as two batched matmuls with no broadcast copies: the first contracts
    the width of all three channels at once, the second the height, producing the view transposed
    (``(B, S_x, 3, S_y)`` in memory); the clamp writes it out in NCHW order."""
    b, _, h, w = images.shape
    x = images.to(torch.float32, memory_format=torch.contiguous_format)
    wy = _resample_weights(top, height, h, size, gain=gain)  # (B, S, H)
    wx = _resample_weights(left, width, w, size, flip=flip)  # (B, S, W)
    cols = torch.bmm(wx, x.view(b, 3 * h, w).transpose(1, 2))  # (B, S_x, 3 * H)
    out_t = torch.bmm(cols.view(b, 3 * size, h), wy.transpose(1, 2))  # (B, S_x * 3, S_y)
    view = out_t.view(b, size, 3, size).permute(0, 2, 3, 1)  # (B, 3, S_y, S_x)
    return torch.clamp(view, 0.0, 1.0, out=torch.empty((b, 3, size, size), device=images.device))


def _grayscale(x: Tensor) -> Tensor:
    """ITU-R 601-2 luma, (B, 1, H, W), with torchvision's weights and operation order."""
    r, g, b = x.unbind(dim=1)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).unsqueeze(1)


def _blend_(x: Tensor, factor: Tensor, other: Tensor | None) -> Tensor:
    """torchvision's ``_blend`` in place: ``clamp(x * factor + other, 0, 1)``, where ``other`` is
    already ``(1 - factor) * image2`` (``None`` for a black ``image2``). Two roundings, as
    torchvision's; not ``addcmul``, whose CPU kernel is not vectorised when two of its inputs are
    per-sample scalars."""
    x.mul_(factor)
    if other is not None:
        x.add_(other)
    return x.clamp_(0.0, 1.0)


def _adjust_brightness_(x: Tensor, factor: Tensor) -> Tensor:
    """torchvision's ``adjust_brightness`` in place; ``factor`` is (B, 1, 1, 1)."""
    return _blend_(x, factor, None)


def _adjust_contrast_(x: Tensor, factor: Tensor) -> Tensor:
    """torchvision's ``adjust_contrast`` in place: blend with the mean of the grayscale image."""
    mean = _grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
    return _blend_(x, factor, mean.mul_(1.0 - factor))


def _adjust_saturation_(x: Tensor, factor: Tensor) -> Tensor:
    """torchvision's ``adjust_saturation`` in place: blend with the grayscale image."""
    return _blend_(x, factor, _grayscale(x).mul_(1.0 - factor))


def _adjust_hue(x: Tensor, hue: Tensor, out: Tensor | None = None) -> Tensor:
    """Shift each sample's hue by ``hue`` (B,) turns: RGB -> HSV, h += hue, HSV -> RGB.

    The same HSV conversion as torchvision's ``adjust_hue`` (ties resolved r, then g, then b, so
    the hue in sextants is ``h6 = (g - b) / c``, ``2 + (b - r) / c`` or ``4 + (r - g) / c`` with
    chroma ``c = max - min``), and the way back in closed form: channel ``n`` = 5, 3, 1 (r, g, b)
    is ``max - c * A(n + 6 * hue + h6)`` with the 6-periodic trapezoid ``A(k) = clamp(min(k, 4 - k),
    0, 1)`` on [0, 6). With the per-sample offset ``o = (n + 6 * hue) mod 6``, ``k = h6 + o`` lies
    in [-1, 11), where ``A(k) = clamp(2 - ||k - 5| - 3|, 0, 1)`` (A is symmetric about 2 and 5),
    which needs no image-sized ``remainder``. The channel selection uses exact 0/1 float masks
    and ``lerp`` instead of ``torch.where``. Writes into ``out`` (which may be ``x``) if given.
    """
    r, g, b = x.unbind(dim=1)
    maxc, minc = x.amax(dim=1), x.amin(dim=1)
    chroma = maxc - minc
    num = torch.empty_like(x, memory_format=torch.contiguous_format)  # h6 * chroma per max channel
    num_r, num_g, num_b = num.unbind(dim=1)
    torch.sub(g, b, out=num_r)
    torch.sub(b, r, out=num_g).add_(chroma, alpha=2.0)
    torch.sub(r, g, out=num_b).add_(chroma, alpha=4.0)
    is_max = torch.eq(maxc, g, out=torch.empty_like(maxc))  # float 0/1
    h6c = torch.lerp(num_b, num_g, is_max, out=torch.empty_like(maxc))
    h6c = torch.lerp(h6c, num_r, torch.eq(maxc, r, out=is_max), out=h6c)
    offsets = torch.arange(5, 0, -2, device=x.device, dtype=x.dtype)  # 5, 3, 1
    shift = (offsets + 6.0 * hue.unsqueeze(1)).remainder_(6.0).sub_(5.0)  # (B, 3): o - 5
    safe = chroma.clamp_min(torch.finfo(x.dtype).tiny)  # a gray pixel has h6c = 0
    k = torch.addcdiv(shift.view(-1, 3, 1, 1), h6c.unsqueeze(1), safe.unsqueeze(1), out=num)  # k - 5
    neg_a = k.abs_().sub_(3.0).abs_().sub_(2.0).clamp_(-1.0, 0.0)  # -A(k)
    # max - c * A stays in [0, max] (no clamp needed): c * A <= c <= max as min >= 0.
    return torch.addcmul(maxc.unsqueeze(1), chroma.unsqueeze(1), neg_a, out=out)


_JITTER_NAMES = ("brightness", "contrast", "saturation", "hue")


def _color_jitter_grouped(x: Tensor, params: dict[str, Tensor], with_hue: bool) -> Tensor:
    """torchvision's ColorJitter with a per-sample op order, in place, for the CPU.

    Each jittered sample gets exactly its four operations and nothing else: the jittered samples
    are gathered into one buffer, and for each of the 4 slots the buffer is reordered by the op
    the slot holds, so that every op runs in place on one contiguous slice. Uses data-dependent
    shapes (``nonzero``, ``tolist``): host syncs on an accelerator, free on the CPU.
    """
    on = torch.nonzero(params["jitter"]).squeeze(1)
    n = on.numel()
    if n == 0:
        return x
    order = params["jitter_order"].index_select(0, on)  # (n, 4)
    factors = torch.stack([params[name] for name in _JITTER_NAMES], dim=1).index_select(0, on)  # (n, 4)
    rows = torch.arange(n, device=x.device)  # buffer row -> row of `on`
    buf: Tensor | None = None
    spare: Tensor | None = None  # the buffers alternate: no allocation per slot
    for slot in range(4):
        ops = order[:, slot].index_select(0, rows)
        perm = torch.argsort(ops, stable=True)
        rows = rows.index_select(0, perm)
        if buf is None:
            buf = x.index_select(0, on.index_select(0, rows))
        else:
            spare = torch.index_select(buf, 0, perm, out=spare if spare is not None else torch.empty_like(buf))
            buf, spare = spare, buf
        slot_factors = factors.gather(1, order[:, slot : slot + 1]).squeeze(1).index_select(0, rows)  # (n,)
        start = 0
        for op, count in enumerate(torch.bincount(ops, minlength=4).tolist()):
            if count and (op != _HUE or with_hue):
                part, f = buf.narrow(0, start, count), slot_factors.narrow(0, start, count)
                if op == _HUE:
                    _adjust_hue(part, f, out=part)
                else:
                    (_adjust_brightness_, _adjust_contrast_, _adjust_saturation_)[op](part, _per_sample(f))
            start += count
    assert buf is not None
    return x.index_copy_(0, on.index_select(0, rows), buf)


def _blend_slot(x: Tensor, params: dict[str, Tensor], op: Tensor, active: Tensor) -> Tensor:
    """One slot of the dense colour jitter: brightness, contrast or saturation (``op`` (B,), the
    op id each sample's slot holds) where ``active`` (B,), the identity elsewhere and where the
    slot holds hue.

    The three are one blend ``x * f + other`` with ``other = gray * w + m``: per sample ``(w, m)``
    is ``(0, 0)``, ``(0, (1 - f) * mean)`` or ``(1 - f, 0)``, and ``f = 1, other = 0`` (exactly
    the identity on [0, 1] images) elsewhere; these give the grouped path's values exactly."""
    is_op = [active & (op == k) for k in range(3)]
    f = torch.where(
        is_op[_BRIGHTNESS],
        params["brightness"],
        torch.where(
            is_op[_CONTRAST],
            params["contrast"],
            torch.where(is_op[_SATURATION], params["saturation"], torch.ones_like(params["saturation"])),
        ),
    )
    f = _per_sample(f)
    rest = 1.0 - f
    gray = _grayscale(x)
    mean = gray.mean(dim=(1, 2, 3), keepdim=True)
    # gray * w + m: exactly m (contrast) or gray * (1 - f) (saturation), as the grouped path.
    other = torch.addcmul(mean * rest * _per_sample(is_op[_CONTRAST]), gray, rest * _per_sample(is_op[_SATURATION]))
    return _blend_(x, f, other)


def _color_jitter_dense(x: Tensor, params: dict[str, Tensor], with_hue: bool) -> Tensor:
    """The same as :func:`_color_jitter_grouped` on the whole batch, with no host sync (accelerators).

    Each jittered sample's four ops are its blends (brightness, contrast, saturation; see
    :func:`_blend_slot`) before its hue slot, then hue, then its blends after the hue slot. The
    samples are independent, so the batch runs the blends of slots 0-2 where they come before the
    sample's hue, hue once for the batch (kept where jitter is on), then the blends of slots 1-3
    where they come after it: 6 blend passes and one hue instead of hue in each of the 4 slots
    (hue is the costly op: ~15 image-sized passes), with each sample's op order unchanged.
    """
    on, order = params["jitter"], params["jitter_order"]
    if not with_hue:
        for slot in range(4):
            x = _blend_slot(x, params, order[:, slot], on)
        return x
    hue_slot = torch.argmax((order == _HUE).to(torch.uint8), dim=1)  # (B,) the slot holding hue
    for slot in range(3):
        x = _blend_slot(x, params, order[:, slot], on & (hue_slot > slot))
    x = torch.where(_per_sample(on), _adjust_hue(x, params["hue"]), x)
    for slot in range(1, 4):
        x = _blend_slot(x, params, order[:, slot], on & (hue_slot < slot))
    return x


def _masked_apply(x: Tensor, mask: Tensor, fn: Callable[[Tensor, Tensor | None], Tensor], dense: bool) -> Tensor:
    """``x[b] = fn(x[b])`` where ``mask[b]``. ``fn(images, rows)`` gets the selected samples and
    their batch rows (``None``: all of them). Dense: ``fn`` on the whole batch and ``torch.where``
    (no host sync); otherwise only the selected samples are computed, in place."""
    if dense:
        return torch.where(_per_sample(mask), fn(x, None), x)
    rows = torch.nonzero(mask).squeeze(1)
    if rows.numel() == 0:
        return x
    return x.index_copy_(0, rows, fn(x.index_select(0, rows), rows))


def _gaussian_kernels(sigma: Tensor, kernel_size: int) -> Tensor:
    """(B, k) 1-D Gaussian kernels as torchvision's ``_get_gaussian_kernel1d`` builds them."""
    lim = (kernel_size - 1) / (2.0 * math.sqrt(2.0))
    pos = torch.linspace(-lim, lim, steps=kernel_size, dtype=sigma.dtype, device=sigma.device)
    return torch.softmax((pos / sigma.unsqueeze(1)).pow(2).neg(), dim=1)


def _gaussian_blur(x: Tensor, sigma: Tensor, kernel_size: int) -> Tensor:
    """Blur each sample with its own sigma: separable depthwise convolutions, reflect padding."""
    n, c, h, w = x.shape
    pad = kernel_size // 2
    kernels = _gaussian_kernels(sigma.to(x.dtype), kernel_size).repeat_interleave(c, dim=0)  # (B*C, k)
    y = x.reshape(1, n * c, h, w)
    y = F.conv2d(F.pad(y, (0, 0, pad, pad), mode="reflect"), kernels.view(n * c, 1, kernel_size, 1), groups=n * c)
    y = F.conv2d(F.pad(y, (pad, pad, 0, 0), mode="reflect"), kernels.view(n * c, 1, 1, kernel_size), groups=n * c)
    return y.view(n, c, h, w)


def _solarize(x: Tensor) -> Tensor:
    """torchvision's ``solarize`` at 0.5 (``1 - x`` where ``x >= 0.5``), exactly: ``min(x, 1 - x)``."""
    return torch.minimum(x, torch.rsub(x, 1.0))


@functools.lru_cache(maxsize=32)
def _channel_stats(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(3, 1, 1) mean and std tensors, cached per device so a call does not copy host -> device."""
    as_tensor = functools.partial(torch.tensor, device=device, dtype=dtype)
    return as_tensor(mean).view(-1, 1, 1), as_tensor(std).view(-1, 1, 1)


def _normalize(x: Tensor, mean: tuple[float, ...], std: tuple[float, ...], inplace: bool = False) -> Tensor:
    """torchvision's ``normalize``: ``(x - mean) / std`` per channel."""
    m, s = _channel_stats(tuple(mean), tuple(std), x.device, x.dtype)
    return (x.sub_(m) if inplace else x.sub(m)).div_(s)


# ---------------------------------------------------------------------------------------------
# The batched pipeline


class BatchAugment:
    """The SimCLR/BYOL training view of a uint8 batch, computed on the batch's device.

    Args:
        cfg: augmentation strengths and probabilities.
        image_size: output side S.
        mean, std: normalisation (ImageNet's by default).
    """

    def __init__(
        self,
        cfg: AugmentConfig,
        image_size: int,
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
    ) -> None:
        _validate(cfg, image_size)
        self.cfg = cfg
        self.image_size = int(image_size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.jitter_ranges = _jitter_ranges(cfg, self.image_size)
        self.blur_enabled = _blur_enabled(cfg, self.image_size)
        self.blur_kernel_size = blur_kernel_size(self.image_size)

    def __repr__(self) -> str:
        return f"BatchAugment({self.cfg}, image_size={self.image_size})"

    def sample_params(self, index: Tensor, *, seed: int, epoch: int, view: int, height: int, width: int) -> dict[str, Tensor]:
        """The per-sample random parameters for images of ``height x width``, on ``index.device``.

        Returns (all ``(B,)`` unless noted):

        * ``top``, ``left``, ``height``, ``width``: int64 crop box (torchvision's RandomResizedCrop:
          10 attempts, then the centre-crop fallback clamped to the ratio range);
        * ``flip``: bool;
        * ``jitter``: bool, whether colour jitter is applied; ``brightness``, ``contrast``,
          ``saturation``, ``hue``: float32 factors (drawn for every sample, used where
          ``jitter``); ``jitter_order``: int64 ``(B, 4)``, the op id in each slot (0 brightness,
          1 contrast, 2 saturation, 3 hue, as torchvision's ``fn_idx``);
        * ``grayscale``: bool;
        * ``blur``: bool (all False when the image size is below ``blur_min_size``); ``sigma``:
          float32;
        * ``solarize``: bool.
        """
        cfg = self.cfg
        u = counter_uniform(seed, epoch, index, view, _N_COLS)
        params = self._crop_params(u[:, _COL_CROP:_COL_FLIP], height, width)
        params["flip"] = u[:, _COL_FLIP] < cfg.flip_p
        params["jitter"] = u[:, _COL_JITTER] < cfg.jitter_p
        for i, name in enumerate(("brightness", "contrast", "saturation", "hue")):
            lo, hi = self.jitter_ranges[name]
            params[name] = lo + (hi - lo) * u[:, _COL_FACTORS + i]
        params["jitter_order"] = torch.argsort(u[:, _COL_ORDER : _COL_ORDER + 4], dim=1)
        params["grayscale"] = u[:, _COL_GRAY] < cfg.grayscale_p
        params["blur"] = (u[:, _COL_BLUR] < cfg.blur_p) & self.blur_enabled
        lo, hi = cfg.blur_sigma
        params["sigma"] = lo + (hi - lo) * u[:, _COL_SIGMA]
        params["solarize"] = u[:, _COL_SOLARIZE] < cfg.solarize_p
        return params

    def _crop_params(self, u: Tensor, height: int, width: int) -> dict[str, Tensor]:
        """RandomResizedCrop boxes from ``(B, 40)`` uniforms, all attempts at once."""
        dtype = _param_dtype(u.device)
        u = u.to(dtype).view(-1, _CROP_ATTEMPTS, 4)
        (s_lo, s_hi), (r_lo, r_hi) = self.cfg.crop_scale, self.cfg.crop_ratio
        log_lo, log_hi = math.log(r_lo), math.log(r_hi)
        target_area = height * width * (s_lo + (s_hi - s_lo) * u[..., 0])
        ratio = torch.exp(log_lo + (log_hi - log_lo) * u[..., 1])
        w = torch.round(torch.sqrt(target_area * ratio)).to(torch.int64)
        h = torch.round(torch.sqrt(target_area / ratio)).to(torch.int64)
        fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
        # Offsets uniform over the valid positions, as torch.randint(0, side - crop + 1).
        top = torch.minimum(torch.floor(u[..., 2] * (height - h + 1)).to(torch.int64), height - h)
        left = torch.minimum(torch.floor(u[..., 3] * (width - w + 1)).to(torch.int64), width - w)
        first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # first attempt that fits
        found = fits.any(dim=1)
        fb_top, fb_left, fb_h, fb_w = _fallback_crop(height, width, self.cfg.crop_ratio)
        chosen = {"top": (top, fb_top), "left": (left, fb_left), "height": (h, fb_h), "width": (w, fb_w)}
        return {name: torch.where(found, value.gather(1, first).squeeze(1), fallback) for name, (value, fallback) in chosen.items()}

    def __call__(self, images: Tensor, index: Tensor, *, seed: int, epoch: int, view: int) -> Tensor:
        """Augment a batch.

        Args:
            images: uint8 ``(B, 3, H, W)`` (or float in [0, 1]) on any device.
            index: int64 ``(B,)`` global sample indices (moved to ``images.device`` if elsewhere).
            seed, epoch, view: with ``index``, the only source of randomness.

        Returns:
            float32 ``(B, 3, S, S)``, normalised, on ``images.device``.
        """
        _check_batch(images)
        if index.shape != (images.shape[0],):
            raise ValueError(f"index must be ({images.shape[0]},), got shape {tuple(index.shape)}")
        index = index.to(images.device)
        p = self.sample_params(index, seed=seed, epoch=epoch, view=view, height=images.shape[2], width=images.shape[3])
        return self.apply(images, p, dense=images.device.type != "cpu")

    def apply(self, images: Tensor, params: dict[str, Tensor], *, dense: bool) -> Tensor:
        """The views of ``images`` for the parameters :meth:`sample_params` drew for them.

        Args:
            images: uint8 ``(B, 3, H, W)`` (or float in [0, 1]), on the device of ``params``.
            params: :meth:`sample_params` for these ``B`` images of ``H x W``.
            dense: ``True`` runs every operation on the whole batch and selects per sample with
                ``torch.where`` or 0/1 blend factors: no host synchronisation, what accelerators
                need (``__call__`` uses it off the CPU). ``False`` runs each operation only on the
                samples that draw it, with data-dependent shapes: a fraction of the work, what
                ``__call__`` uses on the CPU. Both give the same views (to float rounding).

        Returns:
            float32 ``(B, 3, S, S)``, normalised, contiguous, on ``images.device``.
        """
        _check_batch(images)
        cfg = self.cfg
        p = params
        x = _resized_crop(images, p["top"], p["left"], p["height"], p["width"], p["flip"], self.image_size, dense)
        if x.shape[0] == 0:
            return x
        if cfg.jitter_p > 0:
            jitter = _color_jitter_dense if dense else _color_jitter_grouped
            x = jitter(x, p, self.jitter_ranges["hue"][1] > 0)
        if cfg.grayscale_p > 0:
            x = _masked_apply(x, p["grayscale"], lambda y, rows: _grayscale(y).expand_as(y), dense)
        if self.blur_enabled:
            k = self.blur_kernel_size

            def blur(y: Tensor, rows: Tensor | None) -> Tensor:
                return _gaussian_blur(y, p["sigma"] if rows is None else p["sigma"].index_select(0, rows), k)

            x = _masked_apply(x, p["blur"], blur, dense)
        if cfg.solarize_p > 0:
            x = _masked_apply(x, p["solarize"], lambda y, rows: _solarize(y), dense)
        return _normalize(x, self.mean, self.std, inplace=True)


def _fallback_crop(height: int, width: int, ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop fallback: the central crop clamped to the ratio range."""
    in_ratio = width / height
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


# ---------------------------------------------------------------------------------------------
# Evaluation view and the per-image (torchvision) reference


def eval_resize_size(image_size: int) -> int:
    """Shorter side before the centre crop: ``image_size / 0.875`` from 96 px up, else ``image_size``."""
    crop_frac = 0.875 if image_size >= _SMALL_IMAGE else 1.0
    return int(math.floor(image_size / crop_frac))


def eval_batch(
    images: Tensor,
    image_size: int,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
) -> Tensor:
    """Evaluation view of a batch: resize the shorter side to :func:`eval_resize_size` (bilinear,
    antialiased), centre-crop ``image_size``, normalise. uint8 ``(B, 3, H, W)`` -> float32
    ``(B, 3, S, S)`` on the same device; the same as :func:`eval_transform` per image."""
    _check_batch(images)
    x = _to_float(images)
    x = TF.resize(x, [eval_resize_size(image_size)], antialias=True)
    x = TF.center_crop(x, [image_size, image_size])
    return _normalize(x, mean, std)


def eval_transform(
    image_size: int,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
) -> Callable[[PIL.Image.Image], Tensor]:
    """Per-image evaluation view (PIL image or uint8 CHW tensor -> float32 (3, S, S)), as :func:`eval_batch`."""
    transform: Callable[[PIL.Image.Image], Tensor] = T.Compose(  # torchvision is untyped (Any)
        [
            T.ToImage(),
            T.ToDtype(torch.float32, scale=True),
            T.Resize(eval_resize_size(image_size), antialias=True),
            T.CenterCrop(image_size),
            T.Normalize(list(mean), list(std)),
            T.ToPureTensor(),
        ]
    )
    return transform


def per_image_transform(
    cfg: AugmentConfig,
    image_size: int,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
) -> Callable[[PIL.Image.Image], Tensor]:
    """The :class:`BatchAugment` pipeline with ``torchvision.transforms.v2``, one image at a time.

    PIL image (or uint8 CHW tensor) -> float32 (3, S, S), normalised. The image is converted to
    float first, as in the batched path. Randomness comes from torch's global RNG: callers seed
    it per sample for determinism.
    """
    _validate(cfg, image_size)
    ranges = _jitter_ranges(cfg, image_size)
    steps: list[T.Transform] = [
        T.ToImage(),
        T.ToDtype(torch.float32, scale=True),
        T.RandomResizedCrop(image_size, scale=cfg.crop_scale, ratio=cfg.crop_ratio, antialias=True),
        T.RandomHorizontalFlip(cfg.flip_p),
        T.RandomApply([T.ColorJitter(**ranges)], p=cfg.jitter_p),
        T.RandomGrayscale(cfg.grayscale_p),
    ]
    if _blur_enabled(cfg, image_size):
        blur = T.GaussianBlur(blur_kernel_size(image_size), sigma=cfg.blur_sigma)
        steps.append(T.RandomApply([blur], p=cfg.blur_p))
    if cfg.solarize_p > 0:
        steps.append(T.RandomSolarize(0.5, p=cfg.solarize_p))
    steps += [T.Normalize(list(mean), list(std)), T.ToPureTensor()]
    transform: Callable[[PIL.Image.Image], Tensor] = T.Compose(steps)  # torchvision is untyped (Any)
    return transform
