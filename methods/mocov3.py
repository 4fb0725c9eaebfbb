"""MoCo v3: in-batch contrastive learning with a predictor and a momentum encoder.

Chen, Xie, He. "An Empirical Study of Training Self-Supervised Vision Transformers." ICCV 2021.
Queries come from the online encoder (backbone, projector, predictor), keys from a momentum
encoder (backbone, projector); the negatives are the other keys of the batch, gathered from every
process. No queue. BatchNorm is synchronised across processes by the trainer (as in the paper).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from sslbench.api import (
    EMBEDDING_LOG,
    Batch,
    Family,
    Method,
    MethodConfig,
    MoCoV3Loss,
    Recipe,
    StepInfo,
    UserError,
    cosine_schedule,
    feature_dim,
    freeze_,
    mlp,
    register_method,
)

__all__ = ["MoCoV3", "MoCoV3Config", "MoCoV3Loss"]


@dataclass
class MoCoV3Config(MethodConfig):
    """MoCo v3 hyper-parameters (defaults for small data; ImageNet values in the comments)."""

    temperature: float = 0.2  # tau (0.2 for ViTs and small data; 1.0 for ResNet-50 on ImageNet)
    base_momentum: float = 0.99  # momentum-encoder rate at step 0, cosine-increased to final_momentum
    final_momentum: float = 1.0  # momentum-encoder rate at the last step
    proj_layers: int = 3  # projector depth (official code: 3 for ViTs, 2 for ResNets)
    hidden_dim: int = 2048  # hidden width of projector and predictor (paper: 4096)
    proj_dim: int = 256  # output dimension of projector and predictor (paper: 256)

    def validate(self) -> None:
        if not self.temperature > 0:
            raise UserError(f"method_cfg.temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.base_momentum <= self.final_momentum <= 1.0:
            raise UserError(f"method_cfg needs 0 <= base_momentum <= final_momentum <= 1, got {self.base_momentum}, {self.final_momentum}")
        if self.proj_layers < 1 or self.hidden_dim < 1 or self.proj_dim < 1:
            raise UserError("method_cfg.proj_layers, hidden_dim and proj_dim must be >= 1")


@register_method("mocov3")
class MoCoV3(Method):
    """Symmetrised ctr(q1, k2) + ctr(q2, k1): queries from backbone, projector and predictor, keys
    from the momentum copy of backbone and projector, in-batch negatives."""

    Config = MoCoV3Config
    description = "Contrastive: in-batch InfoNCE, predictor and momentum encoder, symmetrised (MoCo v3)"
    paper = "Chen, Xie, He, An Empirical Study of Training Self-Supervised Vision Transformers, ICCV 2021"
    min_batch_size = 2  # a contrastive loss needs at least one negative
    supports_grad_cache = True

    def __init__(self, backbone: nn.Module, cfg: MoCoV3Config | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or MoCoV3Config()
        self.encoder = backbone
        # The official heads: hidden layers Linear-BN-ReLU; projector ends in a BN without affine.
        self.projector = mlp(feature_dim(backbone), cfg.hidden_dim, cfg.proj_dim, cfg.proj_layers, last_bn=True, last_bn_affine=False)
        self.predictor = mlp(cfg.proj_dim, cfg.hidden_dim, cfg.proj_dim, 2)
        self.momentum_encoder = freeze_(copy.deepcopy(self.encoder))
        self.momentum_projector = freeze_(copy.deepcopy(self.projector))
        self.criterion = MoCoV3Loss(cfg.temperature)

    @classmethod
    def recipe(cls, image_size: int, family: Family) -> Recipe:
        """Per backbone family (sources in docs/recipes.md). ViTs, every size: AdamW, lr 1.5e-4 x
        B/256, wd 0.1 (the official ViT-S/ViT-B commands, ``CONFIG.md`` of facebookresearch/moco-v3
        at c349e6e). Convnets: LARS with linear lr scaling; ImageNet-size lr 0.6 x B/256, wd 1e-6
        (``main_moco.py`` defaults, the ResNet-50 100-epoch setting; 0.3 for 300+ epochs); small
        images lr 0.3 x B/256, wd 1e-6 (solo-learn's ``scripts/pretrain/cifar/mocov3.yaml``)."""
        if family == "vit":
            return Recipe(optimizer="adamw", lr=1.5e-4, lr_scaling="linear", weight_decay=0.1)
        if image_size < 96:
            return Recipe(optimizer="lars", lr=0.3, lr_scaling="linear", weight_decay=1e-6)
        return Recipe(optimizer="lars", lr=0.6, lr_scaling="linear", weight_decay=1e-6)

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.encoder, self.momentum_encoder), (self.projector, self.momentum_projector)]

    def momentum_at(self, info: StepInfo) -> float:
        return cosine_schedule(info, self.cfg.base_momentum, self.cfg.final_momentum)

    def embed(self, batch: Batch, targets: bool = True) -> Tensor:
        """(B, 3, S, S) x 2 -> (B, 4, proj_dim): per sample q1, q2 (with gradient) and k1, k2
        (momentum encoder, no gradient); ``targets=False``: (B, 2, proj_dim), q1 and q2 only (the
        gradient cache's recomputation). One forward pass per view, so every BatchNorm (backbone,
        projector, predictor) normalises each view on its own, as the official ``MoCo.forward``
        (facebookresearch/moco-v3 at c349e6e, ``moco/builder.py``: ``predictor(base_encoder(x1))``,
        then ``x2``)."""
        q = [self.predictor(self.projector(self.encoder(v))) for v in batch.views]
        if not targets:
            return torch.stack(q, dim=1)
        with torch.no_grad():
            k = [self.momentum_projector(self.momentum_encoder(v)) for v in batch.views]
        return torch.stack([*q, *k], dim=1)

    def loss_from_embeddings(self, emb: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        k1, k2 = emb[:, 2].detach(), emb[:, 3].detach()  # keys are targets: stop-gradient
        loss = self.criterion(emb[:, 0], k2) + self.criterion(emb[:, 1], k1)
        return loss, {"loss": loss.detach(), EMBEDDING_LOG: emb[:, 0].detach()}  # the query q1

    def training_step(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        return self.loss_from_embeddings(self.embed(batch))
