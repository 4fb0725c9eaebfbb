"""DCL and DCLW: SimCLR with the decoupled contrastive loss, unweighted and weighted.

Yeh, Hong, Hsu, Liu, Chen, LeCun. "Decoupled Contrastive Learning." ECCV 2022. The positive pair
is taken out of NT-Xent's denominator (Eq. 6), which removes the negative-positive coupling that
makes InfoNCE need large batches; DCLW also weights each positive by a negative von Mises-Fisher
weight (harder positives count more). Everything else is SimCLR's: two views through a shared
encoder and a 2-layer projector, negatives from the global batch. There is no official code; the
defaults are lightly's (``lightly/loss/dcl_loss.py`` and its benchmarks, see docs/recipes.md).
Two registered names, ``dcl`` and ``dclw``: DCLW is DCL with ``sigma``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from sslbench.api import (
    EMBEDDING_LOG,
    Batch,
    DCLLoss,
    Family,
    Method,
    MethodConfig,
    Recipe,
    UserError,
    encode_views,
    feature_dim,
    mlp,
    register_method,
)

__all__ = ["DCL", "DCLW", "DCLConfig", "DCLLoss", "DCLWConfig"]


@dataclass
class DCLConfig(MethodConfig):
    """DCL hyper-parameters (defaults: lightly's DCLLoss and DCL benchmarks; see docs/recipes.md)."""

    temperature: float = 0.1  # tau of the similarities (lightly's DCLLoss default, its CIFAR-10 and ImageNet benchmarks)
    proj_hidden_dim: int = 2048  # projector hidden width (lightly's ImageNet DCL: SimCLRProjectionHead(), 2048)
    proj_dim: int = 128  # output dimension of z (lightly: 128)

    def validate(self) -> None:
        if not self.temperature > 0:
            raise UserError(f"method_cfg.temperature must be > 0, got {self.temperature}")
        if self.proj_hidden_dim < 1 or self.proj_dim < 1:
            raise UserError("method_cfg.proj_hidden_dim and proj_dim must be >= 1")


@dataclass
class DCLWConfig(DCLConfig):
    """DCLW hyper-parameters: DCL's and the weight's sigma."""

    sigma: float = 0.5  # sigma of the negative von Mises-Fisher weight (lightly's DCLWLoss default and benchmarks)

    def validate(self) -> None:
        super().validate()
        if not self.sigma > 0:
            raise UserError(f"method_cfg.sigma must be > 0, got {self.sigma}")


@register_method("dcl")
class DCL(Method):
    """Two augmented views through a shared encoder f and projector g; the DCL loss on z = g(f(x))."""

    Config = DCLConfig
    description = "Contrastive: NT-Xent without the positive in the denominator, in-batch negatives (DCL)"
    paper = "Yeh et al., Decoupled Contrastive Learning, ECCV 2022"
    min_batch_size = 2  # a contrastive loss needs at least one negative
    supports_grad_cache = True

    def __init__(self, backbone: nn.Module, cfg: DCLConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or DCLConfig()
        self.encoder = backbone
        # Linear-BN-ReLU, then a Linear to z: SimCLR's 2-layer head (lightly's SimCLRProjectionHead).
        self.projector = mlp(feature_dim(backbone), cfg.proj_hidden_dim, cfg.proj_dim, 2)
        self.criterion = DCLLoss(cfg.temperature)

    @classmethod
    def recipe(cls, image_size: int, family: Family) -> Recipe:
        """Small images: SGD, lr 0.12 x B/256, wd 5e-4 (lightly's CIFAR-10 benchmark: lr 0.06 x
        B/128, momentum 0.9). ImageNet-size: LARS (eta 0.001, no clipping), lr 0.075 x sqrt(B), wd
        1e-6 (lightly's ImageNet ResNet-50 DCL and DCLW benchmarks, SimCLR's square-root scaling).
        No reference trains DCL on a ViT, so ViTs get the same recipe (docs/recipes.md)."""
        if image_size < 96:
            return Recipe(optimizer="sgd", lr=0.12, lr_scaling="linear", weight_decay=5e-4)
        return Recipe(optimizer="lars", lr=0.075, lr_scaling="sqrt", weight_decay=1e-6)

    def embed(self, batch: Batch, targets: bool = True) -> Tensor:
        """(B, 3, S, S) x 2 -> (B, 2, proj_dim): both views' projections, per sample (all carry
        gradient, so ``targets`` changes nothing)."""
        z = self.projector(torch.cat(encode_views(self.encoder, batch.views)))
        return torch.stack(z.chunk(2), dim=1)

    def loss_from_embeddings(self, emb: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """(B, 2, proj_dim) -> the loss of the two views and the logs."""
        loss = self.criterion(emb[:, 0], emb[:, 1])
        return loss, {"loss": loss.detach(), EMBEDDING_LOG: emb[:, 0].detach()}

    def training_step(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        """``batch.views``: two augmented (B, 3, S, S) batches -> (scalar loss, logs)."""
        return self.loss_from_embeddings(self.embed(batch))


@register_method("dclw")
class DCLW(DCL):
    """DCL with each positive weighted by ``2 - exp(s_i / sigma) / mean_j exp(s_j / sigma)``, s the
    positive pairs' cosine similarities over the global batch."""

    Config = DCLWConfig
    description = "Contrastive: DCL with von Mises-Fisher weighted positives (DCLW)"
    paper = "Yeh et al., Decoupled Contrastive Learning, ECCV 2022 (the weighted loss, DCLW)"

    def __init__(self, backbone: nn.Module, cfg: DCLWConfig | None = None) -> None:
        cfg = cfg or DCLWConfig()
        super().__init__(backbone, cfg)
        self.criterion = DCLLoss(cfg.temperature, cfg.sigma)
