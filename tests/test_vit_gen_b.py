"""iBOT and DINOv2 (issue 28, "The ViT generation"): each loss term against an independent float64
implementation of the official formula (value and gradient), Sinkhorn-Knopp against a float64
loop, the masked encoder against timm's own forward, the teacher without gradient, blockwise masks
(fraction, block shape, a pure function of (seed, epoch, sample)), layer-wise lr decay, and the
ResNet refusal. 2 processes = 1, resume and the contract are the registry-wide tests'."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from _steps import batch as make_batch
from torch import Tensor

from sslbench.backbones import create_backbone
from sslbench.core.errors import UserError
from sslbench.core.losses import koleo_loss, masked_patch_cross_entropy, multicrop_cross_entropy, sinkhorn_knopp
from sslbench.core.masked_image import encode_patches
from sslbench.core.masking import BLOCK_DRAWS, block_draws, block_mask, block_masks, mask_weights, patch_grid
from sslbench.methods.dinov2 import DINOv2, DINOv2Config
from sslbench.methods.ibot import IBOT, IBOTConfig

B = 4
HEAD = {"out_dim": 24, "patch_out_dim": 20, "hidden_dim": 16, "bottleneck_dim": 8, "local_crops": 1}


def vit() -> torch.nn.Module:
    return create_backbone("vit_tiny_patch16_224", 32, depth=2, embed_dim=32, num_heads=2)  # 4 px patches: an 8 x 8 grid


def ibot(**kw: Any) -> IBOT:
    torch.manual_seed(0)
    return IBOT(vit(), IBOTConfig(**{**HEAD, **kw}))


def dinov2(**kw: Any) -> DINOv2:
    torch.manual_seed(0)
    return DINOv2(vit(), DINOv2Config(**{**HEAD, **kw}))


def views(n: int = B, seed: int = 1) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, 32, 32, generator=g), torch.randn(n, 3, 32, 32, generator=g), torch.randn(n, 3, 16, 16, generator=g)]


# --------------------------------------------------------------------------------------------
# float64 references, written from the official code's formulas


def ref_sinkhorn(t: Tensor, temp: float, iters: int = 3) -> Tensor:
    """DINOv2's ``sinkhorn_knopp_teacher``, one process, float64, step by step."""
    q = torch.exp(t.double() / temp).T.clone()  # (K, B)
    k, b = q.shape
    q /= q.sum()
    for _ in range(iters):
        for i in range(k):
            q[i] /= q[i].sum() * k
        for j in range(b):
            q[:, j] /= q[:, j].sum() * b
    return (q * b).T


def ref_cls_loss(s: Tensor, p: Tensor, tau_s: float) -> Tensor:
    """Mean over pairs (g, v != g) of the batch-mean cross-entropy; s (V, B, K) logits, p (G, B, K)."""
    total, terms = torch.zeros((), dtype=torch.float64), 0
    for gi in range(p.shape[0]):
        for v in range(s.shape[0]):
            if v != gi:
                total = total + (-(p[gi] * F.log_softmax(s[v] / tau_s, dim=-1)).sum(-1)).mean()
                terms += 1
    return total / terms


def ref_patch_loss(s: Tensor, p: Tensor, masks: Tensor, tau_s: float) -> Tensor:
    """iBOT's per-view loss2: per sample the masked mean of the cross-entropy, mean over samples,
    then over the G views. s, p: (G, B, N, K); masks (G, B, N)."""
    out = torch.zeros((), dtype=torch.float64)
    for gi in range(s.shape[0]):
        ce = -(p[gi] * F.log_softmax(s[gi] / tau_s, dim=-1)).sum(-1)  # (B, N)
        m = masks[gi].double()
        out = out + ((ce * m).sum(-1) / m.sum(-1).clamp(min=1)).mean()
    return out / s.shape[0]


def ref_koleo(x: Tensor, eps: float = 1e-8) -> Tensor:
    """-mean_i log(||z_i - z_nn(i) + eps|| + eps), z = x / ||x||, by loops."""
    z = x / x.norm(dim=1, keepdim=True).clamp(min=eps)
    terms = []
    for i in range(z.shape[0]):
        best = max((j for j in range(z.shape[0]) if j != i), key=lambda j: float(z[i].detach() @ z[j].detach()))
        terms.append(torch.log((z[i] - z[best] + eps).norm() + eps))
    return -torch.stack(terms).mean()


# --------------------------------------------------------------------------------------------
# Loss terms


def test_sinkhorn_matches_the_official_loop() -> None:
    t = torch.randn(10, 7)
    got = sinkhorn_knopp(t, 0.07, 3)
    torch.testing.assert_close(got.double(), ref_sinkhorn(t, 0.07), rtol=1e-5, atol=1e-7)
    assert torch.allclose(got.sum(1), torch.ones(10))


def test_dino_cls_loss_with_sinkhorn_targets_value_and_gradient() -> None:
    g, v, b, k = 2, 3, 5, 11
    gen = torch.Generator().manual_seed(0)
    s = torch.randn(v, b, k, generator=gen).requires_grad_()
    s64 = s.detach().double().requires_grad_()
    t = 2 * torch.rand(g * b, k, generator=gen) - 1  # cosines, sinkhorn_knopp's domain (randn overflowed exp(t / 0.04) in float32 above 3.5)
    p = sinkhorn_knopp(t, 0.04, 3).view(g, b, k)
    loss = multicrop_cross_entropy(p, F.log_softmax(s / 0.1, dim=-1))
    want = ref_cls_loss(s64, ref_sinkhorn(t, 0.04).view(g, b, k), 0.1)
    loss.backward()
    want.backward()
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s.grad.double(), s64.grad, rtol=1e-4, atol=1e-7)  # type: ignore[union-attr]


def test_patch_loss_value_and_gradient() -> None:
    g, b, n, k = 2, 3, 6, 9
    gen = torch.Generator().manual_seed(0)
    masks = torch.rand(g, b, n, generator=gen) < 0.4
    masks[0, 0] = False  # a view without masked patches counts as 0
    s = torch.randn(g, b, n, k, generator=gen)
    p = F.softmax(torch.randn(g, b, n, k, generator=gen) / 0.07, dim=-1)
    flat = masks.view(g * b, n)
    s_m = s.view(g * b, n, k)[flat].clone().requires_grad_()
    loss = masked_patch_cross_entropy(p.view(g * b, n, k)[flat], s_m, mask_weights(flat), g * b, 0.1)
    s64 = s.double().requires_grad_()
    want = ref_patch_loss(s64, p.double(), masks, 0.1)
    loss.backward()
    want.backward()
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s_m.grad.double(), s64.grad.view(g * b, n, k)[flat], rtol=1e-4, atol=1e-7)  # type: ignore[union-attr]


def test_koleo_value_and_gradient() -> None:
    x = torch.randn(7, 5, requires_grad=True)
    x64 = x.detach().double().requires_grad_()
    loss, want = koleo_loss(x), ref_koleo(x64)
    loss.backward()
    want.backward()
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-6)  # type: ignore[union-attr]


# --------------------------------------------------------------------------------------------
# The methods' losses, recomputed from timm's own forward


def _timm_tokens(v: torch.nn.Module, x: Tensor, mask: Tensor | None = None, token: Tensor | None = None) -> Tensor:
    """timm's forward_features, the masked patch embeddings replaced through a forward hook."""

    def hook(_m: Any, _i: Any, out: Tensor) -> Tensor:
        out = out.clone()
        flat = out.view(out.shape[0], -1, out.shape[-1])
        flat[mask] = token.to(out.dtype)  # type: ignore[index, union-attr]
        return out

    h = v.patch_embed.register_forward_hook(hook) if mask is not None else None  # type: ignore[union-attr]
    try:
        return v.forward_features(x)  # type: ignore[operator, no-any-return]
    finally:
        if h is not None:
            h.remove()


def test_masked_encoder_is_timms_forward_with_the_mask_token() -> None:
    m = ibot()
    x = views()[0]
    masks = m.masks(make_batch(views()), 0, 32)
    torch.nn.init.normal_(m.mask_token)
    torch.testing.assert_close(encode_patches(m.encoder, x)[:, 0], m.encoder(x))  # the [CLS] token is the evaluated feature
    torch.testing.assert_close(encode_patches(m.encoder, x, replace=masks, mask_token=m.mask_token), _timm_tokens(m.encoder, x, masks, m.mask_token))


def test_ibot_step_equals_the_official_losses() -> None:
    m = ibot()
    torch.nn.init.normal_(m.mask_token)
    vs = views()
    batch = make_batch(vs, step=3)
    loss, logs = m.training_step(batch)
    masks = torch.stack([m.masks(batch, i, 32) for i in range(2)])  # (G, B, N)
    with torch.no_grad():
        t_tok = torch.stack([_timm_tokens(m.teacher_encoder, x) for x in vs[:2]]).double()  # (G, B, 1 + N, D)
        th = m.teacher_head.double()
        t_cls, t_patch = th(t_tok[:, :, 0]), th(t_tok[:, :, 1:])
    sh = m.head.double()
    s_glob = torch.stack([_timm_tokens(m.encoder, x, masks[i].view(B, -1), m.mask_token) for i, x in enumerate(vs[:2])]).double()
    s_cls = torch.cat([sh(s_glob[:, :, 0]), sh(m.encoder(vs[2]).double()).unsqueeze(0)])
    tc, tp = m.teacher_temps(batch.info)
    want_cls = ref_cls_loss(s_cls, F.softmax(t_cls / tc, dim=-1), 0.1)  # both centres start at 0
    want_patch = ref_patch_loss(sh(s_glob[:, :, 1:]), F.softmax(t_patch / tp, dim=-1), masks, 0.1)
    torch.testing.assert_close(logs["loss_cls"].double(), want_cls, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logs["loss_patch"].double(), want_patch, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(loss.double(), (want_cls + want_patch).detach(), rtol=1e-4, atol=1e-5)
    # centre2 <- 0.9 * 0 + 0.1 * (mean over patches, then over the G B samples) of the teacher's patch logits
    torch.testing.assert_close(m.patch_center.center.double().view(-1), 0.1 * t_patch.mean(dim=2).mean(dim=(0, 1)), rtol=1e-4, atol=1e-6)
    assert 0 < masks.float().mean() <= 0.5


def test_dinov2_step_equals_the_official_losses() -> None:
    m = dinov2()
    torch.nn.init.normal_(m.mask_token)
    vs = views()
    batch = make_batch(vs, step=2)
    loss, logs = m.training_step(batch)
    masks = torch.stack([m.masks(batch, i, 32) for i in range(2)])  # (G, B, N)
    assert masks.any() and not masks.view(2 * B, -1).all(dim=1).any()
    temp = logs["teacher_temp"].item()
    with torch.no_grad():
        t_tok = torch.stack([_timm_tokens(m.teacher_encoder, x) for x in vs[:2]])  # (G, B, 1 + N, D)
        t_cls = ref_sinkhorn(m.teacher_head(t_tok[:, :, 0].reshape(2 * B, -1)), temp).view(2, B, -1)
        t_pm = ref_sinkhorn(m.teacher_patch_head(t_tok[:, :, 1:][masks]), temp)  # (M, K') over the masked patches
    s_glob = torch.stack([_timm_tokens(m.encoder, x, masks[i].view(B, -1), m.mask_token) for i, x in enumerate(vs[:2])]).double()
    sh, ph = m.head.double(), m.patch_head.double()
    s_cls = torch.cat([sh(s_glob[:, :, 0]), sh(m.encoder(vs[2]).double()).unsqueeze(0)])
    want_dino = ref_cls_loss(s_cls, t_cls, 0.1)
    t_patch = torch.zeros(2, B, masks.shape[-1], t_pm.shape[-1], dtype=torch.float64)
    t_patch[masks] = t_pm
    want_ibot = ref_patch_loss(ph(s_glob[:, :, 1:]), t_patch, masks, 0.1)
    want_koleo = ref_koleo(s_glob[0, :, 0]) + ref_koleo(s_glob[1, :, 0])
    torch.testing.assert_close(logs["loss_dino"].double(), want_dino, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logs["loss_ibot"].double(), want_ibot, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logs["loss_koleo"].double(), want_koleo, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(loss.double(), (want_dino + want_ibot + 0.1 * want_koleo).detach(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("build", [ibot, dinov2])
def test_teacher_gets_no_gradient_and_the_student_does(build: Any) -> None:
    m = build()
    loss, _ = m.training_step(make_batch(views()))
    loss.backward()
    teachers = [n for n, _ in m.named_parameters() if n.startswith("teacher_")]
    assert teachers and all(not p.requires_grad and p.grad is None for n, p in m.named_parameters() if n.startswith("teacher_"))
    assert m.mask_token.grad is not None and m.mask_token.grad.abs().sum() > 0
    assert all(p.grad is not None for n, p in m.named_parameters() if p.requires_grad)


# --------------------------------------------------------------------------------------------
# Blockwise masks


def test_block_mask_blocks_are_rectangles_of_the_aspect_range() -> None:
    gen = torch.Generator().manual_seed(0)
    aspects = []
    for _ in range(300):
        u = iter(torch.rand(BLOCK_DRAWS, generator=gen).tolist())  # one attempt: at most one block
        mask = block_mask(u, (32, 32), 16.0, 16.0, math.inf, (0.3, 1 / 0.3))  # area 16
        if mask.any():
            rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
            h, w = int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)
            assert int(mask.sum()) == h * w <= 16  # one full rectangle, never more than the target
            aspects.append(h / w)
    # sides round(sqrt(16 r)) x round(sqrt(16 / r)) for r in 0.3-3.3: aspects 2/7 to 7/2
    assert len(aspects) > 100 and 2 / 7 <= min(aspects) < 0.6 and 1.7 < max(aspects) <= 7 / 2


@pytest.mark.parametrize(
    "grid,min_area,max_block,aspect",
    [
        ((8, 8), 4.0, math.inf, (0.3, 1 / 0.3)),
        ((8, 8), 4.0, 32.0, (0.3, 1 / 0.3)),
        ((14, 14), 16.0, math.inf, (0.3, 1 / 0.3)),
        ((2, 3), 1.0, 3.0, (0.5, 2.0)),
    ],
)
def test_block_masks_on_the_device_equal_the_sequential_algorithm_row_by_row(grid, min_area, max_block, aspect) -> None:
    """The batched, fixed-length :func:`block_masks` against :func:`block_mask` (BEiT's Alg. 1 as a
    Python loop) on the same rows of uniforms, over targets from none to every patch."""
    gen = torch.Generator().manual_seed(1)
    n = grid[0] * grid[1]
    u = torch.rand(200, block_draws(grid), generator=gen)
    targets = torch.cat([torch.tensor([0.0, 1.0, float(n), n / 2 + 0.5]), torch.rand(196, generator=gen, dtype=torch.float64) * n])
    got = block_masks(u, grid, targets, min_area, max_block, aspect)
    for row, t, m in zip(u.tolist(), targets.tolist(), got):
        assert torch.equal(m, block_mask(iter(row), grid, t, min_area, max_block, aspect).flatten())
    assert got.any(1).float().mean() > 0.75  # most rows draw blocks: the comparison is not between empty masks


def _host_targets(m: Any, batch: Any, view: int, n: int) -> list[float]:
    """The targets as the plugins computed them on the host before the device version (Python floats)."""
    if isinstance(m, IBOT):
        k = len(m.cfg.pred_ratio)
        r = batch.uniform(2 * view, k + 1).tolist()
        pick = [min(int(u[k] * k), k - 1) for u in r]
        return [(m.cfg.pred_ratio[i] + (2 * u[i] - 1) * m.cfg.pred_ratio_var[i]) * n for i, u in zip(pick, r)]
    lo, hi = m.cfg.mask_ratio
    return [float(int(n * (lo + u[1] * (hi - lo)))) if u[0] < m.cfg.mask_probability else 0.0 for u in batch.uniform(2 * view, 2).tolist()]


@pytest.mark.parametrize("build", [ibot, dinov2])
def test_the_plugins_masks_equal_the_host_computation(build: Any) -> None:
    m = build()
    b = make_batch([torch.zeros(64, 3, 32, 32)] * 2, index=torch.arange(1000, 1064))
    grid = patch_grid(m.encoder, 32)
    n = grid[0] * grid[1]
    for view in range(2):
        u = b.uniform(2 * view + 1, block_draws(grid))
        if isinstance(m, IBOT):
            args = ((min(grid) // 3) ** 2, math.inf, m.cfg.pred_aspect_ratio)
        else:
            args = (m.cfg.mask_min_patches, m.cfg.mask_max_block * n, m.cfg.mask_aspect)
        want = torch.stack([block_mask(iter(r), grid, t, *args).flatten() for r, t in zip(u.tolist(), _host_targets(m, b, view, n))])
        assert torch.equal(m.masks(b, view, 32), want)


def test_ibot_mask_fraction_in_the_official_range() -> None:
    m = ibot()
    b = make_batch([torch.zeros(256, 3, 32, 32)] * 2, index=torch.arange(256))
    frac = torch.cat([m.masks(b, i, 32) for i in range(2)]).float().mean(1)  # per view
    none = (frac == 0).float().mean()
    assert 0.4 < none < 0.6  # pred_ratio (0, 0.3): half the views unmasked
    masked = frac[frac > 0]
    assert masked.max() <= 0.5 + 1e-6 and masked.min() >= 1 / 64  # ratio 0.3 +- 0.2 of 64 patches (blocks stop at the target)
    assert 0.2 < masked.mean() < 0.4


def test_dinov2_mask_fraction_in_the_official_range() -> None:
    m = dinov2()
    b = make_batch([torch.zeros(256, 3, 32, 32)] * 2, index=torch.arange(256))
    frac = torch.cat([m.masks(b, i, 32) for i in range(2)]).float().mean(1)
    assert 0.4 < (frac == 0).float().mean() < 0.6  # mask_probability 0.5
    masked = frac[frac > 0]
    assert masked.max() <= 0.5 and masked.min() >= 1 / 64 and 0.15 < masked.mean() < 0.4  # int(64 * U(0.1, 0.5)) at most


@pytest.mark.parametrize("build", [ibot, dinov2])
def test_masks_are_a_pure_function_of_seed_epoch_sample(build: Any) -> None:
    m = build()
    idx = torch.arange(10, 18)
    x = [torch.zeros(8, 3, 32, 32)] * 2
    a = m.masks(make_batch(x, index=idx), 1, 32)
    perm = torch.randperm(8)
    b = m.masks(make_batch(x, index=idx[perm]), 1, 32)
    assert torch.equal(a[perm], b)  # a sample's mask does not depend on its batch
    assert torch.equal(m.masks(make_batch(x[:1] * 2, index=idx[:3].clone()), 1, 32), a[:3])
    assert not torch.equal(m.masks(make_batch(x, index=idx, seed=1), 1, 32), a)  # another seed
    assert not torch.equal(m.masks(make_batch(x, index=idx, step=100), 1, 32), a)  # another epoch (10 steps per epoch)
    assert not torch.equal(m.masks(make_batch(x, index=idx), 0, 32), a)  # the other global view


# --------------------------------------------------------------------------------------------
# DINOv2's layer-wise lr decay, the ResNet refusal


def test_dinov2_layerwise_lr_decay_groups() -> None:
    from sslbench.core.optim import param_groups

    m = dinov2(layer_decay=0.5, patch_embed_lr_mult=0.2)
    groups = m.param_groups(param_groups(m, 0.04))
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    assert sum(len(g["params"]) for g in groups) == sum(1 for p in m.parameters() if p.requires_grad)
    e = m.encoder
    assert scale[id(e.blocks[1].attn.qkv.weight)] == 0.5 and scale[id(e.blocks[0].mlp.fc1.weight)] == 0.25  # block i: layer i + 1  # type: ignore[union-attr, index]
    assert scale[id(e.pos_embed)] == scale[id(e.cls_token)] == scale[id(m.mask_token)] == 0.125  # layer 0 of 2 blocks
    assert scale[id(e.patch_embed.proj.weight)] == pytest.approx(0.125 * 0.2)  # type: ignore[union-attr]
    assert scale[id(e.norm.weight)] == scale[id(m.head.last_layer.weight_v)] == scale[id(m.patch_head.mlp[0].weight)] == 1.0  # type: ignore[union-attr]
    assert all(g["weight_decay"] == 0.0 for g in groups if any(p is e.norm.weight for p in g["params"]))  # type: ignore[union-attr]


@pytest.mark.parametrize(("cls", "name"), [(IBOT, "ibot"), (DINOv2, "dinov2")])
def test_resnet_backbone_is_refused_in_one_line(cls: Any, name: str) -> None:
    with pytest.raises(UserError, match=f"^{name} needs a vision transformer, got resnet18") as err:
        cls(create_backbone("resnet18", 32), cls.Config(**HEAD))
    assert "\n" not in str(err.value)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ibot", "dinov2"])
def test_a_stopped_and_resumed_run_equals_an_unbroken_one(name: str, tmp_path: Any) -> None:
    """Masks come from (seed, epoch, sample, view), the teacher, its centres and the mask token are
    parameters or buffers: a run stopped after step 3 and resumed ends bit for bit where an unbroken
    one does (sslbench.testing's check; 2 local crops and small heads keep it short: at the default
    widths the heads, their teacher copies and AdamW's moments are 23M numbers in every checkpoint)."""
    from sslbench.testing import check_resume_equals_unbroken

    small = ["local_crops=2", "hidden_dim=64", "bottleneck_dim=32", "out_dim=256", "patch_out_dim=256"]
    check_resume_equals_unbroken(name, sets=small, workdir=tmp_path, env={"SSLBENCH_CACHE": str(tmp_path / "cache")})
