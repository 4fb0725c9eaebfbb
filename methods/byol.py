"""BYOL: an online network predicts a slowly moving target network's projection of another view.

Grill, Strub, Altché, Tallec, Richemond, Buchatskaya, Doersch, Pires, Guo, Azar, Piot,
Kavukcuoglu, Munos, Valko. "Bootstrap Your Own Latent: A New Approach to Self-Supervised
Learning." NeurIPS 2020. No negatives: a predictor on the online side and an exponential moving
average target (base rate 0.996 raised to 1 on a cosine schedule, Sec. 3.2) prevent collapse.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from sslbench.api import (
    EMBEDDING_LOG,
    AugmentConfig,
    Batch,
    BYOLLoss,
    Family,
    Method,
    MethodConfig,
    Recipe,
    StepInfo,
    UserError,
    ViewSpec,
    asymmetric,
    byol_loss,
    cosine_schedule,
    encode_views,
    feature_dim,
    freeze_,
    mlp,
    register_method,
)

__all__ = ["BYOL", "BYOLConfig", "BYOLLoss", "byol_loss"]


@dataclass
class BYOLConfig(MethodConfig):
    """BYOL hyper-parameters (defaults for small data; ImageNet values in the comments)."""

    base_momentum: float = 0.996  # target EMA rate tau_base at step 0 (paper: 0.996)
    final_momentum: float = 1.0  # target EMA rate at the last step, reached on a cosine schedule
    proj_hidden_dim: int = 2048  # projector hidden width (paper: 4096)
    proj_dim: int = 256  # projection (and prediction) dimension (paper: 256)
    pred_hidden_dim: int = 2048  # predictor hidden width (paper: 4096)
    asymmetric_augs: bool = True  # view 1: blur p 1.0, solarize 0.0; view 2: blur 0.1, solarize 0.2

    def validate(self) -> None:
        if not 0.0 <= self.base_momentum <= self.final_momentum <= 1.0:
            raise UserError(f"method_cfg needs 0 <= base_momentum <= final_momentum <= 1, got {self.base_momentum}, {self.final_momentum}")
        if min(self.proj_hidden_dim, self.proj_dim, self.pred_hidden_dim) < 1:
            raise UserError("method_cfg.proj_hidden_dim, proj_dim and pred_hidden_dim must be >= 1")


@register_method("byol")
class BYOL(Method):
    """Online backbone, projector and predictor; target = EMA of backbone and projector."""

    Config = BYOLConfig
    description = "Non-contrastive: predict an EMA target's projection of the other view (BYOL)"
    paper = "Grill et al., Bootstrap Your Own Latent: A New Approach to Self-Supervised Learning, NeurIPS 2020"
    supports_grad_cache = True
    min_batch_size = 2  # the projector's and predictor's BatchNorm need more than one sample

    def __init__(self, backbone: nn.Module, cfg: BYOLConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or BYOLConfig()
        self.encoder = backbone
        self.projector = mlp(feature_dim(backbone), cfg.proj_hidden_dim, cfg.proj_dim, 2)
        self.predictor = mlp(cfg.proj_dim, cfg.pred_hidden_dim, cfg.proj_dim, 2)
        self.target_encoder = freeze_(copy.deepcopy(self.encoder))
        self.target_projector = freeze_(copy.deepcopy(self.projector))
        self.criterion = BYOLLoss()

    @classmethod
    def recipe(cls, image_size: int, family: Family) -> Recipe:
        """LARS with linear lr scaling. ImageNet-size: lr 0.2 x B/256, wd 1.5e-6
        (BYOL Sec. 3.2). Small images: lr 1.0 x B/256, wd 1e-5 (solo-learn's CIFAR byol config,
        tuned with its LARS form, eta 0.02 and clipping; sslbench keeps eta 0.001 without: see
        docs/recipes.md). No reference trains BYOL on a ViT, so ViTs get the same recipe."""
        if image_size < 96:
            return Recipe(optimizer="lars", lr=1.0, lr_scaling="linear", weight_decay=1e-5)
        return Recipe(optimizer="lars", lr=0.2, lr_scaling="linear", weight_decay=1.5e-6)

    def views(self, base: AugmentConfig, image_size: int) -> list[ViewSpec]:
        """BYOL's asymmetric views (Grill et al. 2020, Table 6): blur p 1.0 / 0.1, solarize p
        0.0 / 0.2; everything else from ``base``. Blur only fires for images of at least
        ``base.blur_min_size`` px (96 by default), so at 32 px only solarization differs."""
        if not self.cfg.asymmetric_augs:
            return super().views(base, image_size)
        return asymmetric(base, image_size, {"blur_p": 1.0, "solarize_p": 0.0}, {"blur_p": 0.1, "solarize_p": 0.2})

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.encoder, self.target_encoder), (self.projector, self.target_projector)]

    def momentum_at(self, info: StepInfo) -> float:
        return cosine_schedule(info, self.cfg.base_momentum, self.cfg.final_momentum)

    def embed(self, batch: Batch, targets: bool = True) -> Tensor:
        """(B, 3, S, S) x 2 -> (B, 4, proj_dim): per sample the online predictions p1, p2 and the
        target projections z1, z2 (computed without gradient); ``targets=False``: (B, 2, proj_dim),
        p1 and p2 only (the gradient cache's recomputation)."""
        views = batch.views
        p = self.predictor(self.projector(torch.cat(encode_views(self.encoder, views))))
        if not targets:
            return torch.stack(p.chunk(2), dim=1)
        with torch.no_grad():
            z = self.target_projector(torch.cat(encode_views(self.target_encoder, views)))
        return torch.stack([*p.chunk(2), *z.chunk(2)], dim=1)

    def loss_from_embeddings(self, emb: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        loss = self.criterion(emb[:, 0], emb[:, 1], emb[:, 2], emb[:, 3])
        return loss, {"loss": loss.detach(), EMBEDDING_LOG: emb[:, 0].detach()}  # the online prediction p1

    def training_step(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        return self.loss_from_embeddings(self.embed(batch))
