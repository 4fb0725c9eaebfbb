"""iBOT: masked image modelling with an online tokenizer, on timm vision transformers.

Zhou, Wei, Wang, Shen, Xie, Yuille, Kong. "iBOT: Image BERT Pre-Training with Online Tokenizer."
ICLR 2022 (official code: ``bytedance/ibot`` at da316d8: ``main_ibot.py`` for ``iBOTLoss`` and the
defaults, ``loader.py`` for ``ImageFolderMask``, ``models/head.py`` for ``iBOTHead``). DINO's
[CLS] self-distillation across multi-crop views (:class:`sslbench.api.DINOLoss`), plus masked
patch self-distillation: each global view of the student gets a blockwise mask, its masked patch
embeddings replaced by a learnable mask token inside the encoder; the EMA teacher (the online
tokenizer) sees the unmasked view, and at every masked patch the student's distribution matches
the teacher's centred, sharpened one (its own centre and temperatures;
:func:`sslbench.api.masked_patch_cross_entropy`). ``L = lambda1 L_cls + lambda2 L_patch``.

Where sslbench differs: the mask of a view is a pure function of (seed, epoch, sample, view)
(:func:`sslbench.api.block_masks`), not of Python's global RNG; the trainer clips the global
gradient norm; the student's head runs on the masked patches only (the loss reads no other);
the teacher temperatures rise in the fractional epoch.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sslbench.api import (
    EMBEDDING_LOG,
    ENTROPY_FRAC_LOG,
    AugmentConfig,
    Batch,
    DINOHead,
    DINOLoss,
    Family,
    Method,
    MethodConfig,
    Recipe,
    StepInfo,
    UserError,
    ViewSpec,
    WeightNormLinear,
    block_draws,
    block_masks,
    cosine_schedule,
    encode_patches,
    feature_dim,
    freeze_,
    linear_warmup,
    mask_weights,
    masked_patch_cross_entropy,
    multicrop_views,
    patch_grid,
    register_method,
    require_vit,
)

__all__ = ["IBOT", "IBOTConfig"]


@dataclass
class IBOTConfig(MethodConfig):
    """iBOT hyper-parameters: the official ``main_ibot.py`` defaults and its README's ViT-S/16
    command where they differ (noted); small-data values where sslbench's DINO uses them."""

    out_dim: int = 4096  # K [CLS] prototypes (official ViT-S/16: 8192; small data: 4096, as sslbench's DINO)
    patch_out_dim: int = 4096  # patch prototypes without shared_head (official: 8192)
    shared_head: bool = True  # [CLS] and patches share the prototypes (README ViT-S/16: true; argparse: false); the MLP is always shared
    hidden_dim: int = 2048  # head MLP hidden width (official 2048)
    bottleneck_dim: int = 256  # head bottleneck (official 256)
    head_layers: int = 3  # head MLP layers (official 3)
    norm_last_layer: bool = True  # prototypes' weight-norm g fixed at 1 (argparse default; README ViT-S/16: false)
    student_temp: float = 0.1  # tau_s (official 0.1)
    warmup_teacher_temp: float = 0.04  # [CLS] tau_t at the start (official 0.04)
    teacher_temp: float = 0.04  # [CLS] tau_t after the warm-up (argparse 0.04; README ViT-S/16: 0.07)
    warmup_teacher_patch_temp: float = 0.04  # patch tau_t at the start (official 0.04)
    teacher_patch_temp: float = 0.07  # patch tau_t after the warm-up (official 0.07)
    warmup_teacher_temp_epochs: float = 30.0  # linear warm-up of both tau_t, epochs (official 30)
    center_momentum: float = 0.9  # [CLS] centre EMA (official 0.9)
    center_momentum2: float = 0.9  # patch centre EMA (official 0.9)
    lambda1: float = 1.0  # weight of the [CLS] loss (official 1.0)
    lambda2: float = 1.0  # weight of the patch loss (official 1.0)
    base_momentum: float = 0.996  # teacher EMA at step 0, cosine to final_momentum (official 0.996)
    final_momentum: float = 1.0  # teacher EMA at the last step (official 1)
    local_crops: int = 6  # local crops (argparse 0; README ViT-S/16: 10; small data: 6, as sslbench's DINO)
    local_crop_size: int | None = None  # px; None: 96/224 of the image size (official 96 at 224)
    local_crop_scale: tuple[float, float] = (0.05, 0.4)  # local crop area range (argparse 0.05-0.4; README ViT-S/16: 0.05-0.25)
    pred_ratio: tuple[float, ...] = (0.0, 0.3)  # mask ratios, one picked per view (README ViT-S/16: 0 0.3; argparse: 0.3)
    pred_ratio_var: tuple[float, ...] = (0.0, 0.2)  # +- uniform spread of each ratio (README ViT-S/16: 0 0.2; argparse: 0)
    pred_aspect_ratio: tuple[float, float] = (0.3, 1 / 0.3)  # block aspect range (official ImageFolderMask: 0.3 - 1/0.3)
    freeze_last_layer: int = 1  # epochs with the prototypes' gradients dropped (official 1)

    def validate(self) -> None:
        checks = {
            "out_dim, patch_out_dim, hidden_dim, bottleneck_dim and head_layers must be >= 1": min(
                self.out_dim, self.patch_out_dim, self.hidden_dim, self.bottleneck_dim, self.head_layers
            )
            > 0,
            "student_temp and the teacher temperatures must be > 0": min(
                self.student_temp, self.warmup_teacher_temp, self.teacher_temp, self.warmup_teacher_patch_temp, self.teacher_patch_temp
            )
            > 0,
            "warmup_teacher_temp_epochs, freeze_last_layer, local_crops, lambda1 and lambda2 must be >= 0": min(
                self.warmup_teacher_temp_epochs, self.freeze_last_layer, self.local_crops, self.lambda1, self.lambda2
            )
            >= 0,
            "center_momentum and center_momentum2 must be in [0, 1]": 0 <= min(self.center_momentum, self.center_momentum2)
            and max(self.center_momentum, self.center_momentum2) <= 1,
            "base_momentum and final_momentum need 0 <= base <= final <= 1": 0.0 <= self.base_momentum <= self.final_momentum <= 1.0,
            "pred_ratio and pred_ratio_var need the same length and 0 <= ratio - var <= ratio + var < 1": len(self.pred_ratio)
            == len(self.pred_ratio_var)
            > 0
            and all(0 <= r - v <= r + v < 1 for r, v in zip(self.pred_ratio, self.pred_ratio_var)),
            "pred_aspect_ratio must satisfy 0 < min <= max": 0 < self.pred_aspect_ratio[0] <= self.pred_aspect_ratio[1],
            "local_crop_scale must satisfy 0 < min <= max <= 1": 0 < self.local_crop_scale[0] <= self.local_crop_scale[1] <= 1,
        }
        for what, ok in checks.items():
            if not ok:
                raise UserError(f"method_cfg.{what}")


@register_method("ibot")
class IBOT(Method):
    """Student: ViT + iBOT head on all views (global ones masked); teacher: EMA copy on the 2 unmasked global views."""

    Config = IBOTConfig
    description = "Self-distillation of [CLS] across views and of masked patch tokens from an EMA online tokenizer (iBOT)"
    paper = "Zhou et al., iBOT: Image BERT Pre-Training with Online Tokenizer, ICLR 2022"
    min_batch_size = 2  # the centres are batch means of the teacher's outputs

    def __init__(self, backbone: nn.Module, cfg: IBOTConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or IBOTConfig()
        self.encoder = require_vit(backbone, "ibot")
        d = feature_dim(backbone)
        self.mask_token = nn.Parameter(torch.zeros(d))  # official: zeros, the student's masked_embed
        self.head = DINOHead(d, cfg.out_dim, cfg.hidden_dim, cfg.bottleneck_dim, cfg.head_layers, False, cfg.norm_last_layer)
        self.patch_last = None if cfg.shared_head else WeightNormLinear(cfg.bottleneck_dim, cfg.patch_out_dim, cfg.norm_last_layer)
        self.teacher_encoder = freeze_(copy.deepcopy(self.encoder))
        self.teacher_head = freeze_(copy.deepcopy(self.head))
        self.teacher_patch_last = None if self.patch_last is None else freeze_(copy.deepcopy(self.patch_last))
        self.cls_loss = DINOLoss(cfg.out_dim, cfg.student_temp, cfg.center_momentum)  # the [CLS] centre
        k_patch = cfg.out_dim if cfg.shared_head else cfg.patch_out_dim
        self.patch_center = DINOLoss(k_patch, cfg.student_temp, cfg.center_momentum2)  # the patch centre (center2)

    @classmethod
    def recipe(cls, image_size: int, family: Family) -> Recipe:
        """The official ViT recipe (``main_ibot.py`` defaults): AdamW, lr 5e-4 x B/256, weight decay
        0.04 -> 0.4 (cosine), clip 3, global crops of scale 0.14-1 (README ViT-S/16: 0.25-1);
        jitter at DINO's strength. At >= 96 px the README ViT-S/16 command's 8192 prototypes and
        10 local crops of scale 0.05-0.25 with global crops 0.25-1."""
        aug: dict[str, object] = {"crop_scale": (0.14, 1.0), "jitter_strength": 0.5}
        method: dict[str, object] = {}
        if image_size >= 96:
            aug["crop_scale"] = (0.25, 1.0)
            method = {"out_dim": 8192, "patch_out_dim": 8192, "local_crops": 10, "local_crop_scale": (0.05, 0.25)}
        return Recipe(optimizer="adamw", lr=5e-4, weight_decay=0.04, weight_decay_end=0.4, grad_clip=3.0, aug=aug, method=method)

    def views(self, base: AugmentConfig, image_size: int) -> list[ViewSpec]:
        """DINO's multi-crop views (:func:`sslbench.api.multicrop_views`)."""
        return multicrop_views(base, image_size, self.encoder, self.cfg.local_crops, self.cfg.local_crop_size, self.cfg.local_crop_scale)

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        pairs = [(self.encoder, self.teacher_encoder), (self.head, self.teacher_head)]
        return pairs + ([(self.patch_last, self.teacher_patch_last)] if self.patch_last is not None and self.teacher_patch_last is not None else [])

    def momentum_at(self, info: StepInfo) -> float:
        return cosine_schedule(info, self.cfg.base_momentum, self.cfg.final_momentum)

    def masks(self, batch: Batch, view: int, size: int) -> Tensor:
        """(B, N) bool blockwise masks of global view ``view`` (official ``ImageFolderMask``): per
        sample one of ``pred_ratio`` (uniformly), spread uniformly by its ``pred_ratio_var``, times
        N patches; blocks of at least ``(min(H, W) // 3) ** 2`` patches."""
        grid = patch_grid(self.encoder, size)
        n, k = grid[0] * grid[1], len(self.cfg.pred_ratio)
        r = batch.uniform(2 * view, k + 1).double()  # float64, as Python's floats (the official code's random module)
        pick = torch.floor(r[:, k] * k).clamp(max=k - 1)  # random.choice among the ratios
        ratios = torch.zeros_like(pick)
        for i, (ratio, var) in enumerate(zip(self.cfg.pred_ratio, self.cfg.pred_ratio_var)):
            ratios = torch.where(pick == i, ratio + (2 * r[:, i] - 1) * var, ratios)  # U(r - var, r + var) of the chosen ratio
        u = batch.uniform(2 * view + 1, block_draws(grid))
        return block_masks(u, grid, ratios * n, (min(grid) // 3) ** 2, math.inf, self.cfg.pred_aspect_ratio)

    def patch_logits(self, head: nn.Module, last: nn.Module | None, tokens: Tensor) -> Tensor:
        """(M, D) patch tokens -> (M, K') logits: the shared MLP, then the shared or the patch prototypes."""
        return head(tokens) if last is None else last(F.normalize(head.mlp(tokens), dim=-1))  # type: ignore[no-any-return, operator]

    def training_step(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        """Views V x (B, 3, S_v, S_v), the first 2 global. Teacher: [CLS] and patch logits of the
        unmasked global views; student: [CLS] logits of every view (global views masked) and
        patch logits at the masked patches."""
        views, g = batch.views, 2
        b = views[0].shape[0]
        masks = torch.cat([self.masks(batch, i, views[i].shape[-1]) for i in range(g)])  # (G B, N)
        with torch.no_grad():
            t_tok = encode_patches(self.teacher_encoder, torch.cat(views[:g]))  # (G B, 1 + N, D)
            t_cls = self.teacher_head(t_tok[:, 0])  # (G B, K)
            t_patch = self.patch_logits(self.teacher_head, self.teacher_patch_last, t_tok[:, -masks.shape[1] :])  # (G B, N, K')
        s_tok = encode_patches(self.encoder, torch.cat(views[:g]), replace=masks, mask_token=self.mask_token)
        s_cls = [s_tok[:, 0], *self._local_cls(views[g:])]
        s_logits = self.head(torch.cat(s_cls)).view(len(views), b, -1)  # (V, B, K)
        s_patch = self.patch_logits(self.head, self.patch_last, s_tok[:, -masks.shape[1] :][masks])  # (M, K')
        cls_temp, patch_temp = self.teacher_temps(batch.info)
        loss_cls, probs = self.cls_loss(s_logits, t_cls.view(g, b, -1), cls_temp)
        t_probs = self.patch_center.teacher_probs(t_patch, patch_temp)  # (G B, N, K'), centred with the patch centre
        loss_patch = masked_patch_cross_entropy(t_probs[masks], s_patch, mask_weights(masks), g * b, self.cfg.student_temp)
        self.patch_center.update_center(t_patch.mean(dim=1).view(g, b, -1))  # centre2: the mean over every patch, then samples
        loss = self.cfg.lambda1 * loss_cls + self.cfg.lambda2 * loss_patch
        entropy = -(probs * torch.log(probs.clamp_min(1e-12))).sum(-1).mean()
        logs = {
            "loss": loss.detach(),
            "loss_cls": loss_cls.detach(),
            "loss_patch": loss_patch.detach(),
            "mask_ratio": masks.float().mean(),
            "teacher_entropy": entropy,
            ENTROPY_FRAC_LOG: entropy / math.log(self.cfg.out_dim) if self.cfg.out_dim > 1 else torch.ones_like(entropy),
            EMBEDDING_LOG: s_logits[0].detach(),  # the student's [CLS] logits on the first global view
        }
        return loss, logs

    def _local_cls(self, views: list[Tensor]) -> list[Tensor]:
        """[CLS] tokens (B, D) of the unmasked local views, one encoder pass for all of them."""
        if not views:
            return []
        return list(encode_patches(self.encoder, torch.cat(views))[:, 0].chunk(len(views)))

    def teacher_temps(self, info: StepInfo) -> tuple[float, float]:
        """([CLS] tau_t, patch tau_t): each linear from its warm-up value over ``warmup_teacher_temp_epochs``."""
        c, w = self.cfg, self.cfg.warmup_teacher_temp_epochs
        return linear_warmup(info, c.warmup_teacher_temp, c.teacher_temp, w), linear_warmup(
            info, c.warmup_teacher_patch_temp, c.teacher_patch_temp, w
        )

    def after_backward(self, info: StepInfo) -> None:
        """The first ``freeze_last_layer`` epochs drop the prototypes' gradients (official
        ``cancel_gradients_last_layer``: every ``last_layer``, the patch one included)."""
        if info.epoch < self.cfg.freeze_last_layer:
            for m in (self.head.last_layer, self.patch_last):
                for p in m.parameters() if m is not None else []:
                    p.grad = None
