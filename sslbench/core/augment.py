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

Layout: this module holds the configuration, :class:`BatchAugment`, the evaluation views and the
per-image reference; the batched tensor kernels (crop/resize, colour jitter, grayscale, blur,
solarize, normalisation) are in :mod:`sslbench.core.augment_kernels` and the counter-based
randomness in :mod:`sslbench.core.augment_random` (:func:`counter_uniform` is re-exported here).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import PIL.Image
import torch
from torch import Tensor
from torchvision.transforms import v2 as T
from torchvision.transforms.v2 import functional as TF

from sslbench.core.augment_kernels import _adjust_hue as _adjust_hue  # re-exported (tests)
from sslbench.core.augment_kernels import (
    _check_batch,
    _color_jitter_dense,
    _color_jitter_grouped,
    _gaussian_blur,
    _grayscale,
    _masked_apply,
    _normalize,
    _resized_crop,
    _solarize,
    _to_float,
)
from sslbench.core.augment_kernels import _resized_crop_matmul as _resized_crop_matmul  # re-exported (tests)
from sslbench.core.augment_random import counter_uniform
from sslbench.core.errors import UserError

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "AugmentConfig",
    "BatchAugment",
    "blur_kernel_size",
    "crop_box",
    "counter_uniform",
    "eval_batch",
    "eval_resize_size",
    "eval_transform",
    "last_box",
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


def _param_dtype(device: torch.device) -> torch.dtype:
    """float64 for crop geometry (as torchvision's Python floats) where the device has it."""
    return torch.float32 if device.type == "mps" else torch.float64


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
        """Augment a batch: :meth:`view_and_box`'s views."""
        return self.view_and_box(images, index, seed=seed, epoch=epoch, view=view)[0]

    def view_and_box(self, images: Tensor, index: Tensor, *, seed: int, epoch: int, view: int) -> tuple[Tensor, Tensor]:
        """Augment a batch and say where each view came from.

        Args:
            images: uint8 ``(B, 3, H, W)`` (or float in [0, 1]) on any device.
            index: int64 ``(B,)`` global sample indices (moved to ``images.device`` if elsewhere).
            seed, epoch, view: with ``index``, the only source of randomness.

        Returns:
            float32 ``(B, 3, S, S)``, normalised, on ``images.device``, and its :func:`crop_box`
            ``(B, 5)``: the crop and flip of each view.
        """
        _check_batch(images)
        if index.shape != (images.shape[0],):
            raise ValueError(f"index must be ({images.shape[0]},), got shape {tuple(index.shape)}")
        index = index.to(images.device)
        height, width = images.shape[2], images.shape[3]
        p = self.sample_params(index, seed=seed, epoch=epoch, view=view, height=height, width=width)
        box = crop_box(p["top"], p["left"], p["height"], p["width"], p["flip"], height, width)
        return self.apply(images, p, dense=images.device.type != "cpu"), box

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


def crop_box(top: Tensor, left: Tensor, height: Tensor, width: Tensor, flip: Tensor, image_height: int, image_width: int) -> Tensor:
    """Where views come from: float32 ``(B, 5)`` rows (top, left, height, width, flip), the crop box
    as fractions of the source image's ``image_height`` / ``image_width`` (so in [0, 1]) and 1.0
    where the crop was flipped horizontally after resizing (column c of an S px view then shows
    source column ``left + (1 - (c + 0.5) / S) * width`` instead of ``left + (c + 0.5) / S * width``)."""
    rows = [top.float() / image_height, left.float() / image_width, height.float() / image_height, width.float() / image_width]
    return torch.stack([*rows, flip.float()], dim=1)


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
        _RecordedCrop(image_size, scale=cfg.crop_scale, ratio=cfg.crop_ratio, antialias=True),
        _RecordedFlip(cfg.flip_p),
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


class _RecordedCrop(T.RandomResizedCrop):  # type: ignore[misc]  # torchvision is untyped
    """torchvision's RandomResizedCrop that keeps its last box and source size (:func:`last_box`)."""

    last: tuple[int, int, int, int, int, int] = (0, 0, 1, 1, 1, 1)  # top, left, height, width, H, W

    def make_params(self, flat_inputs: list[object]) -> dict[str, object]:
        params: dict[str, object] = super().make_params(flat_inputs)
        size = TF.get_size(flat_inputs[0])
        self.last = (*(int(params[k]) for k in ("top", "left", "height", "width")), int(size[0]), int(size[1]))  # type: ignore[call-overload]
        return params


class _RecordedFlip(T.RandomHorizontalFlip):  # type: ignore[misc]  # torchvision is untyped
    """torchvision's RandomHorizontalFlip that records whether its last call flipped."""

    flipped = False

    def forward(self, *inputs: object) -> object:
        self.flipped = False  # make_params runs only when the flip is drawn
        return super().forward(*inputs)

    def make_params(self, flat_inputs: list[object]) -> dict[str, object]:
        self.flipped = True
        params: dict[str, object] = super().make_params(flat_inputs)
        return params


def last_box(transform: Callable[[PIL.Image.Image], Tensor]) -> Tensor:
    """The :func:`crop_box` row ``(5,)`` of the last view a :func:`per_image_transform` made."""
    steps = transform.transforms  # type: ignore[attr-defined]  # a T.Compose
    crop = next(t for t in steps if isinstance(t, _RecordedCrop))
    flip = next(t for t in steps if isinstance(t, _RecordedFlip))
    top, left, h, w, height, width = (torch.tensor([v]) for v in crop.last)
    return crop_box(top, left, h, w, torch.tensor([float(flip.flipped)]), int(height), int(width))[0]
