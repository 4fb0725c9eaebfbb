"""Tests for the linear probe (evals/linear.py) and feature extraction (sslbench/evaluation/features.py)."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from sslbench.core.errors import UserError
from sslbench.evals import linear
from sslbench.evals.linear import (
    DEFAULT_WEIGHT_DECAYS,
    linear_probe,
    linear_protocol,
    probe_encoder,
    stratified_split,
)
from sslbench.evaluation.features import extract_features


def _separable(n_train: int, n_test: int, dim: int, n_classes: int, seed: int):
    """Gaussian clusters far apart (linearly separable), with an offset and unequal scales so
    that standardisation matters."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(n_classes, dim, generator=g) * 6.0
    scale = torch.rand(dim, generator=g) * 10 + 0.1
    ytr = torch.arange(n_classes).repeat(n_train // n_classes)
    yte = torch.arange(n_classes).repeat(n_test // n_classes)
    xtr = (centers[ytr] + torch.randn(ytr.numel(), dim, generator=g)) * scale + 50.0
    xte = (centers[yte] + torch.randn(yte.numel(), dim, generator=g)) * scale + 50.0
    return xtr, ytr, xte, yte


@pytest.mark.parametrize("optimizer", ["sgd", "lbfgs"])
def test_separable_features_reach_full_accuracy(optimizer: str) -> None:
    xtr, ytr, xte, yte = _separable(240, 80, 16, 8, seed=0)
    out = linear_probe(xtr, ytr, xte, yte, optimizer=optimizer, epochs=20, batch_size=64)
    assert out["linear_top1"] == 100.0
    assert out["linear_top5"] == 100.0
    assert out["linear_val_top1"] == 100.0
    lrs = linear.default_lrs(optimizer)
    assert out["linear_best_lr"] in lrs and out["linear_best_wd"] in DEFAULT_WEIGHT_DECAYS
    assert all(isinstance(v, float) for v in out.values())


def test_stratified_split_is_disjoint_balanced_and_seeded() -> None:
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 20 + [3] * 1)[torch.randperm(101)]
    fit, val = stratified_split(labels, 0.1, seed=3)
    assert set(fit.tolist()).isdisjoint(val.tolist())
    assert sorted(fit.tolist() + val.tolist()) == list(range(101))
    counts = torch.bincount(labels[val], minlength=4).tolist()
    assert counts == [5, 3, 2, 0]  # 10 % of each class; a singleton class stays in fit
    fit2, val2 = stratified_split(labels, 0.1, seed=3)
    assert torch.equal(val, val2) and torch.equal(fit, fit2)
    assert not torch.equal(val, stratified_split(labels, 0.1, seed=4)[1])
    with pytest.raises(UserError):
        stratified_split(labels, 0.0, seed=0)


def test_search_fits_on_train_part_and_never_sees_test(monkeypatch: pytest.MonkeyPatch) -> None:
    xtr, ytr, xte, yte = _separable(200, 50, 8, 5, seed=1)
    fits: list[torch.Tensor] = []
    real_fit = linear._fit

    def recording_fit(feats, labels, configs, **kw):
        fits.append(feats.clone())
        return real_fit(feats, labels, configs, **kw)

    monkeypatch.setattr(linear, "_fit", recording_fit)
    out = linear_probe(xtr, ytr, xte, yte, val_fraction=0.2, epochs=5, seed=7)
    fit_idx, val_idx = stratified_split(ytr, 0.2, seed=7)
    assert len(fits) == 2  # the whole grid on the fit part, then the winner on all of train
    assert torch.equal(fits[0], xtr[fit_idx])
    assert not any((fits[0] == row).all(dim=1).any() for row in xtr[val_idx])
    assert torch.equal(fits[1], xtr)
    # Selection is independent of the test set: garbage test labels change nothing but the score.
    monkeypatch.setattr(linear, "_fit", real_fit)
    shuffled = linear_probe(xtr, ytr, xte, yte.roll(1), val_fraction=0.2, epochs=5, seed=7)
    for key in ("linear_best_lr", "linear_best_wd", "linear_val_top1"):
        assert shuffled[key] == out[key]
    assert shuffled["linear_top1"] < out["linear_top1"]


@pytest.mark.parametrize("optimizer", ["sgd", "lbfgs"])
def test_grid_choice_is_in_grid_and_sensible(optimizer: str) -> None:
    # Noisy, overlapping classes: a learning rate too small to move the weights must lose.
    g = torch.Generator().manual_seed(2)
    y = torch.randint(0, 4, (300,), generator=g)
    x = torch.randn(300, 16, generator=g) + torch.nn.functional.one_hot(y, 16).float() * 1.5
    lrs = (1e-7, 0.5) if optimizer == "sgd" else (1e-9, 1.0)
    out = linear_probe(x[:240], y[:240], x[240:], y[240:], lrs=lrs, weight_decays=(0.0, 1e-3), optimizer=optimizer, epochs=20, batch_size=32)
    assert out["linear_best_lr"] == lrs[1]
    assert out["linear_best_wd"] in (0.0, 1e-3)
    assert "linear_top5" not in out  # only 4 classes


def test_single_configuration_skips_the_split() -> None:
    xtr, ytr, xte, yte = _separable(100, 50, 8, 5, seed=3)
    out = linear_probe(xtr, ytr, xte, yte, lrs=(0.1,), weight_decays=(0.0,), epochs=10)
    assert "linear_val_top1" not in out
    assert (out["linear_best_lr"], out["linear_best_wd"]) == (0.1, 0.0)
    assert out["linear_top1"] == 100.0


def test_sgd_grid_training_equals_torch_sgd() -> None:
    # The hand-written grid update must be torch.optim.SGD (momentum 0.9, cosine schedule,
    # weight decay on W only), one configuration at a time.
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(50, 6, generator=g), torch.randint(0, 3, (50,), generator=g)
    configs = [(0.3, 0.0), (0.05, 1e-2)]
    got = linear._fit_sgd(x, y, 3, configs, epochs=3, batch_size=16, generator=torch.Generator().manual_seed(0))
    for (lr, wd), (w_got, b_got) in zip(configs, got):
        w = torch.zeros(6, 3, requires_grad=True)
        b = torch.zeros(3, requires_grad=True)
        opt = torch.optim.SGD([{"params": [w], "weight_decay": wd}, {"params": [b]}], lr=lr, momentum=0.9)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=3 * 4)
        order_g = torch.Generator().manual_seed(0)
        for _ in range(3):
            order = torch.randperm(50, generator=order_g)
            for s in range(0, 50, 16):
                idx = order[s : s + 16]
                loss = torch.nn.functional.cross_entropy(x[idx] @ w + b, y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
        torch.testing.assert_close(w_got, w.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b_got, b.detach(), rtol=1e-5, atol=1e-6)


def test_bad_options_raise_user_error() -> None:
    xtr, ytr, xte, yte = _separable(50, 10, 4, 5, seed=5)
    with pytest.raises(UserError):
        linear_probe(xtr, ytr, xte, yte, optimizer="adam")
    with pytest.raises(UserError):
        linear_probe(xtr, ytr, xte, yte, lrs=())
    with pytest.raises(UserError):
        linear_probe(xtr, ytr, xte[:, :3], yte)


def test_protocol_record() -> None:
    p = linear_protocol(optimizer="sgd", epochs=50, best_lr=0.1, best_wd=0.0)
    assert p["name"] == "linear" and p["epochs"] == 50 and p["val_fraction"] == 0.1
    assert p["lr_grid"] == list(linear.DEFAULT_SGD_LRS) and p["wd_grid"] == list(DEFAULT_WEIGHT_DECAYS)
    assert (p["best_lr"], p["best_wd"]) == (0.1, 0.0)
    assert linear_protocol(optimizer="lbfgs")["lr_grid"] == [1.0]


# ---------------------------------------------------------------------------------------------
# Frozen encoders


def _to_unit(batch: torch.Tensor) -> torch.Tensor:
    return batch.float() / 127.5 - 1.0


def _images(n: int, size: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)


def test_probe_encoder_leaves_encoder_untouched() -> None:
    torch.manual_seed(0)
    encoder = timm.create_model("resnet18", pretrained=False, num_classes=0)
    encoder.train()
    encoder.layer1.eval()  # a deliberately mixed state must come back as it was
    flags = {name: m.training for name, m in encoder.named_modules()}
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    xtr, xte = _images(24, 16, seed=1), _images(8, 16, seed=2)
    ytr, yte = torch.arange(3).repeat(8), torch.arange(2).repeat(4)
    out = probe_encoder(
        encoder, xtr, ytr, xte, yte, image_size=16, transform=_to_unit, extract_batch_size=8, epochs=3, lrs=(0.1, 1.0), weight_decays=(0.0,)
    )
    after = encoder.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k  # BatchNorm running stats included
    assert {name: m.training for name, m in encoder.named_modules()} == flags
    assert 0.0 <= out["linear_top1"] <= 100.0 and out["linear_best_lr"] in (0.1, 1.0)


def test_extract_features_is_batch_invariant_and_restores_mode() -> None:
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
    encoder.train()
    images = _images(13, 10, seed=3)
    a = extract_features(encoder, images, image_size=10, batch_size=4, transform=_to_unit)
    b = extract_features(encoder, images, image_size=10, batch_size=64, transform=_to_unit)
    assert a.shape == (13, 4) and a.dtype == torch.float32 and a.device.type == "cpu"
    torch.testing.assert_close(a, b)  # eval mode: per-image results, no batch statistics
    assert encoder.training and encoder[1].training
    bf16 = extract_features(encoder, images, image_size=10, precision="bf16", transform=_to_unit)
    assert bf16.dtype == torch.float32
    torch.testing.assert_close(bf16, a, rtol=0.05, atol=0.05)
    with pytest.raises(UserError):
        extract_features(encoder, images.float(), image_size=10)
    with pytest.raises(UserError):
        extract_features(encoder, images, image_size=10, precision="fp8", transform=_to_unit)


def test_extract_features_default_transform_is_eval_batch() -> None:
    from sslbench.core.augment import eval_batch

    encoder = nn.Sequential(nn.Flatten())
    images = _images(5, 20, seed=4)
    feats = extract_features(encoder, images, image_size=16)
    torch.testing.assert_close(feats, eval_batch(images, 16).flatten(1))
    assert feats.shape == (5, 3 * 16 * 16)
