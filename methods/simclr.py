"""SimCLR: contrastive learning with the NT-Xent loss.

Chen, Kornblith, Norouzi, Hinton. "A Simple Framework for Contrastive Learning of Visual
Representations." ICML 2020 (v1); Chen et al. "Big Self-Supervised Models are Strong
Semi-Supervised Learners." NeurIPS 2020 (v2: the 3-layer projector).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from sslbench.api import (
    EMBEDDING_LOG,
    Batch,
    Family,
    Method,
    MethodConfig,
    NTXentLoss,
    Recipe,
    UserError,
    encode_views,
    feature_dim,
    mlp,
    register_method,
)

__all__ = ["NTXentLoss", "SimCLR", "SimCLRConfig"]


# projector -> number of linear layers (0: the identity, z = h); the ablation of SimCLR's Fig. 8
PROJECTORS = {"none": 0, "linear": 1, "v1": 2, "v2": 3}


@dataclass
class SimCLRConfig(MethodConfig):
    """SimCLR hyper-parameters (defaults: the paper's CIFAR setting, Appendix B.9)."""

    temperature: float = 0.5  # NT-Xent tau (0.5 for CIFAR; 0.1 for ImageNet at batch 4096)
    projector: str = "v1"  # v1: 2-layer MLP head; v2: 3-layer MLP head (SimCLR v2); linear: one linear layer; none: z = h (SimCLR Fig. 8)
    proj_hidden_dim: int = 2048  # projector hidden width
    proj_dim: int = 128  # output dimension of z

    def validate(self) -> None:
        if not self.temperature > 0:
            raise UserError(f"method_cfg.temperature must be > 0, got {self.temperature}")
        if self.projector not in PROJECTORS:
            raise UserError(f"method_cfg.projector must be one of {', '.join(PROJECTORS)}; got {self.projector!r}")
        if self.proj_hidden_dim < 1 or self.proj_dim < 1:
            raise UserError("method_cfg.proj_hidden_dim and proj_dim must be >= 1")


@register_method("simclr")
class SimCLR(Method):
    """Two augmented views through a shared encoder f and projector g; NT-Xent on z = g(f(x))."""

    Config = SimCLRConfig
    description = "Contrastive: NT-Xent over 2N views, in-batch negatives (gathered across processes)"
    paper = "Chen et al., A Simple Framework for Contrastive Learning of Visual Representations, ICML 2020"
    min_batch_size = 2  # a contrastive loss needs at least one negative
    supports_grad_cache = True

    def __init__(self, backbone: nn.Module, cfg: SimCLRConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or SimCLRConfig()
        self.encoder = backbone
        layers = PROJECTORS[cfg.projector]
        self.projector = mlp(feature_dim(backbone), cfg.proj_hidden_dim, cfg.proj_dim, layers) if layers else nn.Sequential()
        self.criterion = NTXentLoss(cfg.temperature)

    @classmethod
    def recipe(cls, image_size: int, family: Family) -> Recipe:
        """LARS (eta 0.001, no clipping: the official ``lars_optimizer.py``) with linear lr scaling.
        ImageNet-size: lr 0.3 x B/256, wd 1e-6 (google-research/simclr ``run.py`` defaults; Sec. 4).
        Small images: lr 1.0 x B/256 (the official README's CIFAR-10 command) and wd 1e-5,
        sslbench's own value (the README: 1e-4; solo-learn's CIFAR config: 1e-4). No reference
        trains SimCLR on a ViT, so ViTs get the same recipe (docs/recipes.md)."""
        if image_size < 96:
            return Recipe(optimizer="lars", lr=1.0, lr_scaling="linear", weight_decay=1e-5)
        return Recipe(optimizer="lars", lr=0.3, lr_scaling="linear", weight_decay=1e-6)

    def embed(self, batch: Batch, targets: bool = True) -> Tensor:
        """(B, 3, S, S) x 2 -> (B, 2, proj_dim): both views' projections, per sample (all carry
        gradient, so ``targets`` changes nothing)."""
        z = self.projector(torch.cat(encode_views(self.encoder, batch.views)))
        return torch.stack(z.chunk(2), dim=1)

    def loss_from_embeddings(self, emb: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        loss = self.criterion(emb[:, 0], emb[:, 1])
        return loss, {"loss": loss.detach(), EMBEDDING_LOG: emb[:, 0].detach()}

    def training_step(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        return self.loss_from_embeddings(self.embed(batch))
