"""SimCLR/BYOL augmentations, batched on the training device, plus a per-image reference.

Two implementations of one pipeline::

    RandomResizedCrop -> HorizontalFlip -> ColorJitter (random op order) -> Grayscale
        -> GaussianBlur (images >= ``blur_min_size`` only) -> Solarize -> Normalize

* :class:`BatchAugment` works on a whole uint8 ``(B, 3, H, W)`` batch on the training device (CPU
  or CUDA) with no per-sample Python work and no host synchronisation. All of its randomness
  comes from :func:`counter_uniform`, a counter-based hash of ``(seed, epoch, sample index,
  view)``, so a sample's view does not depend on the batch it sits in, on the number of
  processes, or on any RNG state; a resumed run sees exactly the views of an unbroken one.
* :func:`per_image_transform` is the same pipeline built from ``torchvision.transforms.v2``; it is
  the reference the batched path is tested against and the path for data that does not fit in
  memory (its randomness is torch's global RNG, which callers seed per sample).

The batched operations follow torchvision's functional formulas (``adjust_brightness``,
``adjust_contrast``, ``adjust_saturation``, ``adjust_hue``, ``rgb_to_grayscale``,
``gaussian_blur``, ``solarize``, and ``resized_crop`` with antialiased bilinear resizing), so for
the same random parameters the two paths agree to float rounding.

Crop and resize are one separable resampling per sample: ``out = Wy @ image @ Wx^T`` with
per-sample ``(S, H)`` / ``(S, W)`` weight matrices holding exactly the weights of PyTorch's
antialiased bilinear interpolation restricted to the crop box (the flip reverses the rows of
``Wx``). Unlike ``grid_sample`` this reproduces ``torchvision``'s ``resized_crop`` also when the
crop is *down*-scaled (antialiasing) and at the crop borders, and a full-image crop of an
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
# Batched operations on float images in [0, 1]; per-sample parameters are (B,) tensors.


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


def _per_sample(v: Tensor) -> Tensor:
    """(B,) -> (B, 1, 1, 1) for broadcasting over images."""
    return v.view(-1, 1, 1, 1)


def _resample_weights(start: Tensor, length: Tensor, in_size: int, out_size: int, dtype: torch.dtype) -> Tensor:
    """``(B, out_size, in_size)`` weights resizing the span ``[start, start + length)`` to ``out_size``.

    These are PyTorch's antialiased bilinear weights (``interpolate(..., antialias=True,
    align_corners=False)``, what torchvision's ``resize`` uses): output pixel ``i`` is centred at
    ``scale * (i + 0.5)`` in the span, with ``scale = length / out_size``; the triangle filter is
    widened by ``scale`` when downscaling; weights outside the span are dropped and each row is
    renormalised (which is the usual clamp-to-edge when upscaling).
    """
    device = start.device
    scale = (length.to(dtype) / out_size).unsqueeze(1)  # (B, 1)
    inv_scale = torch.where(scale >= 1.0, 1.0 / scale, torch.ones_like(scale))
    centre = scale * (torch.arange(out_size, device=device, dtype=dtype) + 0.5)  # (B, out)
    local = torch.arange(in_size, device=device, dtype=torch.int64) - start.unsqueeze(1)  # (B, in)
    inside = (local >= 0) & (local < length.unsqueeze(1))
    dist = (local.to(dtype).unsqueeze(1) + 0.5 - centre.unsqueeze(2)) * inv_scale.unsqueeze(2)
    weights = (1.0 - dist.abs()).clamp_(min=0.0) * inside.unsqueeze(1)
    return weights / weights.sum(dim=2, keepdim=True)


def _resized_crop(
    x: Tensor, top: Tensor, left: Tensor, height: Tensor, width: Tensor, flip: Tensor, size: int
) -> Tensor:
    """Crop each sample's box, resize it to ``size x size`` and mirror it where ``flip``."""
    wy = _resample_weights(top, height, x.shape[2], size, x.dtype)  # (B, S, H)
    wx = _resample_weights(left, width, x.shape[3], size, x.dtype)  # (B, S, W)
    wx = torch.where(flip.view(-1, 1, 1), wx.flip(1), wx)
    rows = torch.matmul(x, wx.transpose(1, 2).unsqueeze(1))  # (B, 3, H, S)
    return torch.matmul(wy.unsqueeze(1), rows)  # (B, 3, S, S)


def _grayscale(x: Tensor) -> Tensor:
    """ITU-R 601-2 luma, (B, 1, H, W), with torchvision's weights and operation order."""
    r, g, b = x.unbind(dim=1)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).unsqueeze(1)


def _adjust_hue(x: Tensor, hue: Tensor) -> Tensor:
    """Shift each sample's hue by ``hue`` (B,) turns: RGB -> HSV, h += hue, HSV -> RGB.

    The same HSV conversion as torchvision's ``adjust_hue`` (ties resolved r, then g, then b);
    the way back uses the closed form ``v - c * clamp(min(k, 4 - k), 0, 1)`` with
    ``k = (n + 6h) mod 6``, n = 5, 3, 1 for r, g, b and chroma ``c = max - min``.
    """
    r, g, b = x.unbind(dim=1)
    maxc, minc = torch.aminmax(x, dim=1)
    chroma = maxc - minc
    safe = torch.where(chroma == 0, torch.ones_like(chroma), chroma)
    h = torch.where(
        maxc == r,
        (g - b) / safe,
        torch.where(maxc == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0),
    )
    h = h.mul_(1.0 / 6.0).add_(1.0).fmod_(1.0)
    h = h.add_(hue.view(-1, 1, 1)).remainder_(1.0)
    h6 = h.mul_(6.0).unsqueeze(1)
    offsets = torch.arange(5, 0, -2, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)  # 5, 3, 1
    k = (h6 + offsets).remainder_(6.0)
    ramp = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
    return (maxc.unsqueeze(1) - chroma.unsqueeze(1) * ramp).clamp_(0.0, 1.0)


def _color_jitter(x: Tensor, params: dict[str, Tensor], with_hue: bool) -> Tensor:
    """torchvision's ColorJitter with a per-sample op order, on the samples with ``params["jitter"]``.

    For each of the 4 slots, every sample applies the op its permutation puts there. Brightness,
    contrast and saturation are all ``clamp(x * f + other * (1 - f), 0, 1)`` with ``other`` = 0,
    the mean of the grayscale image, or the grayscale image, so one blend per slot serves all
    three; hue is computed for the batch and kept where the slot holds it.
    """
    on = params["jitter"]
    order = params["jitter_order"]
    for slot in range(4):
        op = order[:, slot]
        ratio = torch.where(
            op == _BRIGHTNESS,
            params["brightness"],
            torch.where(op == _CONTRAST, params["contrast"], params["saturation"]),
        )
        gray = _grayscale(x)
        mean = gray.mean(dim=(1, 2, 3), keepdim=True)
        other = torch.where(
            _per_sample(op == _CONTRAST), mean, torch.where(_per_sample(op == _SATURATION), gray, 0.0)
        )
        ratio = _per_sample(ratio)
        blended = (x * ratio).add_(other * (1.0 - ratio)).clamp_(0.0, 1.0)
        x = torch.where(_per_sample(on & (op != _HUE)), blended, x)
        if with_hue:
            x = torch.where(_per_sample(on & (op == _HUE)), _adjust_hue(x, params["hue"]), x)
    return x


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


@functools.lru_cache(maxsize=32)
def _channel_stats(
    mean: tuple[float, ...], std: tuple[float, ...], device: torch.device, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """(3, 1, 1) mean and std tensors, cached per device so a call does not copy host -> device."""
    as_tensor = functools.partial(torch.tensor, device=device, dtype=dtype)
    return as_tensor(mean).view(-1, 1, 1), as_tensor(std).view(-1, 1, 1)


def _normalize(x: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """torchvision's ``normalize``: ``(x - mean) / std`` per channel."""
    m, s = _channel_stats(tuple(mean), tuple(std), x.device, x.dtype)
    return x.sub(m).div_(s)


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

    def sample_params(
        self, index: Tensor, *, seed: int, epoch: int, view: int, height: int, width: int
    ) -> dict[str, Tensor]:
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
        return {
            name: torch.where(found, value.gather(1, first).squeeze(1), fallback)
            for name, (value, fallback) in chosen.items()
        }

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
        cfg = self.cfg
        p = self.sample_params(
            index, seed=seed, epoch=epoch, view=view, height=images.shape[2], width=images.shape[3]
        )
        x = _to_float(images)
        x = _resized_crop(x, p["top"], p["left"], p["height"], p["width"], p["flip"], self.image_size)
        x = x.clamp_(0.0, 1.0)  # the resampling is convex; this only removes rounding overshoot
        if cfg.jitter_p > 0:
            x = _color_jitter(x, p, with_hue=self.jitter_ranges["hue"][1] > 0)
        if cfg.grayscale_p > 0:
            x = torch.where(_per_sample(p["grayscale"]), _grayscale(x).expand_as(x), x)
        if self.blur_enabled:
            x = torch.where(_per_sample(p["blur"]), _gaussian_blur(x, p["sigma"], self.blur_kernel_size), x)
        if cfg.solarize_p > 0:
            x = torch.where(_per_sample(p["solarize"]) & (x >= 0.5), 1.0 - x, x)
        return _normalize(x, self.mean, self.std)


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
    return T.Compose(
        [
            T.ToImage(),
            T.ToDtype(torch.float32, scale=True),
            T.Resize(eval_resize_size(image_size), antialias=True),
            T.CenterCrop(image_size),
            T.Normalize(list(mean), list(std)),
            T.ToPureTensor(),
        ]
    )


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
    return T.Compose(steps)
