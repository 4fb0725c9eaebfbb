"""Tests for the batched augmentation pipeline (sslbench/core/augment.py).

The batched path is checked against torchvision: its random parameters against torchvision's
samplers (statistically), its operations against ``torchvision.transforms.v2.functional`` for
the same parameters (to float rounding), and the whole pipeline against the per-image
torchvision reference (statistically).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import PIL.Image
import pytest
import torch
from torchvision import transforms as T1
from torchvision.transforms import v2 as T
from torchvision.transforms.v2 import functional as TF

from sslbench.core.augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    AugmentConfig,
    BatchAugment,
    _adjust_hue,
    _resized_crop,
    _resized_crop_matmul,
    blur_kernel_size,
    counter_uniform,
    eval_batch,
    eval_resize_size,
    eval_transform,
    per_image_transform,
    resolve_jitter_strength,
)
from sslbench.core.errors import UserError

NO_NORM = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}  # output stays in [0, 1]
OFF = dict(flip_p=0.0, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, solarize_p=0.0)
FULL_CROP = dict(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0))  # on a square image: the whole image


def _images(n: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, h, w), dtype=torch.uint8, generator=g)


def _ks_2samp(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic sup |F_a - F_b|."""
    a, b = np.sort(a), np.sort(b)
    grid = np.concatenate([a, b])
    fa = np.searchsorted(a, grid, side="right") / len(a)
    fb = np.searchsorted(b, grid, side="right") / len(b)
    return float(np.abs(fa - fb).max())


def _ks_crit(n: int, m: int) -> float:
    """KS critical value at alpha = 0.001 (conservative for discrete data)."""
    return 1.95 * math.sqrt((n + m) / (n * m))


def _ks_uniform(x: np.ndarray, lo: float = 0.0, hi: float = 1.0) -> float:
    """One-sample KS statistic against U(lo, hi)."""
    x = np.sort((x - lo) / (hi - lo))
    n = len(x)
    i = np.arange(1, n + 1)
    return float(max((i / n - x).max(), (x - (i - 1) / n).max()))


def _assert_rate(mask: torch.Tensor, p: float, name: str) -> None:
    """Observed rate within 5 binomial standard deviations of p."""
    n = mask.numel()
    rate = mask.float().mean().item()
    tol = 5 * math.sqrt(p * (1 - p) / n) + 1e-12
    assert abs(rate - p) <= tol, f"{name}: rate {rate:.4f}, expected {p} +- {tol:.4f}"


def _denorm(y: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(-1, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(-1, 1, 1)
    return y * std + mean


# ---------------------------------------------------------------------------------------------
# counter_uniform


def _splitmix_reference(seed: int, epoch: int, index: int, view: int, col: int) -> float:
    """The documented hash in plain Python integers (no int64 wrap-around or shift subtleties)."""
    mask = (1 << 64) - 1
    gamma = 0x9E3779B97F4A7C15

    def mix(z: int) -> int:
        z &= mask
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return z ^ (z >> 31)

    key = 0
    for v in (seed, epoch, view):
        key = mix((key ^ (v & mask)) + gamma)
    state = mix(((index & mask) ^ key) + gamma)
    return (mix(state + (col + 1) * gamma) >> 40) / (1 << 24)


def test_counter_uniform_matches_exact_integer_reference():
    # Large and negative indices exercise int64 wrap-around and the logical shifts.
    index = torch.tensor([0, 1, 7, 123456789, 2**62 + 5, -1, -(2**63)], dtype=torch.int64)
    for seed, epoch, view in [(0, 0, 0), (1234, 7, 1), (-5, 2**40, 3)]:
        got = counter_uniform(seed, epoch, index, view, 5)
        assert got.dtype == torch.float32 and got.shape == (len(index), 5)
        want = torch.tensor([[_splitmix_reference(seed, epoch, i, view, c) for c in range(5)] for i in index.tolist()])
        assert torch.equal(got, want)


def test_counter_uniform_is_uniform_and_independent():
    n = 20000
    index = torch.arange(n)
    u = counter_uniform(3, 1, index, 0, 4)
    assert 0.0 <= u.min().item() and u.max().item() < 1.0
    for c in range(4):
        assert _ks_uniform(u[:, c].numpy()) < 1.95 / math.sqrt(n), f"column {c} not uniform"
    others = {
        "next column": u[:, 1],
        "other view": counter_uniform(3, 1, index, 1, 1)[:, 0],
        "other epoch": counter_uniform(3, 2, index, 0, 1)[:, 0],
        "other seed": counter_uniform(4, 1, index, 0, 1)[:, 0],
        "next index": counter_uniform(3, 1, index + 1, 0, 1)[:, 0],
    }
    tol = 5 / math.sqrt(n)
    for name, v in others.items():
        r = torch.corrcoef(torch.stack([u[:, 0], v]))[0, 1].item()
        assert abs(r) < tol, f"correlated with {name}: r={r:.4f}"
        assert not torch.equal(u[:, 0], v)
    # Joint uniformity of (column 0, column 1) on a 10x10 grid: chi-square, 99 dof.
    cells = (u[:, 0] * 10).long() * 10 + (u[:, 1] * 10).long()
    counts = torch.bincount(cells, minlength=100).float()
    chi2 = ((counts - n / 100) ** 2 / (n / 100)).sum().item()
    assert chi2 < 160, f"chi2 {chi2:.1f} (99 dof)"


def test_counter_uniform_is_a_pure_function_of_its_counters():
    index = torch.tensor([5, 9, 2, 1000])
    full = counter_uniform(0, 3, index, 1, 8)
    assert torch.equal(counter_uniform(0, 3, index, 1, 8), full)
    assert torch.equal(counter_uniform(0, 3, index, 1, 3), full[:, :3])  # columns do not depend on n
    assert torch.equal(counter_uniform(0, 3, index[[2, 0]], 1, 8), full[[2, 0]])  # nor on other rows
    torch.manual_seed(0)
    a = counter_uniform(0, 3, index, 1, 8)
    torch.manual_seed(1)
    assert torch.equal(counter_uniform(0, 3, index, 1, 8), a)  # nor on torch's RNG


# ---------------------------------------------------------------------------------------------
# Random parameters vs torchvision's samplers


@pytest.mark.parametrize("height,width", [(32, 32), (24, 64)])
def test_crop_boxes_match_torchvision_distribution(height, width):
    n = 4000
    cfg = AugmentConfig()
    p = BatchAugment(cfg, 32).sample_params(torch.arange(n), seed=0, epoch=0, view=0, height=height, width=width)
    top, left, h, w = (p[k].numpy() for k in ("top", "left", "height", "width"))
    assert (top >= 0).all() and (left >= 0).all() and (h >= 1).all() and (w >= 1).all()
    assert (top + h <= height).all() and (left + w <= width).all()

    torch.manual_seed(0)
    img = torch.zeros(3, height, width)
    ref = np.array([T1.RandomResizedCrop.get_params(img, list(cfg.crop_scale), list(cfg.crop_ratio)) for _ in range(n)])
    rt, rl, rh, rw = ref.T
    stats = {
        "area fraction": (h * w / (height * width), rh * rw / (height * width)),
        "log aspect": (np.log(w / h), np.log(rw / rh)),
        "centre x": ((left + w / 2) / width, (rl + rw / 2) / width),
        "centre y": ((top + h / 2) / height, (rt + rh / 2) / height),
    }
    for name, (ours, theirs) in stats.items():
        d = _ks_2samp(ours, theirs)
        assert d < _ks_crit(n, n), f"{name}: KS {d:.4f} vs torchvision"


def test_crop_fallback_matches_torchvision():
    # No attempt can fit an aspect ratio of 10..20 with this area, so every box is the fallback:
    # torchvision's centre crop clamped to the ratio range.
    cfg = AugmentConfig(crop_scale=(0.9, 1.0), crop_ratio=(10.0, 20.0))
    p = BatchAugment(cfg, 32).sample_params(torch.arange(50), seed=0, epoch=0, view=0, height=40, width=30)
    want = T1.RandomResizedCrop.get_params(torch.zeros(3, 40, 30), [0.9, 1.0], [10.0, 20.0])
    for k, v in zip(("top", "left", "height", "width"), want):
        assert (p[k] == v).all(), k


def test_firing_frequencies_are_binomial():
    n = 20000
    cfg = AugmentConfig(flip_p=0.5, jitter_p=0.8, grayscale_p=0.2, blur_p=0.5, solarize_p=0.3)
    p = BatchAugment(cfg, 96).sample_params(torch.arange(n), seed=1, epoch=0, view=0, height=96, width=96)
    for name, prob in [("flip", 0.5), ("jitter", 0.8), ("grayscale", 0.2), ("blur", 0.5), ("solarize", 0.3)]:
        assert p[name].dtype == torch.bool
        _assert_rate(p[name], prob, name)
    # Probabilities 0 and 1 are exact; blur is off below blur_min_size whatever blur_p says.
    edge = AugmentConfig(flip_p=1.0, jitter_p=0.0, grayscale_p=1.0, blur_p=1.0)
    q = BatchAugment(edge, 32).sample_params(torch.arange(500), seed=1, epoch=0, view=0, height=32, width=32)
    assert q["flip"].all() and q["grayscale"].all() and not q["jitter"].any() and not q["blur"].any()
    assert not q["solarize"].any()
    # The jitter op order is a uniformly random permutation of the 4 ops.
    order = p["jitter_order"]
    assert (order.sort(dim=1).values == torch.arange(4)).all()
    weights = (64, 16, 4, 1)  # a permutation's code in base 4
    codes = (order * torch.tensor(weights)).sum(1)
    perm_codes = [sum(v * m for v, m in zip(perm, weights)) for perm in itertools.permutations(range(4))]
    counts = torch.stack([(codes == c).sum() for c in perm_codes])
    assert counts.sum() == n
    assert (counts - n / 24).abs().max() < 5 * math.sqrt(n / 24 * (23 / 24))


@pytest.mark.parametrize("image_size,strength", [(32, None), (224, None), (64, 2.0), (32, 0.0)])
def test_jitter_factor_ranges_match_torchvision(image_size, strength):
    n = 20000
    cfg = AugmentConfig(jitter_strength=strength)
    s = resolve_jitter_strength(cfg, image_size)
    assert s == (strength if strength is not None else (0.5 if image_size < 96 else 1.0))
    p = BatchAugment(cfg, image_size).sample_params(torch.arange(n), seed=2, epoch=0, view=0, height=8, width=8)
    cj = T.ColorJitter(brightness=0.8 * s, contrast=0.8 * s, saturation=0.8 * s, hue=0.2 * s)
    for name in ("brightness", "contrast", "saturation", "hue"):
        f = p[name]
        assert f.dtype == torch.float32
        rng = getattr(cj, name)
        if rng is None:  # torchvision disables an op whose range is a point: ours is the identity
            assert (f == (0.0 if name == "hue" else 1.0)).all(), name
            continue
        lo, hi = rng
        assert lo - 1e-6 <= f.min().item() and f.max().item() <= hi + 1e-6, name
        assert f.min().item() < lo + 0.002 * (hi - lo) and f.max().item() > hi - 0.002 * (hi - lo), name
        assert _ks_uniform(f.double().numpy(), lo, hi) < 1.95 / math.sqrt(n), name


def test_blur_sigma_range_and_kernel_size():
    n = 20000
    cfg = AugmentConfig(blur_sigma=(0.1, 2.0))
    sigma = BatchAugment(cfg, 96).sample_params(torch.arange(n), seed=0, epoch=1, view=0, height=96, width=96)["sigma"]
    assert 0.1 <= sigma.min().item() and sigma.max().item() <= 2.0
    assert _ks_uniform(sigma.double().numpy(), 0.1, 2.0) < 1.95 / math.sqrt(n)
    assert [blur_kernel_size(s) for s in (96, 112, 160, 224)] == [9, 11, 17, 23]


# ---------------------------------------------------------------------------------------------
# Operations vs torchvision.transforms.v2.functional for the same parameters


def test_resized_crop_and_flip_match_torchvision():
    # 48x40 sources to 32x32 views: crops are up- and downscaled (antialiased), some flipped.
    n, size = 24, 32
    x = _images(n, 48, 40)
    aug = BatchAugment(AugmentConfig(**{**OFF, "flip_p": 0.5}), size, **NO_NORM)
    index = torch.arange(n)
    p = aug.sample_params(index, seed=5, epoch=0, view=0, height=48, width=40)
    got = aug(x, index, seed=5, epoch=0, view=0)
    assert got.shape == (n, 3, size, size) and got.dtype == torch.float32
    assert p["flip"].any() and not p["flip"].all()
    assert (p["height"] > size).any() and (p["height"] < size).any()
    xf = x.float() / 255
    for b in range(n):
        box = [int(p[k][b]) for k in ("top", "left", "height", "width")]
        want = TF.resized_crop(xf[b], *box, size=[size, size], antialias=True)
        if p["flip"][b]:
            want = TF.horizontal_flip(want)
        torch.testing.assert_close(got[b], want, atol=1e-5, rtol=0)


def test_full_crop_without_flip_reproduces_the_image():
    x = _images(4, 32, 32)
    aug = BatchAugment(AugmentConfig(**{**OFF, **FULL_CROP}), 32)
    got = aug(x, torch.arange(4), seed=0, epoch=0, view=0)
    torch.testing.assert_close(_denorm(got), x.float() / 255, atol=1e-6, rtol=0)
    flipped = BatchAugment(AugmentConfig(**{**OFF, **FULL_CROP, "flip_p": 1.0}), 32, **NO_NORM)
    got = flipped(x, torch.arange(4), seed=0, epoch=0, view=0)
    torch.testing.assert_close(got, x.flip(-1).float() / 255, atol=1e-6, rtol=0)


@pytest.mark.parametrize("strength", [0.5, 2.0])
def test_color_jitter_matches_torchvision_per_sample(strength):
    n = 48
    x = _images(n, 16, 16, seed=1)
    cfg = AugmentConfig(**{**OFF, **FULL_CROP, "jitter_p": 0.7, "jitter_strength": strength})
    aug = BatchAugment(cfg, 16, **NO_NORM)
    index = torch.arange(n)
    p = aug.sample_params(index, seed=9, epoch=0, view=0, height=16, width=16)
    got = aug(x, index, seed=9, epoch=0, view=0)
    assert p["jitter"].any() and not p["jitter"].all()
    on_orders = p["jitter_order"][p["jitter"]]
    assert all((on_orders[:, slot] == op).any() for slot in range(4) for op in range(4))  # every op in every slot
    ops = {0: TF.adjust_brightness, 1: TF.adjust_contrast, 2: TF.adjust_saturation, 3: TF.adjust_hue}
    names = {0: "brightness", 1: "contrast", 2: "saturation", 3: "hue"}
    xf = x.float() / 255
    for b in range(n):
        want = xf[b]
        if p["jitter"][b]:
            for op in p["jitter_order"][b].tolist():
                want = ops[op](want, p[names[op]][b].item())
        torch.testing.assert_close(got[b], want, atol=2e-5, rtol=0)


def test_grayscale_and_solarize_match_torchvision():
    x = _images(6, 16, 16, seed=2)
    xf = x.float() / 255
    index = torch.arange(6)
    gray = BatchAugment(AugmentConfig(**{**OFF, **FULL_CROP, "grayscale_p": 1.0}), 16, **NO_NORM)
    torch.testing.assert_close(gray(x, index, seed=0, epoch=0, view=0), TF.rgb_to_grayscale(xf, 3), atol=1e-6, rtol=0)
    sol = BatchAugment(AugmentConfig(**{**OFF, **FULL_CROP, "solarize_p": 1.0}), 16, **NO_NORM)
    torch.testing.assert_close(sol(x, index, seed=0, epoch=0, view=0), TF.solarize(xf, 0.5), atol=1e-6, rtol=0)


def test_blur_matches_torchvision_gaussian_blur():
    n, size = 6, 96
    x = _images(n, size, size, seed=3)
    aug = BatchAugment(AugmentConfig(**{**OFF, **FULL_CROP, "blur_p": 1.0}), size, **NO_NORM)
    index = torch.arange(n)
    p = aug.sample_params(index, seed=0, epoch=0, view=0, height=size, width=size)
    assert p["blur"].all()
    got = aug(x, index, seed=0, epoch=0, view=0)
    k = blur_kernel_size(size)
    xf = x.float() / 255
    for b in range(n):
        sigma = p["sigma"][b].item()
        torch.testing.assert_close(got[b], TF.gaussian_blur(xf[b], [k, k], [sigma, sigma]), atol=1e-5, rtol=0)
    # Same images at 64 px: blur is off below blur_min_size.
    small = BatchAugment(AugmentConfig(**{**OFF, **FULL_CROP, "blur_p": 1.0}), 64, **NO_NORM)
    x64 = x[:, :, :64, :64]
    torch.testing.assert_close(small(x64, index, seed=0, epoch=0, view=0), x64.float() / 255, atol=1e-6, rtol=0)


def test_hue_matches_torchvision_at_ties_grays_and_extreme_shifts():
    # Every combination of 7 channel levels (ties between max channels, gray pixels, 0 and 1,
    # values 1 ulp apart) under hue shifts from -0.5 to 0.5, including 0 and +-1 ulp of 0.
    levels = [0.0, 1 / 255, 0.25, 0.5, 0.5 + 1e-7, 254 / 255, 1.0]
    image = torch.tensor(list(itertools.product(levels, repeat=3))).T.reshape(3, 7, 49)
    hues = torch.tensor([-0.5, -0.25, -1e-7, 0.0, 1e-7, 1 / 6, 1 / 3, 0.4999, 0.5])
    x = image.expand(len(hues), -1, -1, -1).contiguous()
    got = _adjust_hue(x, hues)
    assert 0.0 <= got.min().item() and got.max().item() <= 1.0
    for i, h in enumerate(hues.tolist()):
        torch.testing.assert_close(got[i], TF.adjust_hue(x[i], h), atol=2e-6, rtol=0)
    torch.testing.assert_close(_adjust_hue(x, hues, out=x.clone()), got, atol=0, rtol=0)


@pytest.mark.parametrize(
    "cfg,size,src",
    [
        (AugmentConfig(solarize_p=0.2), 32, (32, 32)),  # SimCLR at 32 px: the CPU training case
        (AugmentConfig(jitter_p=1.0, jitter_strength=2.5, solarize_p=0.5, grayscale_p=0.5), 32, (40, 36)),
        (AugmentConfig(solarize_p=0.2, blur_p=0.5), 96, (100, 120)),  # with blur, downscaled crops
        (AugmentConfig(jitter_p=1.0, grayscale_p=1.0, blur_p=1.0, solarize_p=1.0, blur_min_size=16), 24, (30, 30)),
        (AugmentConfig(jitter_p=1.0, jitter_strength=0.0), 16, (16, 16)),  # factors 1, hue 0: jitter is the identity
    ],
)
def test_cpu_subset_path_matches_full_batch_path(cfg, size, src):
    # On the CPU each operation runs only on the samples that draw it (data-dependent shapes); on
    # accelerators on the whole batch with per-sample selection and no host sync (dense=True,
    # also the crop: matmuls instead of row gathers, so the two differ by float rounding, which
    # strong jitter and the normalisation amplify to a few 1e-6). Same views.
    n = 200
    x = _images(n, *src, seed=7)
    aug = BatchAugment(cfg, size)
    p = aug.sample_params(torch.arange(n), seed=3, epoch=1, view=0, height=src[0], width=src[1])
    subset = aug.apply(x, p, dense=False)
    full = aug.apply(x, p, dense=True)
    assert subset.shape == full.shape == (n, 3, size, size) and subset.is_contiguous()
    torch.testing.assert_close(subset, full, atol=1e-5, rtol=0)
    assert torch.equal(aug(x, torch.arange(n), seed=3, epoch=1, view=0), subset)  # what __call__ uses on the CPU
    if cfg.jitter_strength == 0.0:
        plain = BatchAugment(AugmentConfig(**{**vars(cfg), "jitter_p": 0.0}), size)
        torch.testing.assert_close(subset, plain.apply(x, p, dense=False), atol=1e-6, rtol=0)


@pytest.mark.parametrize("src,size", [((32, 32), 32), ((48, 40), 32), ((256, 256), 224), ((20, 300), 64)])
def test_cpu_row_gather_crop_matches_matmul_crop(src, size):
    # The CPU resamples with weighted row gathers over the nonzero taps, accelerators with dense
    # weight matrices: the same weights, so the same crops (up- and downscaled, flipped).
    n = 12 if size > 100 else 64
    x = _images(n, *src, seed=8)
    p = BatchAugment(AugmentConfig(flip_p=0.5), size).sample_params(torch.arange(n), seed=4, epoch=0, view=0, height=src[0], width=src[1])
    box = (p["top"], p["left"], p["height"], p["width"], p["flip"], size)
    gathered = _resized_crop(x, *box)
    assert gathered.shape == (n, 3, size, size) and gathered.dtype == torch.float32
    torch.testing.assert_close(gathered, _resized_crop_matmul(x, *box, gain=1 / 255), atol=1e-6, rtol=0)
    torch.testing.assert_close(_resized_crop(x.float() / 255, *box), gathered, atol=1e-6, rtol=0)  # float input


# ---------------------------------------------------------------------------------------------
# Determinism and batch independence


def _default_aug(size: int = 32) -> BatchAugment:
    return BatchAugment(AugmentConfig(solarize_p=0.2, blur_min_size=16), size)


def test_same_counters_same_views_other_counters_other_views():
    x = _images(8, 40, 36)
    index = torch.arange(100, 108)
    aug = _default_aug()
    a = aug(x, index, seed=0, epoch=0, view=0)
    assert torch.equal(aug(x, index, seed=0, epoch=0, view=0), a)
    assert torch.equal(_default_aug()(x.clone(), index.clone(), seed=0, epoch=0, view=0), a)
    for kw in (dict(seed=1, epoch=0, view=0), dict(seed=0, epoch=1, view=0), dict(seed=0, epoch=0, view=1)):
        other = aug(x, index, **kw)
        per_sample_diff = (other - a).flatten(1).abs().amax(1)
        assert (per_sample_diff > 1e-3).all(), kw


def test_views_do_not_depend_on_the_rest_of_the_batch():
    x = _images(10, 40, 36, seed=4)
    index = torch.tensor([3, 17, 4, 99, 0, 5, 1234, 8, 9, 77])
    aug = _default_aug()
    whole = aug(x, index, seed=7, epoch=2, view=1)
    halves = torch.cat([aug(x[:4], index[:4], seed=7, epoch=2, view=1), aug(x[4:], index[4:], seed=7, epoch=2, view=1)])
    torch.testing.assert_close(halves, whole, atol=1e-6, rtol=0)
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(aug(x[perm], index[perm], seed=7, epoch=2, view=1), whole[perm], atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------
# The whole pipeline vs the per-image torchvision reference


def _structured_image(h: int, w: int) -> torch.Tensor:
    """Gradients, stripes and fine texture, so crop position and scale, flip, colour ops and blur
    all change a view's statistics."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    stripes = (torch.sin(xx * 12) * torch.cos(yy * 9) + 1) / 2
    texture = torch.rand(h, w, generator=torch.Generator().manual_seed(0))
    image = torch.stack([xx, yy * (1 - xx), 0.6 * stripes + 0.4 * texture])
    return (image * 255).round().to(torch.uint8)


def _view_stats(v: torch.Tensor) -> dict[str, np.ndarray]:
    """Per-view statistics of normalised views, each sensitive to some step of the pipeline."""
    v = _denorm(v).double()
    return {
        "red mean": v[:, 0].mean((1, 2)).numpy(),  # crop position, flip, jitter
        "blue - green": (v[:, 2] - v[:, 1]).mean((1, 2)).numpy(),  # hue, saturation, grayscale
        "chroma": (v.amax(1) - v.amin(1)).mean((1, 2)).numpy(),  # grayscale (0), saturation
        "brightest": v.amax((1, 2, 3)).numpy(),  # solarize (<= 0.5), brightness
        "horizontal gradient": (v[..., 1:] - v[..., :-1]).mean((1, 2, 3)).numpy(),  # flip
        "roughness": (v[..., 1:, :] - v[..., :-1, :]).abs().mean((1, 2, 3)).numpy(),  # crop scale, blur
    }


def test_crop_geometry_matches_per_image_reference_statistically():
    # Red encodes x and green y, so a view's colour ranges measure its crop box and its left-right
    # red difference the flip; colour ops are off so nothing else moves them.
    n, h, w = 1000, 48, 64
    cfg = AugmentConfig(**{**OFF, "flip_p": 0.5})
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    img = (torch.stack([xx, yy, torch.full_like(xx, 0.5)]) * 255).round().to(torch.uint8)
    batched = _denorm(BatchAugment(cfg, 32)(img.expand(n, -1, -1, -1), torch.arange(n), seed=3, epoch=0, view=0))
    reference = per_image_transform(cfg, 32)
    pil = PIL.Image.fromarray(img.permute(1, 2, 0).numpy())
    torch.manual_seed(3)
    views = _denorm(torch.stack([reference(pil) for _ in range(n)]))

    def stats(v: torch.Tensor) -> dict[str, np.ndarray]:
        red, green = v[:, 0].double(), v[:, 1].double()
        return {
            "width": (red.amax((1, 2)) - red.amin((1, 2))).numpy(),
            "height": (green.amax((1, 2)) - green.amin((1, 2))).numpy(),
            "centre x": red.mean((1, 2)).numpy(),
            "centre y": green.mean((1, 2)).numpy(),
            "flip": (red[:, :, -1] - red[:, :, 0]).mean(1).numpy(),
        }

    ours, theirs = stats(batched), stats(views)
    for name in ours:
        d = _ks_2samp(ours[name], theirs[name])
        assert d < _ks_crit(n, n), f"{name}: KS {d:.3f}"


@pytest.mark.parametrize(
    "size,src,n,jitter_p",
    [
        (32, (32, 32), 600, 0.8),  # the colour ops and their composition
        (96, (100, 120), 250, 0.0),  # blur (jitter off: it would mask blur's effect and is slow per image)
    ],
)
def test_pipeline_matches_per_image_reference_statistically(size, src, n, jitter_p):
    cfg = AugmentConfig(jitter_p=jitter_p, solarize_p=0.2)
    img = _structured_image(*src)
    batched = BatchAugment(cfg, size)(img.expand(n, -1, -1, -1), torch.arange(n), seed=0, epoch=0, view=0)
    reference = per_image_transform(cfg, size)
    pil = PIL.Image.fromarray(img.permute(1, 2, 0).numpy())
    torch.manual_seed(0)
    views = torch.stack([reference(pil) for _ in range(n)])
    assert type(views) is torch.Tensor and views.shape == batched.shape and views.dtype == torch.float32
    ours, theirs = _view_stats(batched), _view_stats(views)
    for name in ours:
        d = _ks_2samp(ours[name], theirs[name])
        assert d < _ks_crit(n, n), f"{name}: KS {d:.3f}"


def test_per_image_transform_is_deterministic_under_a_seed():
    t = per_image_transform(AugmentConfig(), 32)
    pil = PIL.Image.fromarray(_structured_image(40, 48).permute(1, 2, 0).numpy())
    torch.manual_seed(11)
    a = t(pil)
    torch.manual_seed(11)
    assert torch.equal(t(pil), a)
    torch.manual_seed(12)
    assert not torch.equal(t(pil), a)


# ---------------------------------------------------------------------------------------------
# Evaluation view


def test_eval_batch_of_small_images_is_just_normalised():
    x = _images(5, 32, 32)
    want = (x.float() / 255 - torch.tensor(IMAGENET_MEAN).view(-1, 1, 1)) / torch.tensor(IMAGENET_STD).view(-1, 1, 1)
    torch.testing.assert_close(eval_batch(x, 32), want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("size,src", [(32, (40, 50)), (96, (120, 100)), (224, (256, 300))])
def test_eval_batch_matches_per_image_eval_transform(size, src):
    x = _images(3, *src)
    got = eval_batch(x, size)
    assert got.shape == (3, 3, size, size) and got.dtype == torch.float32
    t = eval_transform(size)
    for b in range(3):
        want = t(PIL.Image.fromarray(x[b].permute(1, 2, 0).numpy()))
        torch.testing.assert_close(got[b], want, atol=1e-5, rtol=0)
    assert eval_resize_size(size) == {32: 32, 96: 109, 224: 256}[size]


# ---------------------------------------------------------------------------------------------
# Validation and devices


@pytest.mark.parametrize(
    "bad",
    [
        {"flip_p": 1.5},
        {"solarize_p": -0.1},
        {"crop_scale": (0.5, 0.2)},
        {"crop_scale": (0.0, 1.0)},
        {"crop_ratio": (0.0, 1.0)},
        {"blur_sigma": (2.0, 0.1)},
        {"jitter_strength": -1.0},
    ],
)
def test_invalid_config_is_a_user_error(bad):
    with pytest.raises(UserError):
        BatchAugment(AugmentConfig(**bad), 32)
    with pytest.raises(UserError):
        per_image_transform(AugmentConfig(**bad), 32)


def test_bad_inputs_are_rejected():
    aug = _default_aug()
    with pytest.raises(ValueError):
        aug(_images(2, 32, 32)[:, :1], torch.arange(2), seed=0, epoch=0, view=0)
    with pytest.raises(ValueError):
        aug(_images(2, 32, 32), torch.arange(3), seed=0, epoch=0, view=0)
    with pytest.raises(ValueError):
        aug(_images(2, 32, 32).to(torch.int32), torch.arange(2), seed=0, epoch=0, view=0)


def test_empty_batch():
    aug = _default_aug()
    x = _images(0, 32, 32)
    assert aug(x, torch.arange(0), seed=0, epoch=0, view=0).shape == (0, 3, 32, 32)
    p = aug.sample_params(torch.arange(0), seed=0, epoch=0, view=0, height=32, width=32)
    assert aug.apply(x, p, dense=True).shape == (0, 3, 32, 32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.filterwarnings("ignore:Synchronization debug mode is a prototype")
def test_cuda_matches_cpu_without_host_syncs():
    x = _images(64, 40, 36, seed=6)
    index = torch.arange(64)
    for size in (32, 96):
        aug = BatchAugment(AugmentConfig(solarize_p=0.2), size)
        cpu = aug(x, index, seed=1, epoch=3, view=1)
        xd, idd = x.cuda(), index.cuda()
        aug(xd, idd, seed=1, epoch=3, view=1)  # warm-up: caches the normalisation constants
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            gpu = aug(xd, idd, seed=1, epoch=3, view=1)
            parts = [aug(xd[:20], idd[:20], seed=1, epoch=3, view=1), aug(xd[20:], idd[20:], seed=1, epoch=3, view=1)]
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert gpu.device.type == "cuda"
        torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=0)
        torch.testing.assert_close(torch.cat(parts), gpu, atol=1e-5, rtol=0)
        assert torch.equal(counter_uniform(1, 3, idd, 1, 6).cpu(), counter_uniform(1, 3, index, 1, 6))
        torch.testing.assert_close(eval_batch(xd, size).cpu(), eval_batch(x, size), atol=1e-4, rtol=0)
