"""DINO: self-distillation with no labels, with multi-crop, on vision transformers and ResNets.

Caron, Touvron, Misra, Jégou, Mairal, Bojanowski, Joulin. "Emerging Properties in Self-Supervised
Vision Transformers." ICCV 2021. A student (backbone + DINO head) learns to predict, on every
view, a teacher's centred and sharpened distribution over K prototypes on each *global* view; the
teacher is an EMA of the student and gets no gradient (:class:`sslbench.core.losses.DINOLoss`).

Read against the official code (``facebookresearch/dino``: ``main_dino.py`` for ``DINOLoss``,
``DataAugmentationDINO`` and the training loop, ``vision_transformer.py`` for ``DINOHead``,
``utils.py`` for ``MultiCropWrapper``, ``get_params_groups``, ``clip_gradients`` and
``cancel_gradients_last_layer``) and the peer versions of lightly (``DINOProjectionHead``,
``DINOLoss``, ``DINOTransform``) and solo-learn (``solo/methods/dino.py``, CIFAR config).
Where sslbench differs:

- the trainer clips the *global* gradient norm (``grad_clip`` 3.0); the official code clips each
  parameter's gradient norm to 3.0 separately;
- the teacher temperature rises linearly in the fractional epoch (``epoch_float``); the official
  code steps it once per epoch;
- evaluation uses the student's backbone (``self.encoder``), as for every sslbench method; the
  paper evaluates the teacher, which is better after long training (it averages the student);
- blur is applied only to images of at least ``aug.blur_min_size`` (96) px, so at 32 px the two
  global views differ only by solarization, as BYOL's do; colour jitter is SimCLR's at
  strength 0.5 (brightness, contrast, saturation 0.4, hue 0.1; DINO's saturation is 0.2).

Recipes differ by backbone family (:meth:`DINO.recipe`; docs/recipes.md): a ViT trains with the
official AdamW recipe and head; a convnet with SGD and BatchNorm in the head (lightly's CIFAR-10
benchmark; the official ResNet-50 command at ImageNet size). Without BatchNorm in the head a
ResNet's DINO collapses to the uniform distribution (measured: docs/recipes.md); the
``teacher_entropy`` log and the run's health verdict show it.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from einops import rearrange
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
    cosine_schedule,
    encode_views,
    feature_dim,
    freeze_,
    linear_warmup,
    local_crop_size,
    multicrop_views,
    register_method,
)

__all__ = ["DINO", "DINOConfig", "DINOHead", "DINOLoss", "WeightNormLinear", "local_crop_size"]


@dataclass
class DINOConfig(MethodConfig):
    """DINO hyper-parameters (defaults for small data; ImageNet values in the comments)."""

    out_dim: int = 4096  # K prototypes (ImageNet: 65536; small data: 4096, solo-learn's CIFAR value; convnet recipe: 2048)
    hidden_dim: int = 2048  # head MLP hidden width (paper: 2048)
    bottleneck_dim: int = 256  # head output before L2 normalisation and the prototypes (paper: 256)
    head_layers: int = 3  # linear layers of the head MLP (official DINOHead: 3; convnet recipe: 2, lightly's CIFAR-10 head)
    use_bn_in_head: bool = False  # BatchNorm in the head MLP (official default: off; convnet recipe: on)
    norm_last_layer: bool = True  # weight-norm magnitude g of the prototypes fixed at 1 (official default)
    student_temp: float = 0.1  # tau_s (official default 0.1)
    warmup_teacher_temp: float = 0.04  # tau_t at the start (official default 0.04)
    teacher_temp: float = 0.04  # tau_t after the warm-up (official default 0.04; the README's long ViT-S runs: 0.07)
    warmup_teacher_temp_epochs: float = 0.0  # linear tau_t warm-up length in epochs (official default 0; README's long ViT-S runs: 30)
    center_momentum: float = 0.9  # m of the centre's EMA (official default 0.9)
    base_momentum: float = 0.996  # teacher EMA rate at step 0, cosine to final_momentum (official 0.996; small convnets: 0.99)
    final_momentum: float = 1.0  # teacher EMA rate at the last step (official: 1; convnet recipe on small images: 0.99, constant)
    local_crops: int = 6  # N local crops; 0 disables multi-crop (ImageNet: 8; lightly's default: 6)
    local_crop_size: int | None = None  # px; None: 96/224 of the image size to a multiple of 8 (16 at 32 px)
    local_crop_scale: tuple[float, float] = (0.05, 0.4)  # local crop area range (paper: 0.05-0.4)
    freeze_last_layer: int = 1  # epochs with the prototypes' gradients zeroed (paper: 1)

    def validate(self) -> None:
        checks = {
            "out_dim, hidden_dim, bottleneck_dim and head_layers must be >= 1": min(
                self.out_dim, self.hidden_dim, self.bottleneck_dim, self.head_layers
            )
            > 0,
            "student_temp, warmup_teacher_temp and teacher_temp must be > 0": min(self.student_temp, self.warmup_teacher_temp, self.teacher_temp) > 0,
            "warmup_teacher_temp_epochs, freeze_last_layer and local_crops must be >= 0": min(
                self.warmup_teacher_temp_epochs, self.freeze_last_layer, self.local_crops
            )
            >= 0,
            "center_momentum must be in [0, 1]": 0.0 <= self.center_momentum <= 1.0,
            "base_momentum and final_momentum need 0 <= base <= final <= 1": 0.0 <= self.base_momentum <= self.final_momentum <= 1.0,
            "local_crop_size must be >= 1 px (or None)": self.local_crop_size is None or self.local_crop_size >= 1,
            "local_crop_scale must satisfy 0 < min <= max <= 1": 0 < self.local_crop_scale[0] <= self.local_crop_scale[1] <= 1,
        }
        for what, ok in checks.items():
            if not ok:
                raise UserError(f"method_cfg.{what}")


@register_method("dino")
class DINO(Method):
    """Student: backbone + DINO head on all views; teacher: EMA copy on the 2 global views."""

    Config = DINOConfig
    description = "Self-distillation: a student matches an EMA teacher's centred, sharpened prototypes across multi-crop views (DINO)"
    paper = "Caron et al., Emerging Properties in Self-Supervised Vision Transformers, ICCV 2021"
    min_batch_size = 2  # the centre is the batch mean of the teacher's outputs: one sample centres itself away

    def __init__(self, backbone: nn.Module, cfg: DINOConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or DINOConfig()
        self.encoder = backbone
        self.head = DINOHead(
            feature_dim(backbone), cfg.out_dim, cfg.hidden_dim, cfg.bottleneck_dim, cfg.head_layers, cfg.use_bn_in_head, cfg.norm_last_layer
        )
        self.teacher_encoder = freeze_(copy.deepcopy(self.encoder))
        self.teacher_head = freeze_(copy.deepcopy(self.head))
        self.criterion = DINOLoss(cfg.out_dim, cfg.student_temp, cfg.center_momentum)  # holds the centre buffer

    @classmethod
    def recipe(cls, image_size: int, family: Family) -> Recipe:
        """Per backbone family, as the references train them (sources in docs/recipes.md).

        Vision transformers: the official recipe (``main_dino.py`` defaults at commit 7c446df;
        Caron et al. 2021, Sec. 3.2): AdamW, lr 5e-4 x B/256, weight decay 0.04 -> 0.4 (cosine),
        gradient clip 3, global crops of scale 0.4-1, colour jitter at strength 0.5.
        Convnets on small images: lightly's CIFAR-10 benchmark (``cifar10_benchmark.py``,
        ``DINOModel``, commit e8d317f): SGD, lr 0.06 x B/128 (0.12 x B/256), weight decay 5e-4
        constant, no clipping, a 2-layer head with BatchNorm, 2048 prototypes, teacher momentum
        0.99 constant, teacher temperature 0.04, global crops 0.4-1, jitter strength 0.5.
        Convnets on ImageNet-size images: the official ResNet-50 command (README, and the released
        run's args): SGD, lr 0.03 x B/256, weight decay 1e-4 constant, clip 3, global crops
        0.14-1, local crops 0.05-0.14. ImageNet-size images of both families get the official
        65536 prototypes and 8 local crops."""
        aug: dict[str, object] = {"crop_scale": (0.4, 1.0), "jitter_strength": 0.5}
        large = {"out_dim": 65536, "local_crops": 8} if image_size >= 96 else {}
        if family == "vit":
            return Recipe(optimizer="adamw", lr=5e-4, weight_decay=0.04, weight_decay_end=0.4, grad_clip=3.0, aug=aug, method=large)
        if image_size >= 96:
            aug["crop_scale"] = (0.14, 1.0)
            method = {**large, "local_crop_scale": (0.05, 0.14)}
            return Recipe(optimizer="sgd", lr=0.03, weight_decay=1e-4, grad_clip=3.0, aug=aug, method=method)
        method = {"head_layers": 2, "use_bn_in_head": True, "out_dim": 2048, "base_momentum": 0.99, "final_momentum": 0.99}
        return Recipe(optimizer="sgd", lr=0.12, weight_decay=5e-4, aug=aug, method=method)

    def views(self, base: AugmentConfig, image_size: int) -> list[ViewSpec]:
        """2 global views at ``image_size`` (blur p 1.0; blur 0.1 + solarize 0.2) and
        ``local_crops`` local views (crop scale ``local_crop_scale``, blur 0.5) of side
        ``local_crop_size``, as ``DataAugmentationDINO``; all other settings from ``base``."""
        return multicrop_views(base, image_size, self.encoder, self.cfg.local_crops, self.cfg.local_crop_size, self.cfg.local_crop_scale)

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.encoder, self.teacher_encoder), (self.head, self.teacher_head)]

    def momentum_at(self, info: StepInfo) -> float:
        return cosine_schedule(info, self.cfg.base_momentum, self.cfg.final_momentum)

    def teacher_temp_at(self, info: StepInfo) -> float:
        """tau_t: linear from ``warmup_teacher_temp`` to ``teacher_temp`` over the first
        ``warmup_teacher_temp_epochs`` epochs (fractional), then constant."""
        return linear_warmup(info, self.cfg.warmup_teacher_temp, self.cfg.teacher_temp, self.cfg.warmup_teacher_temp_epochs)

    def training_step(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        """Views (V x (B, 3, S_v, S_v)), the first 2 global: student logits on all V views, teacher
        logits on the 2 global ones (one backbone pass per view size, as ``MultiCropWrapper``)."""
        views, n_global = batch.views, 2
        if len(views) < 2:
            raise ValueError(f"DINO needs its 2 global views first, got {len(views)} views")
        with torch.no_grad():
            t = self.teacher_head(torch.cat(encode_views(self.teacher_encoder, views[:n_global])))
        s = self.head(torch.cat(encode_views(self.encoder, views)))
        temp = self.teacher_temp_at(batch.info)
        loss, probs = self.criterion(rearrange(s, "(v b) k -> v b k", v=len(views)), rearrange(t, "(g b) k -> g b k", g=n_global), temp)
        entropy = -(probs * torch.log(probs.clamp_min(1e-12))).sum(-1).mean()  # mean per-sample H(P_t), nats
        logs = {
            "loss": loss.detach(),
            "teacher_entropy": entropy,
            ENTROPY_FRAC_LOG: entropy / math.log(self.cfg.out_dim) if self.cfg.out_dim > 1 else torch.ones_like(entropy),
            "teacher_temp": torch.full((), temp, device=loss.device),
            EMBEDDING_LOG: s[: views[0].shape[0]].detach(),  # the student's logits on the first global view
        }
        return loss, logs

    def after_backward(self, info: StepInfo) -> None:
        """During the first ``freeze_last_layer`` epochs the prototypes get no update: their
        gradients are dropped (``cancel_gradients_last_layer``: ``grad = None``, so the optimizer
        skips them, weight decay and momentum included)."""
        if info.epoch < self.cfg.freeze_last_layer:
            for p in self.head.last_layer.parameters():
                p.grad = None
