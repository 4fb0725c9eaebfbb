"""Tests for sslbench.core.optim: no-decay groups, LARS, lr scaling and schedule, optimizer factory."""

from __future__ import annotations

import inspect
import math

import pytest
import timm
import torch
from torch import nn

from sslbench.core.dist import SyncBatchNorm
from sslbench.core.errors import UserError
from sslbench.core.optim import (
    LARS,
    NORM_TYPES,
    build_optimizer,
    is_no_decay,
    lr_at,
    param_groups,
    scale_lr,
    set_lr,
    set_scheduled_value,
)

# --------------------------------------------------------------------------------------------
# Parameter groups

MODELS = {
    "resnet18": lambda: timm.create_model("resnet18", num_classes=0),
    "vit_tiny": lambda: timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=32, patch_size=4),
    "convnext_atto": lambda: timm.create_model("convnext_atto", num_classes=0),  # LayerNorm2d
    "convnextv2_atto": lambda: timm.create_model("convnextv2_atto", num_classes=0),  # GlobalResponseNorm
    "efficientnet_evos": lambda: timm.create_model("test_efficientnet_evos", num_classes=0),  # EvoNorm
    "efficientnet": lambda: timm.create_model("test_efficientnet", num_classes=0),  # BatchNormAct2d
}


@pytest.mark.parametrize("name", list(MODELS))
def test_param_groups_exclude_norms_and_biases(name: str) -> None:
    model = MODELS[name]()
    groups = param_groups(model, weight_decay=0.05)
    assert [g["lars_exclude"] for g in groups] == [False, True]
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]
    decayed = {id(p) for p in groups[0]["params"]}
    excluded = {id(p) for p in groups[1]["params"]}
    assert not decayed & excluded
    assert decayed | excluded == {id(p) for p in model.parameters()}
    n_norm = n_weight = 0
    for mname, module in model.named_modules():
        # Classified here independently of the implementation: by class name and attribute.
        is_norm = "Norm" in type(module).__name__ and "Mlp" not in type(module).__name__
        for pname, p in module.named_parameters(recurse=False):
            where = f"{mname}.{pname} ({type(module).__name__})"
            if is_norm or pname == "bias":
                n_norm += is_norm
                assert id(p) in excluded, where
            elif isinstance(module, (nn.Conv2d, nn.Linear)) and pname == "weight":
                n_weight += 1
                assert id(p) in decayed, where
            else:  # e.g. cls_token, pos_embed (decayed), LayerScale gamma (1-D: excluded)
                assert (id(p) in excluded) == (p.ndim <= 1), where
    assert n_norm > 0 and n_weight > 0


def test_is_no_decay_by_type_not_name() -> None:
    conv = nn.Conv2d(3, 4, 3)
    assert not is_no_decay(conv, "weight", conv.weight) and is_no_decay(conv, "bias", conv.bias)
    for norm in (nn.BatchNorm2d(4), nn.GroupNorm(2, 4), nn.LayerNorm(4), nn.RMSNorm(4), SyncBatchNorm(4)):
        assert isinstance(norm, NORM_TYPES)
        assert all(is_no_decay(norm, n, p) for n, p in norm.named_parameters())
    ln2 = nn.LayerNorm([4, 5])  # a 2-D norm weight: excluded because of the module type
    assert ln2.weight.ndim == 2 and is_no_decay(ln2, "weight", ln2.weight)
    lin = nn.Linear(3, 3)
    lin.register_parameter("norm_scale", nn.Parameter(torch.ones(3, 3)))  # a name is not a type
    assert not is_no_decay(lin, "norm_scale", lin.norm_scale)


def test_param_groups_skip_frozen_and_shared() -> None:
    a = nn.Linear(4, 4)
    model = nn.Sequential(a, nn.BatchNorm1d(4), a)  # `a` shared
    model[1].weight.requires_grad_(False)
    groups = param_groups(model, 0.1)
    assert [len(g["params"]) for g in groups] == [1, 2]  # a.weight | a.bias, bn.bias
    assert param_groups(nn.Sequential(nn.BatchNorm1d(3)), 0.1)[0]["lars_exclude"] is True  # empty group dropped


# --------------------------------------------------------------------------------------------
# LARS


def _random_grads(params: list[nn.Parameter], seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)


@pytest.mark.parametrize("nesterov", [False, True])
def test_lars_excluded_group_is_plain_momentum_sgd(nesterov: bool) -> None:
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(5)), nn.Parameter(torch.randn(3, 2))]
    ref = [nn.Parameter(p.detach().clone()) for p in params]
    # weight_decay set on the group on purpose: excluded groups ignore it.
    lars = LARS([{"params": params, "lars_exclude": True, "weight_decay": 0.3}], lr=0.2, nesterov=nesterov)
    sgd = torch.optim.SGD(ref, lr=0.2, momentum=0.9, nesterov=nesterov)
    for step in range(4):
        _random_grads(params, step)
        _random_grads(ref, step)
        lars.step()
        sgd.step()
        for p, q in zip(params, ref):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_lars_trust_ratio_matches_formula() -> None:
    torch.manual_seed(1)
    lr, wd, eta, m = 0.5, 0.1, 0.001, 0.9
    w0 = torch.randn(4, 3)
    w = nn.Parameter(w0.clone())
    opt = LARS([{"params": [w], "weight_decay": wd}], lr=lr, momentum=m, eta=eta)

    g1 = torch.randn(4, 3)
    w.grad = g1.clone()
    opt.step()
    d1 = g1 + wd * w0
    trust1 = eta * w0.norm() / d1.norm()
    assert not math.isclose(float(trust1), 1.0)
    # Compare the steps (about lr * eta * |w| per entry), not the weights, to keep the check tight.
    torch.testing.assert_close(w.detach() - w0, -lr * trust1 * d1)
    assert torch.equal(w.grad, g1)  # the gradient itself is not modified

    w1 = w.detach().clone()
    g2 = torch.randn(4, 3)
    w.grad = g2
    opt.step()
    d2 = g2 + wd * w1
    buf = m * (trust1 * d1) + eta * w1.norm() / d2.norm() * d2
    torch.testing.assert_close(w.detach() - w1, -lr * buf)


@pytest.mark.parametrize(("lr", "rate"), [(5.0, 0.02 * 5.0 / 5.5), (0.01, 0.01)])
def test_lars_clip_matches_solo_learn_formula(lr: float, rate: float) -> None:
    """solo-learn's ``clip_lr`` (``solo/utils/lars.py``): trust = min(eta |w| / |d| / lr, 1), so a
    first step is ``-min(eta |w| / |d|, lr) * d``. By hand: w = (3, 4), |w| = 5; g = (3, 4), wd
    0.1, d = (3.3, 4.4), |d| = 5.5; eta 0.02: eta |w| / |d| = 0.01818. At lr 5 the step size is
    0.01818, not lr times it (0.0909, the unclipped form); at lr 0.01 it is lr itself, 0.01."""
    w0 = torch.tensor([[3.0, 4.0]])
    w = nn.Parameter(w0.clone())
    opt = LARS([{"params": [w], "weight_decay": 0.1}], lr=lr, momentum=0.9, eta=0.02, clip=True)
    w.grad = torch.tensor([[3.0, 4.0]])
    opt.step()
    torch.testing.assert_close(w.detach() - w0, -rate * torch.tensor([[3.3, 4.4]]))


def test_build_optimizer_passes_lars_clip() -> None:
    w = nn.Parameter(torch.ones(2, 2))
    assert build_optimizer("lars", [{"params": [w]}], 0.1, weight_decay=0.0, lars_clip=True).param_groups[0]["clip"] is True
    assert build_optimizer("lars", [{"params": [w]}], 0.1, weight_decay=0.0).param_groups[0]["clip"] is False


def test_lars_trust_ratio_is_one_for_zero_norms() -> None:
    zero_w = nn.Parameter(torch.zeros(3, 3))
    zero_g = nn.Parameter(torch.ones(2, 2))
    opt = LARS([{"params": [zero_w, zero_g], "weight_decay": 0.0}], lr=0.1)
    zero_w.grad = torch.full((3, 3), 2.0)
    zero_g.grad = torch.zeros(2, 2)
    opt.step()
    assert torch.equal(zero_w.detach(), torch.full((3, 3), -0.2))  # lr * 1 * g
    assert torch.equal(zero_g.detach(), torch.ones(2, 2))  # no gradient, no decay: unchanged


def test_lars_on_model_groups_skips_params_without_grad() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    groups = param_groups(model, 1e-4)
    opt = build_optimizer("lars", groups, lr=1.0, weight_decay=1e-4)
    frozen = model[3].weight.detach().clone()
    model[3].weight.requires_grad_(False)
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.randn(6, 4)).sum().backward()
    opt.step()
    assert torch.equal(model[3].weight, frozen)
    changed = [not torch.equal(b, p) for b, p in zip(before, model.parameters())]
    assert changed == [True, True, True, True, False, True]
    loaded = build_optimizer("lars", groups, lr=1.0, weight_decay=1e-4)
    loaded.load_state_dict(opt.state_dict())
    assert len(loaded.state) == len(opt.state) == 5


# --------------------------------------------------------------------------------------------
# Learning rates


def test_scale_lr() -> None:
    assert scale_lr(0.3, 512, "linear") == pytest.approx(0.6)
    assert scale_lr(0.075, 4096, "sqrt") == pytest.approx(4.8)
    assert scale_lr(0.05, 999, "none") == 0.05
    with pytest.raises(UserError, match="linear, sqrt, none"):
        scale_lr(0.1, 256, "quadratic")
    with pytest.raises(UserError):
        scale_lr(0.1, 0, "linear")


def test_lr_at_warmup_then_cosine() -> None:
    base, total, warm = 2.0, 110, 10
    lrs = [lr_at(s, total, base_lr=base, warmup_steps=warm, final_ratio=0.1) for s in range(total + 5)]
    assert lrs[0] == base / warm and lrs[4] == pytest.approx(base / 2)
    assert lrs[warm - 1] == base and lrs[warm] == base
    assert all(a < b for a, b in zip(lrs[:warm], lrs[1:warm]))  # warm-up increases
    assert all(a > b for a, b in zip(lrs[warm:total], lrs[warm + 1 : total + 1]))  # cosine decreases
    assert lrs[warm + 50] == pytest.approx((base + 0.2) / 2)  # half-way: midpoint of base and final
    assert lrs[total] == pytest.approx(0.2) and lrs[total + 4] == lrs[total]
    assert lr_at(0, 10, base_lr=1.0, warmup_steps=0) == 1.0
    assert lr_at(10, 10, base_lr=1.0, warmup_steps=0) == 0.0
    assert lr_at(3, 4, base_lr=1.0, warmup_steps=8) == 0.5  # warm-up longer than training
    with pytest.raises(UserError):
        lr_at(-1, 10, base_lr=1.0, warmup_steps=0)


def test_set_lr_respects_fixed_lr_and_scale() -> None:
    a, b, c = (nn.Parameter(torch.zeros(2)) for _ in range(3))
    opt = build_optimizer(
        "sgd",
        [{"params": [a]}, {"params": [b], "lr": 0.05, "fixed_lr": True}, {"params": [c], "lr_scale": 0.1}],
        lr=1.0,
        weight_decay=0.0,
    )
    assert [g["fixed_lr"] for g in opt.param_groups] == [False, True, False]
    assert [g["lr"] for g in opt.param_groups] == [1.0, 0.05, 1.0]
    set_lr(opt, lr_at(5, 100, base_lr=1.0, warmup_steps=10))
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.6, 0.05, 0.06])


def test_set_scheduled_value_is_the_rule_of_every_scheduled_key() -> None:
    a, b, c = (nn.Parameter(torch.zeros(2)) for _ in range(3))
    groups = [{"params": [a]}, {"params": [b], "weight_decay": 0.0, "fixed_weight_decay": True}, {"params": [c], "weight_decay_scale": 0.5}]
    opt = build_optimizer("sgd", groups, lr=1.0, weight_decay=0.1)
    set_scheduled_value(opt, "weight_decay", 0.3)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.3, 0.0, 0.15]
    set_scheduled_value(opt, "lr", 0.25)  # set_lr's rule
    assert [g["lr"] for g in opt.param_groups] == [0.25, 0.25, 0.25]


# --------------------------------------------------------------------------------------------
# Factory


def test_build_optimizer_kinds_and_defaults() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    groups = param_groups(model, 0.1)
    sgd = build_optimizer("sgd", groups, 0.5, momentum=0.8, weight_decay=0.1)
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["foreach"] and sgd.defaults["momentum"] == 0.8
    assert [g["weight_decay"] for g in sgd.param_groups] == [0.1, 0.0]
    lars = build_optimizer("lars", groups, 0.5, weight_decay=1e-6)
    assert isinstance(lars, LARS) and [g["lars_exclude"] for g in lars.param_groups] == [False, True]
    adamw = build_optimizer("adamw", groups, 1e-3, weight_decay=0.05, betas=(0.9, 0.95))
    assert isinstance(adamw, torch.optim.AdamW) and adamw.defaults["betas"] == (0.9, 0.95)
    assert adamw.defaults["foreach"] and not adamw.defaults["fused"]
    assert all(len(g["params"]) for g in groups)  # the caller's groups are not consumed
    with pytest.raises(UserError, match="sgd, lars, adamw"):
        build_optimizer("adam", groups, 0.1, weight_decay=0.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_build_adamw_fused_on_cuda() -> None:
    model = nn.Linear(3, 4).cuda()
    opt = build_optimizer("adamw", param_groups(model, 0.05), 1e-3, weight_decay=0.05)
    assert opt.defaults["fused"]
    if "fused" in inspect.signature(torch.optim.SGD).parameters:
        assert build_optimizer("sgd", param_groups(model, 0.05), 0.1, weight_decay=0.05).defaults["fused"]
    model(torch.randn(2, 3, device="cuda")).sum().backward()
    opt.step()
    lars = build_optimizer("lars", param_groups(model, 0.05), 0.1, weight_decay=0.05)
    lars.step()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_trainer_on_cuda_builds_a_fused_adamw_and_lets_cudnn_pick_its_fastest_kernels(tmp_path, monkeypatch) -> None:
    import sslbench.train.run_setup as run_setup
    import sslbench.train.trainer as trainer
    from sslbench.config import build_config

    built = []

    def spy(*args, **kwargs):
        built.append(build_optimizer(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(run_setup, "build_optimizer", spy)
    cfg = build_config(
        flags={"method": "simclr", "steps": 2, "batch_size": 32, "optimizer": "adamw", "output": str(tmp_path / "run")},
        sets=["quick_knn=false"],
    )
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    trainer.train(cfg, quiet=True)
    assert built and built[0].defaults["fused"]  # the optimizer was built on CUDA parameters
    assert torch.backends.cudnn.benchmark
