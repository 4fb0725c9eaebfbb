"""BYOL and SimSiam: losses equal their formulas, stop-gradients hold, BYOL's target follows its
EMA exactly on the cosine schedule, BYOL's views are asymmetric, SimSiam's predictor keeps a
fixed learning rate without losing the no-decay split."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from _steps import batch as make_batch
from _steps import info as step_info
from torch import Tensor, nn

from sslbench.core.augment import AugmentConfig
from sslbench.core.method import ViewSpec, default_views
from sslbench.core.optim import build_optimizer, param_groups, set_lr
from sslbench.methods.byol import BYOL, BYOLConfig, BYOLLoss, byol_loss
from sslbench.methods.simsiam import SimSiam, SimSiamConfig, SimSiamLoss, negative_cosine
from sslbench.train.run_setup import apply_schedules

N = 8


class ToyBackbone(nn.Sequential):
    """A small backbone with BatchNorm and ``num_features``: (B, 3, 4, 4) -> (B, 16)."""

    def __init__(self) -> None:
        super().__init__(nn.Flatten(), nn.Linear(48, 16), nn.BatchNorm1d(16), nn.ReLU())
        self.num_features = 16


def views(seed: int = 0) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, 3, 4, 4, generator=g)
    return [x + 0.1 * torch.randn(x.shape, generator=g), x + 0.1 * torch.randn(x.shape, generator=g)]


def small_byol(**kw) -> BYOL:
    torch.manual_seed(0)
    return BYOL(ToyBackbone(), BYOLConfig(**{"proj_hidden_dim": 32, "proj_dim": 8, "pred_hidden_dim": 32, **kw}))


def small_simsiam(**kw) -> SimSiam:
    torch.manual_seed(0)
    return SimSiam(ToyBackbone(), SimSiamConfig(**{"proj_hidden_dim": 32, "proj_dim": 16, **kw}))


def rand(*shape: int, seed: int) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# --------------------------------------------------------------------------------------------
# Losses


@pytest.mark.parametrize("n,d", [(1, 3), (5, 8), (16, 2)])
def test_byol_loss_is_two_minus_two_cosine_summed_over_directions(n, d):
    p1, p2, z1, z2 = (rand(n, d, seed=s) for s in range(4))
    want_one = (2 - 2 * F.cosine_similarity(p1, z2, dim=1)).mean()
    assert torch.allclose(byol_loss(p1, z2).double(), want_one, atol=1e-6)
    # ||p/|p| - z/|z|||^2 is the same number
    assert torch.allclose(byol_loss(p1, z2).double(), (F.normalize(p1, dim=1) - F.normalize(z2, dim=1)).pow(2).sum(1).mean(), atol=1e-6)
    want = want_one + (2 - 2 * F.cosine_similarity(p2, z1, dim=1)).mean()
    assert torch.allclose(BYOLLoss()(p1, p2, z1, z2).double(), want, atol=1e-6)


@pytest.mark.parametrize("n,d", [(1, 3), (5, 8), (16, 2)])
def test_simsiam_loss_is_half_negative_cosines(n, d):
    p1, p2, z1, z2 = (rand(n, d, seed=10 + s) for s in range(4))
    d12 = -F.cosine_similarity(p1, z2, dim=1).mean()
    d21 = -F.cosine_similarity(p2, z1, dim=1).mean()
    assert torch.allclose(negative_cosine(p1, z2).double(), d12, atol=1e-6)
    assert torch.allclose(SimSiamLoss()(p1, p2, z1, z2).double(), d12 / 2 + d21 / 2, atol=1e-6)
    assert torch.allclose(SimSiamLoss()(z2, z1, z1, z2), torch.tensor(-1.0, dtype=torch.float32), atol=1e-6)


@pytest.mark.parametrize("loss_fn", [BYOLLoss(), SimSiamLoss()], ids=["byol", "simsiam"])
def test_no_gradient_through_the_target_side(loss_fn):
    p1, p2, z1, z2 = (rand(6, 4, seed=20 + s).requires_grad_() for s in range(4))
    loss = loss_fn(p1, p2, z1, z2)
    gp1, gp2, gz1, gz2 = torch.autograd.grad(loss, (p1, p2, z1, z2), allow_unused=True)
    assert gz1 is None and gz2 is None
    assert gp1.abs().sum() > 0 and gp2.abs().sum() > 0


@pytest.mark.parametrize("make", [small_byol, small_simsiam], ids=["byol", "simsiam"])
def test_step_loss_from_modules_and_zero_grad_on_target_embeddings(make):
    m = make()
    v = views()
    loss, _ = m.training_step(make_batch(v))
    h = m.encoder(torch.cat(v))  # BN statistics over both views, as in training_step
    z = m.projector(h)
    p = m.predictor(z)
    if isinstance(m, BYOL):
        with torch.no_grad():
            t = m.target_projector(m.target_encoder(torch.cat(v)))
        want = byol_loss(p[:N], t[N:]) + byol_loss(p[N:], t[:N])
    else:
        want = negative_cosine(p[:N], z[N:]) / 2 + negative_cosine(p[N:], z[:N]) / 2
    assert torch.allclose(loss, want, rtol=1e-5, atol=1e-6)
    # through the gradient-cache hooks: the target-side embeddings (slots 2, 3) get exactly zero
    emb = m.embed(make_batch(v))
    (g,) = torch.autograd.grad(m.loss_from_embeddings(emb)[0], emb)
    assert torch.count_nonzero(g[:, 2:]) == 0 and torch.count_nonzero(g[:, :2]) > 0


# --------------------------------------------------------------------------------------------
# BYOL: target network, schedule, views


def test_byol_target_is_exact_ema_of_online_after_a_step():
    m = small_byol()
    opt = build_optimizer("sgd", param_groups(m, 1e-4), 0.5, weight_decay=1e-4)
    for t_online, t_target in m.momentum_pairs():
        assert all(torch.equal(a, b) for a, b in zip(t_online.parameters(), t_target.parameters()))
    loss, _ = m.training_step(make_batch(views(), step=3, total=10))
    loss.backward()
    opt.step()
    info = step_info(3, 10)
    rate = m.momentum_at(info)
    assert abs(rate - (1.0 - (1.0 - 0.996) * (math.cos(math.pi * 3 / 10) + 1) / 2)) < 1e-12  # the cosine at step 3 of 10
    before = {n: p.clone() for n, p in m.named_parameters() if n.startswith("target_")}
    m.after_optimizer_step(info)  # what the trainer calls after the optimizer step: the EMA at momentum_at(info)
    online = dict(m.named_parameters())
    assert before
    for name, old in before.items():
        src = online[name.replace("target_", "", 1)]
        assert not torch.equal(src, old)  # the step moved the online network away from the target
        assert torch.equal(online[name], old * rate + src * (1 - rate)), name


def test_byol_momentum_schedule_endpoints():
    m = small_byol()
    assert m.momentum_at(step_info(0, 1000)) == 0.996
    assert m.momentum_at(step_info(1000, 1000)) == 1.0
    assert abs(m.momentum_at(step_info(500, 1000)) - 0.998) < 1e-12
    ms = [m.momentum_at(step_info(s, 1000)) for s in range(0, 1001, 10)]
    assert all(a < b for a, b in zip(ms, ms[1:]))
    assert small_byol(base_momentum=0.99, final_momentum=0.999).momentum_at(step_info(1000, 1000)) == 0.999


def test_byol_views_are_asymmetric_blur_and_solarize():
    base = AugmentConfig(blur_p=0.5, solarize_p=0.0, grayscale_p=0.3)
    m = small_byol()
    specs = m.views(base, 32)
    assert default_views(m, base, 32) == specs
    assert [s.size for s in specs] == [32, 32]
    v1, v2 = (s.aug for s in specs)
    assert (v1.blur_p, v1.solarize_p, v2.blur_p, v2.solarize_p) == (1.0, 0.0, 0.1, 0.2)
    assert v1.grayscale_p == v2.grayscale_p == 0.3 and v1.crop_scale == base.crop_scale
    assert base.blur_p == 0.5  # the base config is not modified
    assert small_byol(asymmetric_augs=False).views(base, 32) == [ViewSpec(base, 32), ViewSpec(base, 32)]


def test_byol_architecture():
    m = BYOL(ToyBackbone())
    dims = lambda seq: [(l.in_features, l.out_features) for l in seq if isinstance(l, nn.Linear)]  # noqa: E731
    assert dims(m.projector) == [(16, 2048), (2048, 256)]
    assert dims(m.predictor) == [(256, 2048), (2048, 256)]
    assert dims(m.target_projector) == dims(m.projector)


# --------------------------------------------------------------------------------------------
# SimSiam: heads and the fixed predictor learning rate


def test_simsiam_heads():
    m = SimSiam(ToyBackbone())
    dims = [(l.in_features, l.out_features) for l in m.projector if isinstance(l, nn.Linear)]
    assert dims == [(16, 2048), (2048, 2048), (2048, 2048)]
    assert isinstance(m.projector[-1], nn.BatchNorm1d) and not m.projector[-1].affine
    pdims = [(l.in_features, l.out_features) for l in m.predictor if isinstance(l, nn.Linear)]
    assert pdims == [(2048, 512), (512, 2048)]  # bottleneck: hidden = out / 4
    assert m.momentum_pairs() == []  # no momentum encoder


def test_simsiam_predictor_keeps_a_fixed_lr_and_the_no_decay_split():
    m = small_simsiam()
    base = param_groups(m, 5e-4)
    groups = m.param_groups([dict(g) for g in base])
    pred = {id(p) for p in m.predictor.parameters()}
    fixed = [g for g in groups if g.get("fixed_lr")]
    assert {id(p) for g in fixed for p in g["params"]} == pred
    assert all(id(p) not in pred for g in groups if not g.get("fixed_lr") for p in g["params"])
    # every parameter keeps its weight decay / LARS flags
    flags = {id(p): (g["weight_decay"], g["lars_exclude"]) for g in base for p in g["params"]}
    assert all(flags[id(p)] == (g["weight_decay"], g["lars_exclude"]) for g in groups for p in g["params"])
    assert {(g["weight_decay"], g["lars_exclude"]) for g in fixed} == {(5e-4, False), (0.0, True)}
    # the schedule moves the other groups, never the predictor's
    opt = build_optimizer("sgd", groups, 0.05, weight_decay=5e-4)
    set_lr(opt, 0.001)
    assert all(g["lr"] == (0.05 if g["fixed_lr"] else 0.001) for g in opt.param_groups)
    # the trainer's per-step schedules (apply_schedules) likewise leave the predictor's lr alone
    opt = build_optimizer("sgd", groups, 0.05, weight_decay=5e-4)
    apply_schedules(opt, {"lr": lambda info: 0.002}, step_info(3, 10))
    assert all(g["lr"] == (0.05 if g["fixed_lr"] else 0.002) for g in opt.param_groups)
    assert small_simsiam(fixed_predictor_lr=False).param_groups(base) == base
