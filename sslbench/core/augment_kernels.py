"""Batched tensor kernels of the augmentation pipeline (private; used by :mod:`sslbench.core.augment`).

Every function works on a whole ``(B, 3, H, W)`` batch with per-sample ``(B,)`` parameters:
crop + resize + flip (:func:`_resized_crop`), colour jitter (:func:`_color_jitter_grouped` on the
CPU, :func:`_color_jitter_dense` on accelerators), grayscale, Gaussian blur, solarize and
normalisation, following torchvision's functional formulas.

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

import torch
import torch.nn.functional as F
from torch import Tensor

# Colour-jitter op ids, as torchvision's ColorJitter numbers them in ``fn_idx``.
_BRIGHTNESS, _CONTRAST, _SATURATION, _HUE = 0, 1, 2, 3

# ---------------------------------------------------------------------------------------------
# Batched operations on float32 images in [0, 1]; per-sample parameters are (B,) tensors.
#
# Cost model (CPU). A 256 x 3 x 32 x 32 batch is 3 MiB, so an elementwise pass is cheap, but some
# kernels are many times slower than that (figures: leaderboards/speed.md): ``torch.where``,
# comparisons that produce ``bool`` images, ``remainder``/``fmod``, ``aminmax``/``max(dim)``/
# ``argmax`` over the channels, ``addcmul`` with two per-sample scalars, and any kernel whose
# innermost dimension is tiny. Image-sized work therefore uses only arithmetic, ``amax``/``amin``, ``clamp``, ``lerp``
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
