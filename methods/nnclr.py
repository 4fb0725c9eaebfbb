"""NNCLR: contrastive learning with nearest neighbours from a support set as positives.

Dwibedi, Aytar, Tompson, Sermanet, Zisserman. "With a Little Help from My Friends:
Nearest-Neighbor Contrastive Learning of Visual Representations." ICCV 2021. Each view's unit
projection is replaced by its nearest neighbour in a FIFO support set of past projections, and
that neighbour must identify the other view's prediction among the global batch's (and the
prediction the neighbour, the symmetrised loss). The support set holds view 1's projections of
every process (gathered), so every process keeps the same set and a run on N processes computes
what one computes.

Each view has its own forward pass through backbone, projector and predictor (BatchNorm statistics
per view), as the peers' NNCLR: lightly's CIFAR-10 benchmark (lightly-ai/lightly at e8d317f,
``docs/source/getting_started/benchmarks/cifar10_benchmark.py``, ``NNCLRModel.training_step``:
``z0, p0 = self.forward(x0)``, ``z1, p1 = self.forward(x1)``) and solo-learn (vturrisi/solo-learn at
9187ea3, ``solo/methods/base.py``: one ``base_training_step`` per crop).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from sslbench.api import (
    EMBEDDING_LOG,
    AugmentConfig,
    Batch,
    Family,
    MemoryBank,
    Method,
    MethodConfig,
    NNCLRLoss,
    Recipe,
    UserError,
    ViewSpec,
    asymmetric,
    feature_dim,
    mlp,
    register_method,
)

__all__ = ["NNCLR", "NNCLRConfig", "NNCLRLoss"]


@dataclass
class NNCLRConfig(MethodConfig):
    """NNCLR hyper-parameters (defaults for small data; ImageNet values in the comments)."""

    temperature: float = 0.1  # softmax temperature tau (paper: 0.1)
    queue_size: int = 4096  # support set size (paper: 98304)
    proj_hidden_dim: int = 2048  # projector hidden width (paper: 2048)
    proj_dim: int = 256  # projection (and prediction) dimension (paper: 256)
    pred_hidden_dim: int = 4096  # predictor hidden width (paper: 4096)
    asymmetric_augs: bool = True  # view 1: blur p 1.0, solarize 0.0; view 2: blur 0.1, solarize 0.2 (BYOL's, as the paper)

    def validate(self) -> None:
        if not self.temperature > 0:
            raise UserError(f"method_cfg.temperature must be > 0, got {self.temperature}")
        if self.queue_size < 1:
            raise UserError(f"method_cfg.queue_size must be >= 1, got {self.queue_size}")
        if min(self.proj_hidden_dim, self.proj_dim, self.pred_hidden_dim) < 1:
            raise UserError("method_cfg.proj_hidden_dim, proj_dim and pred_hidden_dim must be >= 1")


@register_method("nnclr")
class NNCLR(Method):
    """Backbone, 3-layer projector and 2-layer predictor; the support set's nearest neighbour of
    one view's projection is contrasted with the other view's prediction."""

    Config = NNCLRConfig
    description = "Contrastive: nearest neighbours from a support set as positives (NNCLR)"
    paper = "Dwibedi et al., With a Little Help from My Friends: Nearest-Neighbor Contrastive Learning of Visual Representations, ICCV 2021"
    min_batch_size = 2  # a contrastive loss needs at least one negative

    def __init__(self, backbone: nn.Module, cfg: NNCLRConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or NNCLRConfig()
        self.encoder = backbone
        # Projector: 3 layers with BN on every output, the last included; predictor: 2 layers.
        self.projector = mlp(feature_dim(backbone), cfg.proj_hidden_dim, cfg.proj_dim, 3, last_bn=True)
        self.predictor = mlp(cfg.proj_dim, cfg.pred_hidden_dim, cfg.proj_dim, 2)
        self.criterion = NNCLRLoss(cfg.temperature)
        # Random unit rows to start with (as lightly and solo-learn); buffers `support` and `support_ptr`.
        self.bank = MemoryBank(self, "support", cfg.queue_size, cfg.proj_dim)

    @classmethod
    def recipe(cls, image_size: int, family: Family) -> Recipe:
        """LARS with linear lr scaling. ImageNet-size: lr 0.3 x B/256, wd 1e-6 (SimCLR's LARS
        setting, on which the paper's batch-4096 training builds). Small images: lr 0.4 x B/256,
        wd 1e-5 (solo-learn's CIFAR NNCLR config, tuned with its LARS form, eta 0.02 and clipping;
        sslbench keeps eta 0.001 without: see docs/recipes.md). No reference trains NNCLR on a ViT,
        so ViTs get the same recipe."""
        if image_size < 96:
            return Recipe(optimizer="lars", lr=0.4, lr_scaling="linear", weight_decay=1e-5)
        return Recipe(optimizer="lars", lr=0.3, lr_scaling="linear", weight_decay=1e-6)

    def views(self, base: AugmentConfig, image_size: int) -> list[ViewSpec]:
        """BYOL's asymmetric views: blur p 1.0 / 0.1, solarize p 0.0 / 0.2 (blur only from
        ``base.blur_min_size`` (96) px on)."""
        if not self.cfg.asymmetric_augs:
            return super().views(base, image_size)
        return asymmetric(base, image_size, {"blur_p": 1.0, "solarize_p": 0.0}, {"blur_p": 0.1, "solarize_p": 0.2})

    def training_step(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        """``batch.views``: two augmented (B, 3, S, S) batches -> (scalar loss, logs). The
        neighbours come from the support set as it was before this step; then view 1's unit
        projections of every process are pushed. One forward pass per view."""
        za, zb = (self.projector(self.encoder(x)) for x in batch.views)  # (B, proj_dim) each
        p1, p2 = self.predictor(za), self.predictor(zb)
        z1, z2 = (F.normalize(z.detach().float(), dim=1) for z in (za, zb))
        nn1, nn2 = self.bank.nearest(z1), self.bank.nearest(z2)
        loss = self.criterion(nn1, nn2, p1, p2)
        self.bank.push(z1)
        return loss, {"loss": loss.detach(), EMBEDDING_LOG: z1}
