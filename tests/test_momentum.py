"""Tests for sslbench.core.momentum: EMA updates of (online, target) pairs and momentum schedules."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch import nn

from sslbench.core.momentum import constant_momentum, copy_params_, cosine_momentum, ema_update_, freeze_


@pytest.fixture(scope="module")
def pair() -> tuple[nn.Module, nn.Module]:
    """A timm resnet (online) and a target that differs in every parameter and buffer."""
    torch.manual_seed(0)
    online = timm.create_model("resnet18", num_classes=0)
    target = freeze_(copy.deepcopy(online))
    with torch.no_grad():
        for p in online.parameters():
            p.add_(torch.randn_like(p))
    online.train()(torch.randn(4, 3, 32, 32))  # moves the BN running stats
    return online, target


def test_ema_update_every_parameter_and_buffer(pair: tuple[nn.Module, nn.Module]) -> None:
    online, target = pair
    m = 0.99
    before = {n: p.detach().clone() for n, p in target.named_parameters()}
    assert all(not torch.equal(before[n], p) for n, p in online.named_parameters())
    ema_update_(online, target, m)
    on = dict(online.named_parameters())
    assert any(n.endswith("bias") for n in on) and any(n.endswith("bn1.weight") for n in on)
    for n, p in target.named_parameters():
        assert torch.equal(p, before[n] * m + on[n] * (1 - m)), n
        assert not p.requires_grad
    on_buffers = dict(online.named_buffers())
    assert any(n.endswith("running_var") for n in on_buffers)
    assert any(n.endswith("num_batches_tracked") and b.item() == 1 for n, b in on_buffers.items())
    for n, b in target.named_buffers():
        assert torch.equal(b, on_buffers[n]), n


def test_ema_update_endpoints() -> None:
    online, target = nn.Linear(3, 2), nn.Linear(3, 2)
    t_before = [p.detach().clone() for p in target.parameters()]
    ema_update_(online, target, 1.0)
    assert all(torch.equal(a, b) for a, b in zip(t_before, target.parameters()))
    ema_update_(online, target, 0.0)
    assert all(torch.equal(a, b) for a, b in zip(online.parameters(), target.parameters()))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        ema_update_(online, target, 1.5)


def test_structure_mismatch_is_a_clear_error() -> None:
    online = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    with pytest.raises(ValueError, match=r"missing in target \['1.bias', '1.weight'\]"):
        ema_update_(online, nn.Sequential(nn.Linear(3, 4)), 0.9)
    with pytest.raises(ValueError, match=r"parameter '0.weight': online shape \(4, 3\) != target \(4, 5\)"):
        ema_update_(online, nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4)), 0.9)
    with pytest.raises(ValueError, match="buffers differ"):
        ema_update_(online, nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False)), 0.9)
    with pytest.raises(ValueError, match="different modules"):
        ema_update_(online, online, 0.9)


def test_copy_params_and_freeze() -> None:
    online = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    online[1].running_mean.fill_(2.0)
    target = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    assert freeze_(target) is target
    copy_params_(online, target)
    assert all(torch.equal(a, b) for a, b in zip(online.state_dict().values(), target.state_dict().values()))
    assert all(not p.requires_grad for p in target.parameters())
    assert all(p.requires_grad for p in online.parameters())
    assert target[0].weight.data_ptr() != online[0].weight.data_ptr()


def test_cosine_momentum_schedule() -> None:
    total = 1000
    taus = [cosine_momentum(k, total, 0.996) for k in range(total + 1)]
    assert taus[0] == 0.996 and taus[total] == 1.0
    assert all(a < b for a, b in zip(taus, taus[1:]))
    assert taus[total // 2] == pytest.approx(0.998)  # half-way between base and final
    # Grill et al. 2020: tau = 1 - (1 - base) * (cos(pi k / K) + 1) / 2
    assert taus[250] == pytest.approx(1 - 0.004 * (2**-0.5 + 1) / 2, abs=1e-12)
    assert cosine_momentum(total + 10, total, 0.996) == 1.0
    assert cosine_momentum(0, 10, 0.9, final=0.99) == 0.9 and cosine_momentum(10, 10, 0.9, final=0.99) == 0.99


def test_constant_momentum() -> None:
    assert {constant_momentum(k, 100, 0.999) for k in (0, 50, 100, 200)} == {0.999}
