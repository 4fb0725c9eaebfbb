"""DINOv2: DINO's [CLS] loss, iBOT's masked patch loss, Sinkhorn-Knopp centring and KoLeo.

Oquab, Darcet, Moutakanni, et al. "DINOv2: Learning Robust Visual Features without Supervision."
TMLR 2024 (official code: ``facebookresearch/dinov2`` at b8931f7: ``dinov2/train/ssl_meta_arch.py``,
``dinov2/loss/{dino_clstoken_loss,ibot_patch_loss,koleo_loss}.py``, ``dinov2/data/masking.py``,
``dinov2/data/collate.py``, ``dinov2/utils/param_groups.py``, ``dinov2/configs/``). On a timm ViT:

- the teacher's (EMA, no gradient) [CLS] logits of the 2 global views, and its patch logits at
  the student's masked patches, are turned into targets by 3 Sinkhorn-Knopp iterations over the
  global batch (:func:`sslbench.api.sinkhorn_knopp` with epsilon = tau_t: the official
  ``sinkhorn_knopp_teacher``, its sums all-reduced);
- the student's [CLS] logits on every view match the other global views' targets
  (:func:`sslbench.api.multicrop_cross_entropy`); its logits at masked patches (global views,
  masked patch embeddings replaced by a mask token) match the teacher's at the same patch
  (:func:`sslbench.api.masked_patch_cross_entropy`), through separate [CLS] and patch heads;
- KoLeo (:func:`sslbench.api.koleo_loss`, weight 0.1) spreads the student's backbone [CLS]
  features of each global view.

Where sslbench differs: masks are drawn per view from counter-based uniforms (each global view is
masked with probability 0.5, ratio U(0.1, 0.5)), where ``collate_data_and_cast`` spreads the ratios
of half the batch over [0.1, 0.5] and shuffles; KoLeo's nearest neighbours come from the global
batch (official: each GPU's batch), so N processes compute what one does; drop path (official
0.3-0.4) is off by default: timm's ``DropPath`` draws from torch's global RNG, which is not
counter-based (set ``--set backbone_kwargs.drop_path_rate=0.1`` to train with it).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from sslbench.api import (
    EMBEDDING_LOG,
    ENTROPY_FRAC_LOG,
    AugmentConfig,
    Batch,
    DINOHead,
    Family,
    Method,
    MethodConfig,
    Recipe,
    StepInfo,
    UserError,
    ViewSpec,
    block_draws,
    block_masks,
    cosine_schedule,
    encode_patches,
    feature_dim,
    freeze_,
    koleo_loss,
    linear_warmup,
    mask_weights,
    masked_patch_cross_entropy,
    multicrop_cross_entropy,
    multicrop_views,
    patch_grid,
    register_method,
    require_vit,
    sinkhorn_knopp,
)

__all__ = ["DINOv2", "DINOv2Config"]


@dataclass
class DINOv2Config(MethodConfig):
    """DINOv2 hyper-parameters: ``ssl_default_config.yaml`` (the ImageNet-1k recipe) with the paper
    runs' Sinkhorn-Knopp centring and separate heads (``vitl14.yaml``); small-data values noted."""

    out_dim: int = 4096  # [CLS] prototypes (official 65536; small data: 4096, as sslbench's DINO)
    patch_out_dim: int = 4096  # patch prototypes (official 65536)
    hidden_dim: int = 2048  # head MLP hidden width (official 2048)
    bottleneck_dim: int = 256  # head bottleneck (official 256; vitl14: 384)
    head_layers: int = 3  # head MLP layers (official 3)
    student_temp: float = 0.1  # tau_s (official 0.1)
    warmup_teacher_temp: float = 0.04  # tau_t at the start (official 0.04)
    teacher_temp: float = 0.07  # tau_t after the warm-up (official 0.07)
    warmup_teacher_temp_epochs: float = 30.0  # linear tau_t warm-up, epochs (official 30)
    sk_iterations: int = 3  # Sinkhorn-Knopp iterations (official 3)
    dino_weight: float = 1.0  # [CLS] loss weight (official 1.0)
    ibot_weight: float = 1.0  # patch loss weight (official 1.0)
    koleo_weight: float = 0.1  # KoLeo weight (official 0.1)
    base_momentum: float = 0.992  # teacher EMA at step 0, cosine to final_momentum (official 0.992; vitl14: 0.994)
    final_momentum: float = 1.0  # teacher EMA at the last step (official 1)
    local_crops: int = 6  # local crops (official 8; small data: 6, as sslbench's DINO)
    local_crop_size: int | None = None  # px; None: 96/224 of the image size (official 96 at 224, 98 for 14 px patches)
    local_crop_scale: tuple[float, float] = (0.05, 0.32)  # local crop area range (official 0.05-0.32)
    mask_probability: float = 0.5  # share of global views masked (official mask_sample_probability 0.5)
    mask_ratio: tuple[float, float] = (0.1, 0.5)  # masked share of a masked view (official mask_ratio_min_max 0.1-0.5)
    mask_min_patches: float = 4.0  # smallest block, patches (official MaskingGenerator min_num_patches 4)
    mask_max_block: float = 0.5  # largest block, share of the patches (official max_num_patches 0.5 N)
    mask_aspect: tuple[float, float] = (0.3, 1 / 0.3)  # block aspect range (official min_aspect 0.3)
    layer_decay: float = 0.9  # layer-wise lr decay (official layerwise_decay 0.9; vitl14: 1.0)
    patch_embed_lr_mult: float = 0.2  # lr multiplier of the patch embedding (official 0.2)
    freeze_last_layer: int = 1  # epochs with the prototypes' gradients dropped (official freeze_last_layer_epochs 1)

    def validate(self) -> None:
        checks = {
            "out_dim, patch_out_dim, hidden_dim, bottleneck_dim, head_layers and sk_iterations must be >= 1": min(
                self.out_dim, self.patch_out_dim, self.hidden_dim, self.bottleneck_dim, self.head_layers, self.sk_iterations
            )
            > 0,
            "student_temp, warmup_teacher_temp and teacher_temp must be > 0": min(self.student_temp, self.warmup_teacher_temp, self.teacher_temp) > 0,
            "loss weights, warmup_teacher_temp_epochs, local_crops and freeze_last_layer must be >= 0": min(
                self.dino_weight, self.ibot_weight, self.koleo_weight, self.warmup_teacher_temp_epochs, self.local_crops, self.freeze_last_layer
            )
            >= 0,
            "base_momentum and final_momentum need 0 <= base <= final <= 1": 0.0 <= self.base_momentum <= self.final_momentum <= 1.0,
            "mask_probability must be in [0, 1]": 0.0 <= self.mask_probability <= 1.0,
            "mask_ratio must satisfy 0 <= min <= max < 1": 0.0 <= self.mask_ratio[0] <= self.mask_ratio[1] < 1.0,
            "mask_max_block must be in (0, 1] and mask_min_patches >= 0": 0 < self.mask_max_block <= 1 and self.mask_min_patches >= 0,
            "mask_aspect must satisfy 0 < min <= max": 0 < self.mask_aspect[0] <= self.mask_aspect[1],
            "layer_decay and patch_embed_lr_mult must be in (0, 1]": 0 < self.layer_decay <= 1 and 0 < self.patch_embed_lr_mult <= 1,
            "local_crop_scale must satisfy 0 < min <= max <= 1": 0 < self.local_crop_scale[0] <= self.local_crop_scale[1] <= 1,
        }
        for what, ok in checks.items():
            if not ok:
                raise UserError(f"method_cfg.{what}")


@register_method("dinov2")
class DINOv2(Method):
    """Student: ViT + [CLS] head on all views, patch head at masked patches; teacher: EMA copy on the unmasked global views."""

    Config = DINOv2Config
    description = "DINO [CLS] + iBOT masked-patch self-distillation with Sinkhorn-Knopp targets and the KoLeo regulariser (DINOv2)"
    paper = "Oquab et al., DINOv2: Learning Robust Visual Features without Supervision, TMLR 2024"
    min_batch_size = 2  # KoLeo needs a nearest neighbour; Sinkhorn-Knopp spreads a batch over the prototypes

    def __init__(self, backbone: nn.Module, cfg: DINOv2Config | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or DINOv2Config()
        self.encoder = require_vit(backbone, "dinov2")
        d = feature_dim(backbone)
        self.mask_token = nn.Parameter(torch.zeros(d))  # official: zeros
        # dino_head and ibot_head (separate_head); the official DINOHead trains the prototypes' weight-norm g (filled with 1)
        self.head = DINOHead(d, cfg.out_dim, cfg.hidden_dim, cfg.bottleneck_dim, cfg.head_layers, norm_last_layer=False)
        self.patch_head = DINOHead(d, cfg.patch_out_dim, cfg.hidden_dim, cfg.bottleneck_dim, cfg.head_layers, norm_last_layer=False)
        self.teacher_encoder = freeze_(copy.deepcopy(self.encoder))
        self.teacher_head = freeze_(copy.deepcopy(self.head))
        self.teacher_patch_head = freeze_(copy.deepcopy(self.patch_head))

    @classmethod
    def recipe(cls, image_size: int, family: Family) -> Recipe:
        """``ssl_default_config.yaml``: AdamW (0.9, 0.999), lr 0.004 x sqrt(B / 1024) (= 1.25e-4 x
        sqrt(B)), weight decay 0.04 -> 0.4 (cosine), clip 3, global crops of scale 0.32-1, colour
        jitter at DINO's strength; at >= 96 px 65536 prototypes and 8 local crops."""
        aug: dict[str, object] = {"crop_scale": (0.32, 1.0), "jitter_strength": 0.5}
        large = {"out_dim": 65536, "patch_out_dim": 65536, "local_crops": 8} if image_size >= 96 else {}
        return Recipe(optimizer="adamw", lr=1.25e-4, lr_scaling="sqrt", weight_decay=0.04, weight_decay_end=0.4, grad_clip=3.0, aug=aug, method=large)

    def views(self, base: AugmentConfig, image_size: int) -> list[ViewSpec]:
        """DINO's multi-crop views (:func:`sslbench.api.multicrop_views`)."""
        return multicrop_views(base, image_size, self.encoder, self.cfg.local_crops, self.cfg.local_crop_size, self.cfg.local_crop_scale)

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.encoder, self.teacher_encoder), (self.head, self.teacher_head), (self.patch_head, self.teacher_patch_head)]

    def momentum_at(self, info: StepInfo) -> float:
        return cosine_schedule(info, self.cfg.base_momentum, self.cfg.final_momentum)

    def lr_scales(self) -> dict[int, float]:
        """Per parameter (by id), the official ``get_vit_lr_decay_rate``: ``layer_decay ** (L + 1 -
        layer)`` with layer 0 for the patch and position embeddings, class token and mask token,
        layer i + 1 for block i, L + 1 for the rest (final norm, heads); the patch embedding times
        ``patch_embed_lr_mult``."""
        c, depth = self.cfg, len(self.encoder.blocks)  # type: ignore[arg-type]
        scales = {}
        for name, p in self.named_parameters():
            layer = depth + 1
            sub = name.removeprefix("encoder.")
            if name == "mask_token" or (sub != name and sub.split(".")[0] in ("patch_embed", "pos_embed", "cls_token", "reg_token")):
                layer = 0
            elif sub != name and sub.startswith("blocks."):
                layer = int(sub.split(".")[1]) + 1
            scales[id(p)] = c.layer_decay ** (depth + 1 - layer) * (c.patch_embed_lr_mult if sub.startswith("patch_embed.") else 1.0)
        return scales

    def param_groups(self, groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Each group split by :meth:`lr_scales` into groups with that ``lr_scale`` (times the group's own)."""
        scales, out = self.lr_scales(), []
        for g in groups:
            by_scale: dict[float, list[nn.Parameter]] = {}
            for p in g["params"]:
                by_scale.setdefault(scales.get(id(p), 1.0), []).append(p)
            out += [{**g, "params": ps, "lr_scale": g.get("lr_scale", 1.0) * s} for s, ps in sorted(by_scale.items())]
        return out

    def masks(self, batch: Batch, view: int, size: int) -> Tensor:
        """(B, N) bool blockwise masks of global view ``view``: masked with probability
        ``mask_probability``, then ``int(N * U(mask_ratio))`` patches in blocks of 4 to N / 2 patches
        (official ``MaskingGenerator``)."""
        grid = patch_grid(self.encoder, size)
        n, (lo, hi) = grid[0] * grid[1], self.cfg.mask_ratio
        r = batch.uniform(2 * view, 2).double()  # float64, as Python's floats (the official code's random module)
        targets = torch.where(r[:, 0] < self.cfg.mask_probability, torch.floor(n * (lo + r[:, 1] * (hi - lo))), 0.0)
        u = batch.uniform(2 * view + 1, block_draws(grid))
        return block_masks(u, grid, targets, self.cfg.mask_min_patches, self.cfg.mask_max_block * n, self.cfg.mask_aspect)

    def training_step(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        """Views V x (B, 3, S_v, S_v), the first 2 global; masks (G B, N), M masked patches in all."""
        views, g, c = batch.views, 2, self.cfg
        b = views[0].shape[0]
        masks = torch.cat([self.masks(batch, i, views[i].shape[-1]) for i in range(g)])  # (G B, N)
        n = masks.shape[1]
        temp = linear_warmup(batch.info, c.warmup_teacher_temp, c.teacher_temp, c.warmup_teacher_temp_epochs)
        with torch.no_grad():
            t_tok = encode_patches(self.teacher_encoder, torch.cat(views[:g]))  # (G B, 1 + N, D)
            t_cls = sinkhorn_knopp(self.teacher_head(t_tok[:, 0]), temp, c.sk_iterations)  # (G B, K) targets
            t_patch = sinkhorn_knopp(self.teacher_patch_head(t_tok[:, -n:][masks]), temp, c.sk_iterations)  # (M, K')
        s_tok = encode_patches(self.encoder, torch.cat(views[:g]), replace=masks, mask_token=self.mask_token)  # (G B, 1 + N, D)
        local = [encode_patches(self.encoder, torch.cat(views[g:]))[:, 0]] if len(views) > g else []
        s_cls = self.head(torch.cat([s_tok[:, 0], *local])).view(len(views), b, -1)  # (V, B, K)
        log_p = torch.log_softmax(s_cls.float() / c.student_temp, dim=-1)
        loss_dino = multicrop_cross_entropy(t_cls.view(g, b, -1), log_p)
        s_patch = self.patch_head(s_tok[:, -n:][masks])  # (M, K')
        loss_ibot = masked_patch_cross_entropy(t_patch, s_patch, mask_weights(masks), g * b, c.student_temp)
        loss_koleo = sum((koleo_loss(x) for x in s_tok[:, 0].chunk(g)), torch.zeros((), device=s_tok.device))  # each global view apart
        loss = c.dino_weight * loss_dino + c.ibot_weight * loss_ibot + c.koleo_weight * loss_koleo
        entropy = -(t_cls * torch.log(t_cls.clamp_min(1e-12))).sum(-1).mean()
        logs = {
            "loss": loss.detach(),
            "loss_dino": loss_dino.detach(),
            "loss_ibot": loss_ibot.detach(),
            "loss_koleo": loss_koleo.detach(),
            "mask_ratio": masks.float().mean(),
            "teacher_temp": torch.full((), temp, device=loss.device),
            "teacher_entropy": entropy,
            ENTROPY_FRAC_LOG: entropy / math.log(c.out_dim) if c.out_dim > 1 else torch.ones_like(entropy),
            EMBEDDING_LOG: s_cls[0].detach(),  # the student's [CLS] logits on the first global view
        }
        return loss, logs

    def after_backward(self, info: StepInfo) -> None:
        """The first ``freeze_last_layer`` epochs drop both heads' prototype gradients (official ``is_last_layer`` groups)."""
        if info.epoch < self.cfg.freeze_last_layer:
            for p in [*self.head.last_layer.parameters(), *self.patch_head.last_layer.parameters()]:
                p.grad = None
