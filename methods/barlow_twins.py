"""Barlow Twins: redundancy reduction through the cross-correlation of two views' embeddings.

Zbontar, Jing, Misra, LeCun, Deny. "Barlow Twins: Self-Supervised Learning via Redundancy
Reduction." ICML 2021. The cross-correlation matrix between the batch-standardised embeddings of
two views is pushed towards the identity: diagonal terms to 1 (invariance), off-diagonal terms to
0 (redundancy reduction). No negatives, no predictor, no momentum encoder. Details follow the
official code (facebookresearch/barlowtwins, ``main.py``): a 3-layer projector without a last bias,
each view through the networks on its own (BatchNorm statistics per view), lambda 0.0051, LARS with
biases and BatchNorm parameters at 0.024 times the weights' learning rate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from sslbench.api import (
    EMBEDDING_LOG,
    AugmentConfig,
    BarlowTwinsLoss,
    Batch,
    Family,
    Method,
    MethodConfig,
    Recipe,
    UserError,
    ViewSpec,
    asymmetric,
    expander,
    feature_dim,
    register_method,
)

__all__ = ["BarlowTwins", "BarlowTwinsConfig", "BarlowTwinsLoss"]


@dataclass
class BarlowTwinsConfig(MethodConfig):
    """Barlow Twins hyper-parameters (defaults for small data; ImageNet values in the comments)."""

    lambd: float = 0.0051  # weight of the off-diagonal (redundancy) term (official code: 0.0051 at width 8192)
    proj_hidden_dim: int = 2048  # projector hidden width (paper: 8192)
    proj_dim: int = 2048  # embedding dimension D (paper: 8192)
    bias_lr_scale: float = 0.024  # lr of biases and norm parameters / lr of the weights (paper: 0.0048 / 0.2)
    asymmetric_augs: bool = True  # view 1: blur p 1.0, solarize 0.0; view 2: blur 0.1, solarize 0.2 (paper)

    def validate(self) -> None:
        if not self.lambd >= 0:
            raise UserError(f"method_cfg.lambd must be >= 0, got {self.lambd}")
        if self.proj_hidden_dim < 1 or self.proj_dim < 1:
            raise UserError("method_cfg.proj_hidden_dim and proj_dim must be >= 1")
        if not self.bias_lr_scale > 0:
            raise UserError(f"method_cfg.bias_lr_scale must be > 0, got {self.bias_lr_scale}")


@register_method("barlow_twins")
class BarlowTwins(Method):
    """Two views through a shared backbone and a 3-layer projector; the Barlow Twins loss on z."""

    Config = BarlowTwinsConfig
    description = "Redundancy reduction: cross-correlation of two views' embeddings towards identity (Barlow Twins)"
    paper = "Zbontar et al., Barlow Twins: Self-Supervised Learning via Redundancy Reduction, ICML 2021"
    min_batch_size = 2  # per-dimension batch statistics need at least two samples

    def __init__(self, backbone: nn.Module, cfg: BarlowTwinsConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or BarlowTwinsConfig()
        self.encoder = backbone
        # Linear-BN-ReLU twice, then a Linear without bias (Sec. 4, "Implementation details").
        self.projector = expander(feature_dim(backbone), cfg.proj_hidden_dim, cfg.proj_dim, 3)
        self.criterion = BarlowTwinsLoss(cfg.lambd)

    @classmethod
    def recipe(cls, image_size: int, family: Family) -> Recipe:
        """LARS with linear lr scaling. ImageNet-size: lr 0.2 x B/256 for the weights, wd 1.5e-6
        (Zbontar et al. 2021, Sec. 4, "Implementation details"; biases: see ``param_groups``).
        Small images: lr 0.3 x B/256, wd 1e-4 (solo-learn's CIFAR Barlow Twins config, tuned with
        its LARS form, eta 0.02 and clipping; sslbench keeps the official eta 0.001 without: see
        docs/recipes.md). No reference trains Barlow Twins on a ViT, so ViTs get the same recipe."""
        if image_size < 96:
            return Recipe(optimizer="lars", lr=0.3, lr_scaling="linear", weight_decay=1e-4)
        return Recipe(optimizer="lars", lr=0.2, lr_scaling="linear", weight_decay=1.5e-6)

    def views(self, base: AugmentConfig, image_size: int) -> list[ViewSpec]:
        """The paper's asymmetric views (BYOL's): blur p 1.0 / 0.1, solarize p 0.0 / 0.2; blur only
        from ``base.blur_min_size`` (96) px on."""
        if not self.cfg.asymmetric_augs:
            return super().views(base, image_size)
        return asymmetric(base, image_size, {"blur_p": 1.0, "solarize_p": 0.0}, {"blur_p": 0.1, "solarize_p": 0.2})

    def param_groups(self, groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Biases and BatchNorm parameters (the groups LARS excludes) follow the lr schedule times
        ``bias_lr_scale``: the paper's 0.0048 against 0.2 for the weights (Sec. 4)."""
        for g in groups:
            if g.get("lars_exclude", False):
                g["lr_scale"] = self.cfg.bias_lr_scale
        return groups

    def training_step(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        """``batch.views``: two augmented (B, 3, S, S) batches -> (scalar loss, logs). Each view
        passes through the networks alone, as in the official code (BatchNorm statistics per view)."""
        z1, z2 = (self.projector(self.encoder(x)) for x in batch.views)
        loss = self.criterion(z1, z2)
        return loss, {"loss": loss.detach(), EMBEDDING_LOG: z1.detach()}
