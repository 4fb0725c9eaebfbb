"""VICReg: variance, invariance and covariance regularisation of two views' embeddings.

Bardes, Ponce, LeCun. "VICReg: Variance-Invariance-Covariance Regularization for Self-Supervised
Learning." ICLR 2022. The embeddings of two views are pulled together (invariance, a mean squared
error), each dimension's standard deviation over the batch is kept above 1 (variance, a hinge) and
the dimensions are decorrelated (covariance): no negatives, no predictor, no momentum encoder.
Details follow the official code (facebookresearch/vicreg, ``main_vicreg.py``): a 3-layer expander
without a last bias, each view through the networks on its own, variance and covariance over the
global batch (gathered from every process).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from sslbench.api import (
    EMBEDDING_LOG,
    AugmentConfig,
    Batch,
    Family,
    Method,
    MethodConfig,
    Recipe,
    UserError,
    VICRegLoss,
    ViewSpec,
    asymmetric,
    expander,
    feature_dim,
    register_method,
)

__all__ = ["VICReg", "VICRegConfig", "VICRegLoss"]


@dataclass
class VICRegConfig(MethodConfig):
    """VICReg hyper-parameters (defaults for small data; ImageNet values in the comments)."""

    sim_weight: float = 25.0  # lambda, weight of the invariance term (paper: 25)
    var_weight: float = 25.0  # mu, weight of the variance term (paper: 25)
    cov_weight: float = 1.0  # nu, weight of the covariance term (paper: 1)
    proj_hidden_dim: int = 2048  # expander hidden width (paper: 8192)
    proj_dim: int = 2048  # embedding dimension D (paper: 8192)
    asymmetric_augs: bool = True  # view 1: blur p 1.0, solarize 0.0; view 2: blur 0.1, solarize 0.2 (paper)

    def validate(self) -> None:
        if min(self.sim_weight, self.var_weight, self.cov_weight) < 0:
            raise UserError("method_cfg.sim_weight, var_weight and cov_weight must be >= 0")
        if self.proj_hidden_dim < 1 or self.proj_dim < 1:
            raise UserError("method_cfg.proj_hidden_dim and proj_dim must be >= 1")


@register_method("vicreg")
class VICReg(Method):
    """Two views through a shared backbone and a 3-layer expander; the VICReg loss on z."""

    Config = VICRegConfig
    description = "Regularisation: invariance, variance hinge and covariance decorrelation of two views (VICReg)"
    paper = "Bardes et al., VICReg: Variance-Invariance-Covariance Regularization for Self-Supervised Learning, ICLR 2022"
    min_batch_size = 2  # the unbiased variance needs at least two samples

    def __init__(self, backbone: nn.Module, cfg: VICRegConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or VICRegConfig()
        self.encoder = backbone
        # Linear-BN-ReLU twice, then a Linear without bias (the official code's Projector).
        self.projector = expander(feature_dim(backbone), cfg.proj_hidden_dim, cfg.proj_dim, 3)
        self.criterion = VICRegLoss(cfg.sim_weight, cfg.var_weight, cfg.cov_weight)

    @classmethod
    def recipe(cls, image_size: int, family: Family) -> Recipe:
        """LARS with linear lr scaling. ImageNet-size: lr 0.2 x B/256, wd 1e-6 (the official
        ``--base-lr`` and ``--wd`` at batch 2048). Small images: lr 0.3 x B/256, wd 1e-4
        (solo-learn's CIFAR VICReg config, tuned with its LARS form, eta 0.02 and clipping; sslbench
        keeps the official eta 0.001 without: see docs/recipes.md). No reference trains VICReg on a
        ViT, so ViTs get the same recipe."""
        if image_size < 96:
            return Recipe(optimizer="lars", lr=0.3, lr_scaling="linear", weight_decay=1e-4)
        return Recipe(optimizer="lars", lr=0.2, lr_scaling="linear", weight_decay=1e-6)

    def views(self, base: AugmentConfig, image_size: int) -> list[ViewSpec]:
        """The paper's asymmetric views (BYOL's, as in the official ``augmentations.py``): blur p
        1.0 / 0.1, solarize p 0.0 / 0.2; blur only from ``base.blur_min_size`` (96) px on."""
        if not self.cfg.asymmetric_augs:
            return super().views(base, image_size)
        return asymmetric(base, image_size, {"blur_p": 1.0, "solarize_p": 0.0}, {"blur_p": 0.1, "solarize_p": 0.2})

    def training_step(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        """``batch.views``: two augmented (B, 3, S, S) batches -> (scalar loss, logs of the three
        terms). Each view passes through the networks alone, as in the official code."""
        z1, z2 = (self.projector(self.encoder(x)) for x in batch.views)
        loss, terms = self.criterion(z1, z2)
        return loss, {"loss": loss.detach(), **terms, EMBEDDING_LOG: z1.detach()}
