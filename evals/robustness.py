"""Corruption robustness: the linear probe trained on clean features, tested on corrupted test images.

The corruptions and their five severities are those of CIFAR-10-C (Hendrycks & Dietterich 2019,
"Benchmarking Neural Network Robustness to Common Corruptions and Perturbations", ICLR), with the
parameters of the official generator ``ImageNet-C/create_c/make_cifar_c.py`` in
github.com/hendrycks/robustness at commit ca360085d57889288c4143fddd8a707bbcae01bd (the CIFAR
parameters: the images here are small; ImageNet-C's are stronger and made for 224 px). Each is
generated on the fly, on the CPU, from ``(seed, test index, corruption, severity)`` alone:

- ``gaussian_noise``: ``clip(x + N(0, c^2))``, ``c`` in (0.04, 0.06, 0.08, 0.09, 0.10);
- ``shot_noise``: ``clip(Poisson(x * c) / c)``, ``c`` in (500, 250, 100, 75, 50);
- ``gaussian_blur``: Gaussian filter of ``sigma`` in (0.4, 0.6, 0.7, 0.8, 1.0) pixels, kernel
  radius ``int(4 sigma + 0.5)``, edges repeated (skimage's ``gaussian``, i.e. scipy's
  ``gaussian_filter(mode="nearest", truncate=4)``);
- ``contrast``: ``clip((x - m) * c + m)``, ``m`` the image's mean per channel, ``c`` in
  (0.75, 0.5, 0.4, 0.3, 0.15);
- ``brightness``: HSV value ``V + c`` clipped to 1, ``c`` in (0.05, 0.1, 0.15, 0.2, 0.3), hue and
  saturation kept (so ``rgb * min(V + c, 1) / V``, and grey ``min(c, 1)`` where ``V = 0``);
- ``jpeg_compression``: a PIL JPEG round trip at quality (80, 65, 58, 50, 40);
- ``pixelate``: PIL box resize to ``int(S * c)`` and back to ``S``, ``c`` in (0.95, 0.9, 0.85,
  0.75, 0.65), written as two separable box-filter matrices per resize, each pass rounded to 8
  bits as PIL's does.

Images are float64 in [0, 1] during a corruption and become uint8 as in the official script
(``np.uint8(clip(...) * 255)``: truncation). The metrics are the clean top-1, the top-1 per
corruption (mean over severities) and the mean corruption accuracy ``mCA`` (mean over corruptions
and severities).
"""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from sslbench.api import EvalContext, Option, Score, UserError, counter_uniform, extract_features, gaussian_blur_batch, register_protocol
from sslbench.evals.protocols import LINEAR_EPOCHS

#: Severity parameters of make_cifar_c.py (hendrycks/robustness@ca36008), severity 1..5.
SEVERITIES: dict[str, tuple[float, ...]] = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),  # noise std on [0, 1]
    "shot_noise": (500, 250, 100, 75, 50),  # photons per unit intensity
    "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1.0),  # sigma in pixels
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),  # contrast factor
    "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),  # added HSV value
    "jpeg_compression": (80, 65, 58, 50, 40),  # JPEG quality
    "pixelate": (0.95, 0.9, 0.85, 0.75, 0.65),  # down-scaling factor
}
CORRUPTIONS = tuple(SEVERITIES)
REFERENCE = "Hendrycks & Dietterich, ICLR 2019; github.com/hendrycks/robustness ImageNet-C/create_c/make_cifar_c.py @ca360085"
CHUNK = 1024  # test images corrupted and encoded at a time


def _stream(corruption: str) -> int:
    """The counter-based stream (the ``epoch`` slot of :func:`counter_uniform`) of a corruption:
    negative, so it never meets a training epoch's augmentation draws."""
    return -1 - CORRUPTIONS.index(corruption)


def corruption_normal(seed: int, index: Tensor, corruption: str, severity: int, shape: tuple[int, ...]) -> Tensor:
    """Standard normal float64 noise ``(B, *shape)``, a pure function of ``(seed, index[b],
    corruption, severity)`` (Box-Muller on counter-based uniforms)."""
    n = math.prod(shape)
    u = counter_uniform(seed, _stream(corruption), index, severity, 2 * n).to(torch.float64)
    radius = torch.sqrt(-2.0 * torch.log1p(-u[:, :n]))  # 1 - u in (0, 1]
    return (radius * torch.cos(2.0 * math.pi * u[:, n:])).view(-1, *shape)


def _sample_seeds(seed: int, index: Tensor, corruption: str, severity: int) -> list[int]:
    """One 48-bit generator seed per sample, a pure function of ``(seed, index[b], corruption, severity)``."""
    u = counter_uniform(seed, _stream(corruption), index, 100 + severity, 2)
    bits = (u * (1 << 24)).to(torch.int64)
    return (bits[:, 0] * (1 << 24) + bits[:, 1]).tolist()


def _box_weights(in_size: int, out_size: int) -> Tensor:
    """``(out, in)`` weights of PIL's BOX resize along one axis (Resample.c: ``precompute_coeffs``
    with the box filter, ``-0.5 < t <= 0.5``), rows normalised."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 0.5 * filterscale
    w = torch.zeros(out_size, in_size, dtype=torch.float64)
    for i in range(out_size):
        centre = (i + 0.5) * scale
        lo, hi = max(int(centre - support + 0.5), 0), min(int(centre + support + 0.5), in_size)
        for j in range(lo, hi):
            t = (j - centre + 0.5) / filterscale
            w[i, j] = 1.0 if -0.5 < t <= 0.5 else 0.0
        w[i] /= w[i].sum()
    return w


def _box_resize(levels: Tensor, size: int) -> Tensor:
    """PIL's BOX resize of 8-bit ``levels`` (float64 0..255, ``(B, C, H, W)``) to ``size``: the
    horizontal pass, then the vertical one, each rounded to 8 bits (half up) as PIL's 8-bit path."""
    wx = _box_weights(levels.shape[3], size)
    wy = _box_weights(levels.shape[2], size)
    x = torch.floor(levels @ wx.t() + 0.5)
    return torch.floor(wy @ x + 0.5)


def corrupt(images: Tensor, index: Tensor, corruption: str, severity: int, *, seed: int = 0) -> Tensor:
    """The ``corruption`` at ``severity`` (1..5) of uint8 ``images (B, 3, H, W)``; ``index (B,)``
    are the images' indices in their split. Returns uint8 ``(B, 3, H, W)`` on the CPU, a pure
    function of ``(seed, index[b], corruption, severity)`` and the image (whatever the batch)."""
    if corruption not in SEVERITIES:
        raise UserError(f"unknown corruption {corruption!r}; use one of {', '.join(CORRUPTIONS)}")
    if not 1 <= severity <= 5:
        raise UserError(f"corruption severity must be 1..5, got {severity}")
    c = SEVERITIES[corruption][severity - 1]
    images, index = images.cpu(), index.cpu().to(torch.int64)
    if corruption in ("jpeg_compression", "pixelate"):
        levels = images.to(torch.float64)
        if corruption == "pixelate":
            side = images.shape[-1]
            return _box_resize(_box_resize(levels, int(side * c)), side).to(torch.uint8)
        out = []
        for img in images:
            buf = io.BytesIO()
            Image.fromarray(img.permute(1, 2, 0).numpy()).save(buf, "JPEG", quality=int(c))
            out.append(torch.from_numpy(np.array(Image.open(buf).convert("RGB"))).permute(2, 0, 1))
        return torch.stack(out) if out else images.clone()
    x = images.to(torch.float64) / 255.0
    if corruption == "gaussian_noise":
        y = x + c * corruption_normal(seed, index, corruption, severity, tuple(x.shape[1:]))
    elif corruption == "shot_noise":
        y = torch.stack(
            [
                torch.poisson(xi * c, generator=torch.Generator().manual_seed(s)) / c
                for xi, s in zip(x, _sample_seeds(seed, index, corruption, severity))
            ]
        )
    elif corruption == "gaussian_blur":
        r = int(4.0 * c + 0.5)  # scipy's gaussian_filter radius at truncate=4
        padded = torch.nn.functional.pad(x, (r, r, r, r), mode="replicate")  # mode="nearest"
        y = gaussian_blur_batch(padded, torch.full((x.shape[0],), float(c), dtype=x.dtype), 2 * r + 1)[..., r : r + x.shape[2], r : r + x.shape[3]]
    elif corruption == "contrast":
        mean = x.mean(dim=(2, 3), keepdim=True)
        y = (x - mean) * c + mean
    else:  # brightness
        v = x.amax(dim=1, keepdim=True)
        v_new = (v + c).clamp(max=1.0)
        y = torch.where(v > 0, x * v_new / v.clamp_min(1e-12), v_new.expand_as(x))
    return (y.clamp(0.0, 1.0) * 255.0).to(torch.uint8)  # np.uint8 truncates, as here


# ---------------------------------------------------------------------------------------------
# The protocol


def _parse_corruptions(text: str) -> list[str]:
    names = [p.strip() for p in text.split(",") if p.strip()]
    bad = [n for n in names if n not in SEVERITIES]
    if bad or not names:
        raise UserError(f"--robustness-corruptions: {', '.join(bad) or repr(text)} not a corruption; use some of {','.join(CORRUPTIONS)}")
    return list(dict.fromkeys(names))


def _parse_severities(text: str) -> list[int]:
    try:
        values = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        values = []
    if not values or not all(1 <= v <= 5 for v in values):
        raise UserError(f"--robustness-severities: {text!r} is not a list of severities 1..5, e.g. 1,2,3,4,5")
    return sorted(set(values))


def _check_list(parse: Any) -> Any:
    def check(text: str) -> str | None:
        try:
            parse(text)
        except UserError as exc:
            return str(exc).split(": ", 1)[-1]
        return None

    return check


ROBUSTNESS_CORRUPTIONS = Option(
    "--robustness-corruptions",
    ",".join(CORRUPTIONS),
    f"robustness: comma-separated corruptions (default all: {','.join(CORRUPTIONS)})",
    check=_check_list(_parse_corruptions),
)
ROBUSTNESS_SEVERITIES = Option(
    "--robustness-severities", "1,2,3,4,5", "robustness: comma-separated severities 1..5 (default 1,2,3,4,5)", check=_check_list(_parse_severities)
)


def corrupted_features(ctx: EvalContext, corruption: str, severity: int) -> Tensor:
    """Frozen features ``(N, D)`` of the run's test images under ``corruption`` at ``severity``,
    seeded by ``--eval-seed``; cached per evaluation (``ood`` reuses them)."""
    key = f"features:test:{corruption}:{severity}:{ctx.opts.seed}"
    if key not in ctx.cache:
        test = ctx.in_memory("test")
        chunks = []
        for start in range(0, len(test), CHUNK):
            index = torch.arange(start, min(start + CHUNK, len(test)))
            images = corrupt(test.images[index], index, corruption, severity, seed=ctx.opts.seed)
            chunks.append(extract_features(ctx.encoder, images, image_size=ctx.image_size, device=ctx.device, precision=ctx.precision))
        ctx.cache[key] = torch.cat(chunks)
    features: Tensor = ctx.cache[key]
    return features


@register_protocol(
    "robustness",
    options=[LINEAR_EPOCHS, ROBUSTNESS_CORRUPTIONS, ROBUSTNESS_SEVERITIES],
    reuse_key=lambda cfg, opts: {
        "epochs": opts.linear_epochs,
        "seed": opts.seed,
        "corruptions": _parse_corruptions(opts.robustness_corruptions),
        "severities": _parse_severities(opts.robustness_severities),
    },
    in_memory=True,
    description="linear probe trained on clean features, top-1 on CIFAR-10-C corruptions at severities 1-5 (mCA)",
)
def robustness(ctx: EvalContext, fraction: float | None) -> Score:
    from sslbench.evals.knn import topk_accuracy
    from sslbench.evals.linear import _fit, linear_probe, linear_protocol

    opts = ctx.opts
    corruptions, severities = _parse_corruptions(opts.robustness_corruptions), _parse_severities(opts.robustness_severities)
    train, test = ctx.features()
    ytr, yte = ctx.split("train").labels, ctx.split("test").labels
    clean = linear_probe(train, ytr, test, yte, epochs=opts.linear_epochs, seed=opts.seed, device=ctx.device)
    best = (clean["linear_best_lr"], clean["linear_best_wd"])
    n_classes = max(int(ytr.max()), int(yte.max())) + 1
    # the final classifier of linear_probe again (same data, configuration and seed: the same weights)
    (clf,) = _fit(
        train.to(ctx.device),
        ytr.to(ctx.device),
        [best],
        n_classes=n_classes,
        optimizer="sgd",
        epochs=opts.linear_epochs,
        batch_size=256,
        standardize=True,
        seed=opts.seed,
    )
    per_severity: dict[str, dict[int, float]] = {}
    for corruption in corruptions:
        per_severity[corruption] = {}
        for severity in severities:
            feats = corrupted_features(ctx, corruption, severity).to(ctx.device)
            with torch.no_grad():
                per_severity[corruption][severity] = topk_accuracy(clf.logits(feats), yte.to(ctx.device), (1,))[1]
    per_corruption = {c: sum(v.values()) / len(v) for c, v in per_severity.items()}
    metrics = {
        "robustness_clean_top1": clean["linear_top1"],
        "robustness_mca": sum(per_corruption.values()) / len(per_corruption),
        **{f"robustness_{c}_top1": v for c, v in per_corruption.items()},
    }
    record = {
        "probe": linear_protocol(epochs=opts.linear_epochs, seed=opts.seed, best_lr=best[0], best_wd=best[1]),
        "epochs": opts.linear_epochs,
        "seed": opts.seed,
        "corruptions": corruptions,
        "severities": severities,
        "parameters": {c: list(SEVERITIES[c]) for c in corruptions},
        "top1_by_severity": {c: {str(s): v for s, v in by.items()} for c, by in per_severity.items()},
        "mca": "mean top-1 over the corruptions and severities listed",
        "generation": "on the fly from (--eval-seed, test index, corruption, severity), applied to the stored test images",
        "reference": REFERENCE,
    }
    return Score(metrics, record)
