"""Peer builders of ``benchmarks/peer_parity.py`` for the methods after its first ten: one small
function per method, each assembled from lightly's parts with lightly's published recipe for it
(the file and lines are in ``peer_parity.RECIPES``). Imported only when a peer side trains, so
lightly stays a benchmark-only dependency.

Every builder returns what ``peer_parity.build_peer`` returns: ``(model, transform,
training_step(views, epoch), optimizer, scheduler, per_step)``; ``model.backbone`` is the encoder
that is scored. Where lightly's recipe runs Lightning hooks around the optimizer step (gradient
clipping, a weight-decay schedule, the last layer frozen in the first epoch, a teacher update after
the step), :class:`HookedOptimizer` runs them in Lightning's order inside ``step()``.

Lightly's ImageNet recipes count warm-ups in epochs of a 100-epoch run (``benchmarks/imagenet/*/main.py``
default ``--epochs 100``); here they are the same share of the run's steps, as the MAE entry does.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

Peer = tuple[Any, Any, Callable[..., Any], Any, Any, bool]
IMAGENET_EPOCHS = 100  # lightly's ImageNet benchmarks' default --epochs, the unit of their warm-ups


class HookedOptimizer:
    """An optimizer whose ``step()`` runs ``before()`` (Lightning's ``on_before_optimizer_step`` and
    gradient clipping), the wrapped optimizer's step, then ``after()`` (``on_train_batch_end``)."""

    def __init__(self, opt: torch.optim.Optimizer, before: Callable[[], None], after: Callable[[], None]) -> None:
        self.opt, self.before, self.after = opt, before, after

    def zero_grad(self) -> None:
        self.opt.zero_grad()

    def step(self) -> None:
        self.before()
        self.opt.step()
        self.after()


def _constant(opt: torch.optim.Optimizer) -> Any:
    """The examples' loops have no schedule: a constant learning rate."""
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)


def _cifar_sgd(params: Any, batch_size: int, epochs: int, lr: float | None = None) -> tuple[Any, Any]:
    """The CIFAR-10 benchmark's shared optimizer: SGD 0.06 x B/128 (or ``lr``), momentum 0.9, wd 5e-4, cosine per epoch."""
    opt = torch.optim.SGD(params, lr=6e-2 * batch_size / 128 if lr is None else lr, momentum=0.9, weight_decay=5e-4)
    return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)


def _momentum_copy(m: nn.Module, *names: str) -> None:
    """``<name>_momentum``: a frozen deep copy of each named submodule."""
    from lightly.models import utils

    for name in names:
        twin = copy.deepcopy(getattr(m, name))
        utils.deactivate_requires_grad(twin)
        setattr(m, f"{name}_momentum", twin)


def _to_patches(size: float, patch: int) -> int:
    """A crop side scaled to the image size, rounded to whole ViT patches (at least one)."""
    return max(patch, round(size / patch) * patch)


# --------------------------------------------------------------------------------------------
# ResNet methods


def dcl(ctx: Any, weighted: bool) -> Peer:
    """CIFAR-10 benchmark ``DCL`` / ``DCLW``: SimCLR's head and transform with DCL(W)Loss."""
    from lightly.loss import DCLLoss, DCLWLoss
    from lightly.models.modules import heads
    from lightly.transforms import SimCLRTransform

    m = nn.Module()
    m.backbone = ctx.backbone
    m.projection_head = heads.SimCLRProjectionHead(ctx.F, 512, 128)
    crit = DCLWLoss() if weighted else DCLLoss()

    def step(views: list[Any], epoch: int) -> Any:
        return crit(m.projection_head(ctx.emb(m.backbone, views[0])), m.projection_head(ctx.emb(m.backbone, views[1])))

    t = SimCLRTransform(input_size=ctx.S, cj_strength=0.5, gaussian_blur=0.0)
    return m, t, step, *_cifar_sgd(m.parameters(), ctx.B, ctx.E), False


def tico(ctx: Any) -> Peer:
    """``benchmarks/imagenet/resnet50/tico.py`` on the small backbone, TiCoTransform at 32 px without blur."""
    from lightly.loss import TiCoLoss
    from lightly.models.modules.heads import TiCoProjectionHead
    from lightly.models.utils import get_weight_decay_parameters, update_momentum
    from lightly.transforms.tico_transform import TiCoTransform, TiCoView1Transform, TiCoView2Transform
    from lightly.utils.lars import LARS
    from lightly.utils.scheduler import CosineWarmupScheduler, cosine_schedule

    m = nn.Module()
    m.backbone = ctx.backbone
    m.projection_head = TiCoProjectionHead(ctx.F, 4096, 256)
    _momentum_copy(m, "backbone", "projection_head")
    crit = TiCoLoss(beta=0.9, rho=8.0)
    total = ctx.steps_per_epoch * ctx.E
    global_step = [0]

    def step(views: list[Any], epoch: int) -> Any:
        mom = cosine_schedule(step=global_step[0], max_steps=total, start_value=0.99, end_value=1.0)
        global_step[0] += 1
        update_momentum(m.backbone, m.backbone_momentum, m=mom)
        update_momentum(m.projection_head, m.projection_head_momentum, m=mom)
        z = m.projection_head(ctx.emb(m.backbone, views[0]))
        with torch.no_grad():
            z_m = m.projection_head_momentum(ctx.emb(m.backbone_momentum, views[1])).detach()
        return crit(z, z_m)

    params, no_wd = get_weight_decay_parameters([m.backbone, m.projection_head])
    opt = LARS(
        [{"name": "tico", "params": params}, {"name": "tico_no_weight_decay", "params": no_wd, "weight_decay": 0.0}],
        lr=0.2 * ctx.B / 256,
        momentum=0.9,
        weight_decay=1.5e-6,
    )
    sched = CosineWarmupScheduler(optimizer=opt, warmup_epochs=int(total * 10 / IMAGENET_EPOCHS), max_epochs=total)
    t = TiCoTransform(
        view_1_transform=TiCoView1Transform(input_size=ctx.S, gaussian_blur=0.0),
        view_2_transform=TiCoView2Transform(input_size=ctx.S, gaussian_blur=0.0),
    )
    return m, t, step, opt, sched, True


def mmcr(ctx: Any) -> Peer:
    """``examples/pytorch/mmcr.py``: k=8 views, online and momentum projections, SGD 0.06, no schedule."""
    from lightly.loss import MMCRLoss
    from lightly.models.modules import MMCRProjectionHead
    from lightly.models.utils import update_momentum
    from lightly.transforms.mmcr_transform import MMCRTransform
    from lightly.utils.scheduler import cosine_schedule

    m = nn.Module()
    m.backbone = ctx.backbone
    m.projection_head = MMCRProjectionHead(ctx.F, 512, 128)
    _momentum_copy(m, "backbone", "projection_head")
    crit = MMCRLoss()

    def step(views: list[Any], epoch: int) -> Any:
        mom = cosine_schedule(epoch, ctx.E, 0.996, 1)  # per epoch, as the example
        update_momentum(m.backbone, m.backbone_momentum, m=mom)
        update_momentum(m.projection_head, m.projection_head_momentum, m=mom)
        z_o = torch.stack([m.projection_head(ctx.emb(m.backbone, x)) for x in views], dim=1)
        z_m = torch.stack([m.projection_head_momentum(ctx.emb(m.backbone_momentum, x)).detach() for x in views], dim=1)
        return crit(z_o, z_m)

    opt = torch.optim.SGD([*m.backbone.parameters(), *m.projection_head.parameters()], lr=0.06)
    return m, MMCRTransform(k=8, input_size=ctx.S, gaussian_blur=0.0), step, opt, _constant(opt), False


def vicregl(ctx: Any) -> Peer:
    """``examples/pytorch/vicregl.py``: global and local heads on the final feature map, no local views."""
    from lightly.loss import VICRegLLoss
    from lightly.models.modules import BarlowTwinsProjectionHead
    from lightly.models.modules.heads import VicRegLLocalProjectionHead
    from lightly.transforms.vicregl_transform import VICRegLTransform

    m = nn.Module()
    m.backbone = ctx.backbone
    m.projection_head = BarlowTwinsProjectionHead(ctx.F, 2048, 2048)
    m.local_projection_head = VicRegLLocalProjectionHead(ctx.F, 128, 128)
    pool = nn.AdaptiveAvgPool2d(output_size=(1, 1))
    with torch.no_grad():
        grid = int(m.backbone.forward_features(torch.zeros(2, 3, ctx.S, ctx.S)).shape[-1])
    # lightly's 20 and 4 matches are of the 7x7 grid of a ResNet at 224 px: the same shares of this grid
    matches = tuple(max(1, round(n * grid * grid / 49)) for n in (20, 4))
    crit = VICRegLLoss(num_matches=matches)

    def features(x: Any) -> tuple[Any, Any]:
        f = m.backbone.forward_features(x)
        return m.projection_head(pool(f).flatten(start_dim=1)), m.local_projection_head(f.permute(0, 2, 3, 1))

    def step(views_and_grids: list[Any], epoch: int) -> Any:
        views, grids = views_and_grids[: len(views_and_grids) // 2], views_and_grids[len(views_and_grids) // 2 :]
        feats = [features(v) for v in views]
        return crit(global_view_features=feats[:2], global_view_grids=grids[:2], local_view_features=feats[2:], local_view_grids=grids[2:])

    opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
    t = VICRegLTransform(global_crop_size=ctx.S, n_local_views=0, global_grid_size=grid)
    return m, t, step, opt, _constant(opt), False


def lejepa(ctx: Any) -> Peer:
    """``benchmarks/imagenet/vitb16/lejepa.py`` on the ResNet (sslbench's LeJEPA default family):
    LeJEPAProjectionHead, LeJEPALoss, DINOTransform's 2 global + 6 local views at 32/14 px, no blur."""
    from lightly.loss import LeJEPALoss
    from lightly.models.modules import LeJEPAProjectionHead
    from lightly.transforms import DINOTransform
    from lightly.utils.scheduler import CosineWarmupScheduler

    m = nn.Module()
    m.backbone = ctx.backbone
    m.projection_head = LeJEPAProjectionHead(input_dim=ctx.F)
    crit = LeJEPALoss()

    def step(views: list[Any], epoch: int) -> Any:
        g, l = views[:2], views[2:]
        g_proj = torch.stack(m.projection_head(ctx.emb(m.backbone, torch.cat(g))).chunk(len(g)))
        l_proj = torch.stack(m.projection_head(ctx.emb(m.backbone, torch.cat(l))).chunk(len(l)))
        return crit(local_proj=l_proj, global_proj=g_proj)

    opt = torch.optim.AdamW([{"name": "lejepa", "params": list(m.parameters()), "weight_decay": 5e-2}], lr=5e-4)
    total = ctx.steps_per_epoch * ctx.E
    sched = CosineWarmupScheduler(
        optimizer=opt, warmup_epochs=max(1, ctx.steps_per_epoch), max_epochs=total, warmup_start_value=0.01, end_value=0.001
    )
    t = DINOTransform(
        global_crop_size=ctx.S,
        local_crop_size=round(ctx.S * 96 / 224),
        global_crop_scale=(0.3, 1),
        local_crop_scale=(0.05, 0.3),
        gaussian_blur=(0, 0, 0),
        n_local_views=6,
    )
    return m, t, step, opt, sched, True


# --------------------------------------------------------------------------------------------
# ViT methods (ctx.backbone is sslbench's timm ViT; lightly's masked-ViT wrappers share its weights)


def msn(ctx: Any) -> Peer:
    """``examples/pytorch/msn.py``: EMA target, anchors with 15% of the tokens dropped, focal views, MSNLoss."""
    from lightly.loss import MSNLoss
    from lightly.models import utils
    from lightly.models.modules import MaskedVisionTransformerTIMM
    from lightly.models.modules.heads import MSNProjectionHead
    from lightly.transforms.msn_transform import MSNTransform

    vit = ctx.backbone
    m = nn.Module()
    m.anchor_backbone = MaskedVisionTransformerTIMM(vit=vit)  # trained (the example's anchor_backbone)
    m.anchor_projection_head = MSNProjectionHead(input_dim=int(vit.embed_dim))
    m.target_backbone = copy.deepcopy(m.anchor_backbone)  # the example's EMA ``backbone``
    m.target_projection_head = copy.deepcopy(m.anchor_projection_head)
    utils.deactivate_requires_grad(m.target_backbone)
    utils.deactivate_requires_grad(m.target_projection_head)
    m.prototypes = nn.Linear(256, 1024, bias=False).weight
    m.backbone = vit  # the scored encoder, the anchor's ViT
    patch, prefix = int(vit.patch_embed.patch_size[0]), int(vit.num_prefix_tokens)
    crit = MSNLoss()

    def masked(images: Any) -> Any:
        seq = (images.shape[-1] // patch) ** 2 + prefix
        idx_keep, _ = utils.random_token_mask(size=(images.shape[0], seq), mask_ratio=0.15, device=images.device)
        return m.anchor_projection_head(m.anchor_backbone(images=images, idx_keep=idx_keep))

    def step(views: list[Any], epoch: int) -> Any:
        utils.update_momentum(m.anchor_backbone, m.target_backbone, 0.996)
        utils.update_momentum(m.anchor_projection_head, m.target_projection_head, 0.996)
        targets_out = m.target_projection_head(m.target_backbone(images=views[0]))
        anchors_out = torch.cat([masked(views[1]), masked(torch.cat(views[2:]))])
        return crit(anchors_out, targets_out, m.prototypes.data)  # .data: as the example (prototypes get no gradient)

    params = [*m.anchor_backbone.parameters(), *m.anchor_projection_head.parameters(), m.prototypes]
    opt = torch.optim.AdamW(params, lr=1.5e-4)
    t = MSNTransform(random_size=ctx.S, focal_size=_to_patches(ctx.S * 96 / 224, patch))
    return m, t, step, opt, _constant(opt), False


def ijepa(ctx: Any) -> Peer:
    """``examples/pytorch/ijepa.py`` on sslbench's timm ViT (the example builds torchvision's ViT-B/32):
    IJEPAMaskCollator with its defaults (1 context block, 2 target blocks, drawn per batch),
    IJEPAPredictorTIMM, an EMA target encoder (0.996 -> 1 linearly over the run, after each step),
    layer-normed target patch tokens, SmoothL1Loss, AdamW 1.5e-4 with no schedule; IJEPATransform.
    The collator runs in the training step on the collated batch (its masks do not depend on the
    images). The predictor's depth and width are sslbench's defaults on both sides (``ctx.sizes``)."""
    import torch.nn.functional as F
    from lightly.data import IJEPAMaskCollator
    from lightly.models import utils
    from lightly.models.modules import MaskedVisionTransformerTIMM
    from lightly.models.modules.ijepa_timm import IJEPAPredictorTIMM
    from lightly.transforms.ijepa_transform import IJEPATransform

    vit = ctx.backbone
    m = nn.Module()
    m.backbone = vit
    m.encoder = MaskedVisionTransformerTIMM(vit=vit)
    m.target_encoder = copy.deepcopy(m.encoder)
    utils.deactivate_requires_grad(m.target_encoder)
    patch, prefix = int(vit.patch_embed.patch_size[0]), int(vit.num_prefix_tokens)
    m.predictor = IJEPAPredictorTIMM(
        num_patches=int(vit.patch_embed.num_patches),
        depth=ctx.sizes["predictor_depth"],
        mlp_dim=int(vit.embed_dim),
        predictor_embed_dim=ctx.sizes["predictor_dim"],
        num_heads=int(vit.blocks[0].attn.num_heads),
    )
    collator = IJEPAMaskCollator(input_size=ctx.S, patch_size=patch)
    crit = nn.SmoothL1Loss()
    total, done = ctx.steps_per_epoch * ctx.E, [0]

    def step(views: list[Any], epoch: int) -> Any:
        images = views[0]
        _, masks_enc, masks_pred = collator([(0, 0)] * len(images))  # masks only: the images are collated already
        with torch.no_grad():  # the example's forward_target (patch tokens: the timm ViT's prefix tokens dropped)
            h = m.target_encoder.encode(images)[:, prefix:]
            h = F.layer_norm(h, (h.size(-1),))
            h = utils.repeat_interleave_batch(utils.apply_masks(h, masks_pred), len(images), repeat=len(masks_enc))
        z = torch.cat([m.encoder.encode(images, idx_keep=mask + prefix) for mask in masks_enc])  # the context encoder
        return crit(m.predictor(z, masks_enc, masks_pred), h)

    def after() -> None:  # the example's update_target_encoder, after optimizer.step()
        utils.update_momentum(m.encoder, m.target_encoder, 0.996 + done[0] * (1.0 - 0.996) / total)
        done[0] += 1

    opt = torch.optim.AdamW([*m.encoder.parameters(), *m.predictor.parameters()], lr=1.5e-4)
    return m, IJEPATransform(input_size=ctx.S), step, HookedOptimizer(opt, lambda: None, after), _constant(opt), False


def simmim(ctx: Any) -> Peer:
    """``examples/pytorch/simmim.py``: mask token for 75% of the tokens, linear pixel head, L1 on masked patches."""
    from lightly.models import utils
    from lightly.models.modules import MaskedVisionTransformerTIMM
    from lightly.transforms import MAETransform

    vit = ctx.backbone
    m = nn.Module()
    m.backbone = vit
    m.masked = MaskedVisionTransformerTIMM(vit=vit)
    patch = int(vit.patch_embed.patch_size[0])
    seq = int(vit.patch_embed.num_patches + vit.num_prefix_tokens)
    m.decoder = nn.Linear(int(vit.embed_dim), patch**2 * 3)
    crit = nn.L1Loss()

    def step(views: list[Any], epoch: int) -> Any:
        images = views[0]
        _, idx_mask = utils.random_token_mask(size=(images.shape[0], seq), mask_ratio=0.75, device=images.device)
        encoded = m.masked.encode(images=images, idx_mask=idx_mask)
        pred = m.decoder(utils.get_at_index(encoded, idx_mask))
        target = utils.get_at_index(utils.patchify(images, patch), idx_mask - 1)
        return crit(pred, target)

    opt = torch.optim.AdamW([*m.masked.parameters(), *m.decoder.parameters()], lr=1.5e-4)
    return m, MAETransform(input_size=ctx.S), step, opt, _constant(opt), False


def _teacher_student(ctx: Any, m: nn.Module) -> None:
    """The benchmarks' ViT pair: masked student (drop path 0.1, uniform) and a frozen teacher copy."""
    from lightly.models.modules import MaskedVisionTransformerTIMM
    from lightly.models.utils import update_drop_path_rate

    m.student_backbone = MaskedVisionTransformerTIMM(vit=ctx.backbone, antialias=False, pos_embed_initialization="skip")
    m.teacher_backbone = copy.deepcopy(m.student_backbone)
    update_drop_path_rate(m.student_backbone.vit, drop_path_rate=0.1, mode="uniform")
    for p in m.teacher_backbone.parameters():
        p.requires_grad = False


def _masked_distillation(ctx: Any, m: nn.Module, heads: tuple[Any, Any, Any, Any], koleo: Any, min_block: bool) -> Callable[..., Any]:
    """The shared training step of lightly's iBOT and DINOv2 benchmarks: block masks on the global
    views, teacher [CLS] and masked-patch outputs, the student's on the masked global and the local views.
    ``heads``: (teacher cls, teacher patch, student cls, student patch)."""
    from lightly.loss import DINOLoss, IBOTPatchLoss
    from lightly.models.utils import random_block_mask
    from lightly.utils.scheduler import linear_warmup_schedule

    t_cls, t_patch, s_cls, s_patch = heads
    cls_crit = DINOLoss(output_dim=ctx.out_dim, teacher_temp=0.07)
    patch_crit = IBOTPatchLoss(output_dim=ctx.out_dim, teacher_temp=0.07)
    total = ctx.steps_per_epoch * ctx.E
    global_step = [0]

    def step(views: list[Any], epoch: int) -> Any:
        global_views, local_views = torch.cat(views[:2]), torch.cat(views[2:])
        B = len(global_views)
        H, W = m.teacher_backbone.vit.patch_embed.grid_size
        mask = global_views.new_zeros((B, m.teacher_backbone.sequence_length), dtype=torch.bool)
        extra = {"min_num_masks_per_block": (min(H, W) // 3) ** 2} if min_block else {}
        block_mask = random_block_mask(size=(B, H, W), device=mask.device, **extra)
        mask[:, 1:] = block_mask.flatten(start_dim=1)
        with torch.no_grad():
            t_feats = m.teacher_backbone.encode(global_views)
            t_cls_out, t_masked_out = t_cls(t_feats[:, 0]), t_patch(t_feats[mask])
        s_feats = m.student_backbone.encode(global_views, mask=mask)
        s_global_cls = s_feats[:, 0]
        s_local_cls = m.student_backbone.encode(local_views, mask=None)[:, 0]
        s_cls_out = torch.cat([s_cls(s_global_cls), s_cls(s_local_cls)])
        temp = linear_warmup_schedule(step=global_step[0], warmup_steps=int(total * 30 / IMAGENET_EPOCHS), start_value=0.04, end_value=0.07)
        global_step[0] += 1
        loss = cls_crit(teacher_out=t_cls_out.chunk(2), student_out=s_cls_out.chunk(len(views)), teacher_temp=temp)
        loss = loss + patch_crit(teacher_out=t_masked_out, student_out=s_patch(s_feats[mask]), mask=block_mask, teacher_temp=temp)
        if koleo is not None:
            loss = loss + 0.1 * sum(koleo(t) for t in s_global_cls.chunk(2))
        return loss

    return step


def _distillation_optimizer(
    ctx: Any, m: nn.Module, opt: torch.optim.Optimizer, lr: float, momentum: float, freeze_last: Callable[[int], None]
) -> tuple[Any, Any]:
    """lightly's iBOT/DINOv2 step hooks: last layer frozen in epoch 0 (``freeze_last``), weight decay
    cosine 0.04 -> 0.4 per step, gradient norm clipped at 3, teacher EMA (cosine ``momentum`` -> 1)
    after the step; lr warm-up (10 of 100 epochs) then cosine to 1e-6, per step."""
    from lightly.models.utils import update_momentum
    from lightly.utils.scheduler import CosineWarmupScheduler, cosine_schedule

    total = ctx.steps_per_epoch * ctx.E
    done = [0]

    def before() -> None:
        freeze_last(done[0] // ctx.steps_per_epoch)
        wd = cosine_schedule(step=done[0], max_steps=total, start_value=0.04, end_value=0.4)
        for group in opt.param_groups:
            if group["weight_decay"] != 0.0:
                group["weight_decay"] = wd
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 3.0)

    def after() -> None:
        done[0] += 1
        mom = cosine_schedule(step=done[0], max_steps=total, start_value=momentum, end_value=1.0)
        update_momentum(m.student_backbone, m.teacher_backbone, m=mom)
        update_momentum(m.student_head, m.teacher_head, m=mom)

    sched = CosineWarmupScheduler(optimizer=opt, warmup_epochs=int(total * 10 / IMAGENET_EPOCHS), max_epochs=total, end_value=1e-6 / lr)
    return HookedOptimizer(opt, before, after), sched


def ibot(ctx: Any) -> Peer:
    """``benchmarks/imagenet/vitb16/ibot.py``: shared DINO head for [CLS] and patches, DINOLoss + IBOTPatchLoss."""
    from lightly.models.modules import DINOProjectionHead
    from lightly.models.utils import get_weight_decay_parameters
    from lightly.transforms import IBOTTransform

    m = nn.Module()
    _teacher_student(ctx, m)
    m.backbone = ctx.backbone  # the scored encoder, the student's ViT
    dim = int(ctx.backbone.embed_dim)
    m.student_head = DINOProjectionHead(input_dim=dim, output_dim=ctx.out_dim, norm_last_layer=False)
    m.teacher_head = DINOProjectionHead(input_dim=dim, output_dim=ctx.out_dim)
    for p in m.teacher_head.parameters():
        p.requires_grad = False
    step = _masked_distillation(ctx, m, (m.teacher_head, m.teacher_head, m.student_head, m.student_head), None, min_block=True)
    lr = 5e-4 * ctx.B / 256
    params, no_wd = get_weight_decay_parameters([m.student_backbone, m.student_head])
    opt = torch.optim.AdamW(
        [{"name": "dino", "params": params, "weight_decay": 0.04}, {"name": "no_wd", "params": no_wd, "weight_decay": 0.0}], lr=lr
    )

    def freeze_last(epoch: int) -> None:
        if epoch < 1:
            for name, p in m.student_head.named_parameters():
                if "last_layer" in name:
                    p.grad = None

    hooked, sched = _distillation_optimizer(ctx, m, opt, lr, 0.996, freeze_last)
    patch = int(ctx.backbone.patch_embed.patch_size[0])
    t = IBOTTransform(global_crop_size=ctx.S, local_crop_size=_to_patches(ctx.S * 96 / 224, patch))
    return m, t, step, hooked, sched, True


def dinov2(ctx: Any) -> Peer:
    """``benchmarks/imagenet/vitb16/dinov2.py``: DINOv2ProjectionHead shared by DINO and iBOT losses,
    KoLeo 0.1, layer-wise lr decay 0.9 with the patch embedding at 0.2x."""
    from lightly.loss import KoLeoLoss
    from lightly.models.modules import DINOv2ProjectionHead
    from lightly.transforms import DINOTransform

    m = nn.Module()
    _teacher_student(ctx, m)
    dim = int(ctx.backbone.embed_dim)
    m.student_head = nn.Module()
    m.student_head.dino_head = DINOv2ProjectionHead(input_dim=dim, output_dim=ctx.out_dim)
    m.teacher_head = nn.Module()
    m.teacher_head.dino_head = DINOv2ProjectionHead(input_dim=dim, output_dim=ctx.out_dim)
    for p in m.teacher_head.parameters():
        p.requires_grad = False
    heads = (m.teacher_head.dino_head, m.teacher_head.dino_head, m.student_head.dino_head, m.student_head.dino_head)
    step = _masked_distillation(ctx, m, heads, KoLeoLoss(), min_block=False)
    lr = 0.004 * math.sqrt(ctx.B / 1024)
    num_layers = len(m.student_backbone.vit.blocks)

    def lr_layer(i: int) -> float:
        return 0.9 ** (num_layers + 1 - i)

    groups = []
    for name, p in m.named_parameters():  # the student's first: m.backbone is registered after this loop
        if "student" not in name:
            continue
        group = {"name": name, "params": [p], "lr": lr, "weight_decay": 0.04}
        if any(s in name for s in ["pos_embed", "mask_token", "cls_token", "register_tokens"]):
            group["lr"] = lr * lr_layer(0)
        elif "patch_embed" in name:
            group["lr"] = lr * lr_layer(0) * 0.2
        elif "blocks" in name:
            found = re.search(r"blocks\.(\d+)\.", name)
            assert found is not None, name
            group["lr"] = lr * lr_layer(int(found.group(1)) + 1)
        elif not ("vit.norm" in name or "head" in name):
            raise SystemExit(f"dinov2 peer: unknown parameter {name}")
        if name.endswith(".bias") or ".norm" in name or "gamma" in name:
            group["weight_decay"] = 0.0
        if "vit.head" not in name:
            groups.append(group)
    opt = torch.optim.AdamW(groups, lr=lr)

    def freeze_last(epoch: int) -> None:
        if epoch < 1:
            for group in opt.param_groups:
                if "last_layer" in group["name"]:
                    group["lr"] = 0.0

    hooked, sched = _distillation_optimizer(ctx, m, opt, lr, 0.992, freeze_last)
    m.backbone = ctx.backbone  # the scored encoder, the student's ViT
    patch = int(ctx.backbone.patch_embed.patch_size[0])
    t = DINOTransform(
        global_crop_size=ctx.S,
        local_crop_size=_to_patches(ctx.S * 96 / 224, patch),
        global_crop_scale=(0.32, 1),
        local_crop_scale=(0.05, 0.32),
        n_local_views=8,
    )
    return m, t, step, hooked, sched, True


BUILDERS: dict[str, Callable[[Any], Peer]] = {
    "dcl": lambda ctx: dcl(ctx, weighted=False),
    "dclw": lambda ctx: dcl(ctx, weighted=True),
    "tico": tico,
    "mmcr": mmcr,
    "vicregl": vicregl,
    "lejepa": lejepa,
    "msn": msn,
    "ijepa": ijepa,
    "simmim": simmim,
    "ibot": ibot,
    "dinov2": dinov2,
}
