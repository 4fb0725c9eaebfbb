"""evals/robustness.py: each CIFAR-10-C corruption equals the official formula (make_cifar_c.py of
hendrycks/robustness @ca36008, written again here in numpy / PIL / scipy / colorsys), at every
severity, and is a pure function of (seed, index, corruption, severity)."""

import colorsys
import io

import numpy as np
import pytest
import scipy.ndimage
import torch
from PIL import Image

from sslbench.api import UserError
from sslbench.evals.robustness import CORRUPTIONS, SEVERITIES, corrupt, corruption_normal

# The official severity tables (make_cifar_c.py), copied here so that a change of the module's table fails.
OFFICIAL = {
    "gaussian_noise": [0.04, 0.06, 0.08, 0.09, 0.10],
    "shot_noise": [500, 250, 100, 75, 50],
    "gaussian_blur": [0.4, 0.6, 0.7, 0.8, 1],
    "contrast": [0.75, 0.5, 0.4, 0.3, 0.15],
    "brightness": [0.05, 0.1, 0.15, 0.2, 0.3],
    "jpeg_compression": [80, 65, 58, 50, 40],
    "pixelate": [0.95, 0.9, 0.85, 0.75, 0.65],
}


@pytest.fixture(scope="module")
def images():
    """Four 32 x 32 RGB images: smooth gradients plus texture, a black corner (brightness's V = 0 case) and a saturated patch."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:32, 0:32]
    base = np.stack([xx * 8, yy * 8, (xx + yy) * 4], axis=-1).astype(np.float64)
    out = []
    for i in range(4):
        a = np.clip(base * (0.5 + 0.25 * i) + rng.normal(0, 30, base.shape), 0, 255).astype(np.uint8)
        a[:4, :4] = 0
        a[-4:, -4:] = 255
        out.append(a)
    return np.stack(out)  # (B, H, W, 3) uint8


def _torch(images):
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


def _numpy(t):
    return t.permute(0, 2, 3, 1).numpy()


def _official(name, img, c, noise=None):
    """One image (H, W, 3) uint8 -> the official corruption as make_cifar_c.py writes it: 0..255 floats before its
    np.uint8, or the uint8 image PIL returns (JPEG, pixelate)."""
    x = img / 255.0
    if name == "gaussian_noise":
        y = np.clip(x + noise * c, 0, 1) * 255
    elif name == "gaussian_blur":  # skimage.filters.gaussian(multichannel=True): scipy's filter, mode nearest, truncate 4
        y = np.clip(scipy.ndimage.gaussian_filter(x, sigma=(c, c, 0), mode="nearest", truncate=4.0), 0, 1) * 255
    elif name == "contrast":
        means = np.mean(x, axis=(0, 1), keepdims=True)
        y = np.clip((x - means) * c + means, 0, 1) * 255
    elif name == "brightness":  # skimage rgb2hsv -> V + c clipped -> hsv2rgb, per pixel with colorsys
        y = np.empty_like(x)
        for i in range(x.shape[0]):
            for j in range(x.shape[1]):
                h, s, v = colorsys.rgb_to_hsv(*x[i, j])
                y[i, j] = colorsys.hsv_to_rgb(h, s, min(v + c, 1.0))
        y = np.clip(y, 0, 1) * 255
    elif name == "jpeg_compression":
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "JPEG", quality=c)
        y = np.array(Image.open(buf))  # uint8: compared exactly
    elif name == "pixelate":
        side = img.shape[0]
        p = Image.fromarray(img).resize((int(side * c), int(side * c)), Image.BOX).resize((side, side), Image.BOX)
        y = np.array(p)  # uint8: compared exactly
    else:
        raise AssertionError(name)
    return y


def test_the_severity_tables_are_the_official_ones():
    assert {k: list(v) for k, v in SEVERITIES.items()} == OFFICIAL
    assert CORRUPTIONS == tuple(OFFICIAL)


@pytest.mark.parametrize("severity", [1, 3, 5])
@pytest.mark.parametrize("name", ["gaussian_noise", "gaussian_blur", "contrast", "brightness", "jpeg_compression", "pixelate"])
def test_each_corruption_equals_the_official_formula(images, name, severity):
    c = OFFICIAL[name][severity - 1]
    index = torch.tensor([3, 10, 11, 500])
    out = _numpy(corrupt(_torch(images), index, name, severity, seed=7))
    assert (out != images).mean() > 0.05  # it did corrupt the images
    noise = corruption_normal(7, index, name, severity, (3, 32, 32)).permute(0, 2, 3, 1).numpy() if name == "gaussian_noise" else [None] * 4
    ref = np.stack([_official(name, img, c, n) for img, n in zip(images, noise)])
    if ref.dtype == np.uint8:
        assert np.array_equal(out, ref)
        return
    # np.uint8 truncates: where the exact value is an integer, a rounding error (here or in the
    # reference) may put it one level lower; everywhere else the levels are equal
    on_integer = np.abs(ref - np.round(ref)) < 1e-9
    assert np.array_equal(out[~on_integer], np.uint8(ref)[~on_integer])
    assert np.isin(out[on_integer].astype(int) - np.round(ref[on_integer]).astype(int), (0, -1)).all()


def test_gaussian_noise_is_standard_normal_and_shot_noise_is_poisson():
    index = torch.arange(64)
    z = corruption_normal(0, index, "gaussian_noise", 3, (3, 8, 8)).flatten()
    assert abs(float(z.mean())) < 0.03 and abs(float(z.std()) - 1) < 0.03
    assert abs(float((z.abs() < 1.96).double().mean()) - 0.95) < 0.01
    # shot noise at c = 50 on a flat grey 0.4: Poisson(20) / 50, i.e. mean 0.4 and std sqrt(0.4 / 50)
    flat = torch.full((64, 3, 8, 8), 102, dtype=torch.uint8)  # 102/255 = 0.4
    y = corrupt(flat, index, "shot_noise", 5).double() / 255
    assert abs(float(y.mean()) - 0.4) < 0.01  # (truncation to uint8 lowers it by < 1/255)
    assert abs(float(y.std()) - (0.4 / 50) ** 0.5) < 0.006


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_corruptions_are_a_pure_function_of_seed_index_corruption_severity(images, name):
    batch = _torch(images)
    index = torch.tensor([5, 6, 7, 8])
    a = corrupt(batch, index, name, 4, seed=1)
    assert torch.equal(a, corrupt(batch, index, name, 4, seed=1))
    # one image at a time, in another order: the same pixels (nothing depends on the batch)
    alone = torch.cat([corrupt(batch[i : i + 1], index[i : i + 1], name, 4, seed=1) for i in (3, 1, 0, 2)])
    assert torch.equal(alone, a[[3, 1, 0, 2]])
    if name in ("gaussian_noise", "shot_noise"):
        assert not torch.equal(a, corrupt(batch, index, name, 4, seed=2))
        assert not torch.equal(a, corrupt(batch, index + 1, name, 4, seed=1))
        assert not torch.equal(a, corrupt(batch, index, name, 3, seed=1))


def test_bad_corruption_names_and_severities_are_one_line_errors(images):
    with pytest.raises(UserError, match="unknown corruption 'fog'"):
        corrupt(_torch(images), torch.arange(4), "fog", 1)
    with pytest.raises(UserError, match="severity must be 1..5"):
        corrupt(_torch(images), torch.arange(4), "contrast", 6)
