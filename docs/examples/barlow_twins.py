"""Barlow Twins as an sslbench method plugin: the whole method in one file.

Zbontar, Jing, Misra, LeCun, Deny. "Barlow Twins: Self-Supervised Learning via Redundancy
Reduction." ICML 2021. The cross-correlation matrix between the batch-standardised embeddings of
two views is pushed towards the identity: diagonal terms to 1 (invariance), off-diagonal terms to
0 (redundancy reduction). No negatives, no predictor, no momentum encoder.

This file is the worked example of docs/write-your-own-method.md; tests/test_methods_contract.py
imports it from this path and trains it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from sslbench.dist import gather_with_grad
from sslbench.errors import UserError
from sslbench.heads import encode_views, mlp
from sslbench.method import Batch, Method, MethodConfig, Recipe
from sslbench.registry import register_method


class BarlowTwinsLoss(nn.Module):
    """The Barlow Twins loss (Zbontar et al. 2021, Eq. 1 and 2).

    ``L = sum_i (1 - C_ii)^2 + lambda * sum_i sum_{j != i} C_ij^2`` with the cross-correlation
    ``C_ij = sum_b a_bi c_bj / N``, where ``a`` and ``c`` are the two views' embeddings
    standardised per dimension over the batch (mean 0, biased variance 1, eps 1e-5: the official
    code's ``BatchNorm1d(affine=False)``).

    In a multi-process run the embeddings are gathered with :func:`sslbench.dist.gather_with_grad`
    first, so the statistics and ``C`` are those of the global batch and every process computes
    the same loss; with the gather's summed backward and DDP's averaging the gradient is exactly
    the single-process one. Computed in float32.

    Shapes: ``z1``, ``z2``: (N, D), row i of both is the same image. Returns a scalar.
    """

    def __init__(self, off_diagonal_weight: float = 5e-3, eps: float = 1e-5) -> None:
        super().__init__()
        self.off_diagonal_weight = off_diagonal_weight
        self.eps = eps

    def standardise(self, z: Tensor) -> Tensor:
        """(N, D) -> (N, D): each column to mean 0 and variance 1 over the batch."""
        var, mean = torch.var_mean(z, dim=0, unbiased=False)
        return (z - mean) / torch.sqrt(var + self.eps)

    def forward(self, z1: Tensor, z2: Tensor) -> Tensor:
        a = self.standardise(gather_with_grad(z1.float()))
        c = self.standardise(gather_with_grad(z2.float()))
        corr = a.T @ c / a.shape[0]  # (D, D)
        diag = torch.diagonal(corr)
        on_diag = (diag - 1).pow(2).sum()
        off_diag = corr.pow(2).sum() - diag.pow(2).sum()
        return on_diag + self.off_diagonal_weight * off_diag


@dataclass
class BarlowTwinsConfig(MethodConfig):
    """Barlow Twins hyper-parameters (defaults for small data; ImageNet values in the comments)."""

    off_diagonal_weight: float = 5e-3  # lambda, weight of the redundancy-reduction term (paper: 5e-3)
    proj_hidden_dim: int = 2048  # projector hidden width (paper: 8192)
    proj_dim: int = 2048  # embedding dimension D (paper: 8192)

    def validate(self) -> None:
        if not self.off_diagonal_weight >= 0:
            raise UserError(f"method_cfg.off_diagonal_weight must be >= 0, got {self.off_diagonal_weight}")
        if self.proj_hidden_dim < 1 or self.proj_dim < 1:
            raise UserError("method_cfg.proj_hidden_dim and proj_dim must be >= 1")


@register_method("barlow_twins")
class BarlowTwins(Method):
    """Two views through a shared backbone and a 3-layer projector; the Barlow Twins loss on z."""

    Config = BarlowTwinsConfig
    description = "Redundancy reduction: cross-correlation of two views' embeddings towards identity"
    paper = "Zbontar et al., Barlow Twins: Self-Supervised Learning via Redundancy Reduction, ICML 2021"
    min_batch_size = 2  # per-dimension batch statistics need at least two samples

    def __init__(self, backbone: nn.Module, cfg: BarlowTwinsConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or BarlowTwinsConfig()
        self.encoder = backbone  # h: what downstream evaluation uses
        # The paper's projector: two Linear-BN-ReLU blocks, then a Linear (Sec. 4).
        self.projector = mlp(backbone.num_features, cfg.proj_hidden_dim, cfg.proj_dim, 3)
        self.criterion = BarlowTwinsLoss(cfg.off_diagonal_weight)

    @classmethod
    def recipe(cls, image_size: int) -> Recipe:
        """LARS with linear lr scaling. ImageNet-size: lr 0.2 x B/256, wd 1.5e-6
        (Zbontar et al. 2021, Sec. 4, "Implementation details"). Small images: lr 0.3 x B/256,
        wd 1e-4 (solo-learn's CIFAR Barlow Twins config)."""
        if image_size < 96:
            return Recipe(optimizer="lars", lr=0.3, lr_scaling="linear", weight_decay=1e-4)
        return Recipe(optimizer="lars", lr=0.2, lr_scaling="linear", weight_decay=1.5e-6)

    def training_step(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        """``batch.views``: two augmented, normalised (B, 3, S, S) batches -> (scalar loss, logs)."""
        h1, h2 = encode_views(self.encoder, batch.views)  # one backbone pass over both views
        z1, z2 = self.projector(torch.cat([h1, h2])).chunk(2)  # one projector pass too
        loss = self.criterion(z1, z2)
        return loss, {"loss": loss.detach()}
