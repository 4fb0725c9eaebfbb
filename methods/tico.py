"""TiCo: transformation invariance and covariance contrast.

Zhu, Moraes, Karakulak, Sobol, Canziani, LeCun. "TiCo: Transformation Invariance and Covariance
Contrast for Self-Supervised Visual Representation Learning." arXiv:2206.10698, 2022. The unit
embeddings of two views are pulled together (invariance) while each embedding's energy along an
exponential moving average of the embeddings' second-moment matrix is penalised (covariance
contrast): a contrastive loss against an implicit memory of every past batch. As in the two peer
implementations (lightly's ``benchmarks/imagenet/resnet50/tico.py`` and sayannag/TiCo-pytorch,
which lightly's ``TiCoLoss`` cites; there is no official code), view 2 goes through an EMA target
network and only view 1's embedding carries gradient.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sslbench.api import (
    EMBEDDING_LOG,
    AugmentConfig,
    Batch,
    Family,
    Method,
    MethodConfig,
    Recipe,
    StepInfo,
    UserError,
    ViewSpec,
    all_reduce_sum,
    asymmetric,
    cosine_schedule,
    feature_dim,
    freeze_,
    get_world_size,
    mlp,
    register_method,
)

__all__ = ["TiCo", "TiCoConfig", "TiCoLoss"]


class TiCoLoss(nn.Module):
    """TiCo's loss and its covariance (Zhu et al. 2022) as lightly's ``TiCoLoss`` computes it.

    With ``z_a``, ``z_b`` L2-normalised and ``B_t = (1/N) sum_i z_a,i z_a,i^T`` over the global batch::

        C_t = beta C_{t-1} + (1 - beta) B_t                      (no gradient; C_0 = 0)
        L   = -(1/N) sum_i <z_a,i, z_b,i> + rho (1/N) sum_i z_a,i^T C_t z_a,i

    ``covariance`` holds ``C_{t-1}``, a registered buffer (checkpoints and resume keep it). ``B_t``
    is an all-reduced sum over processes divided by the global N, so every process holds the
    covariance one process would. ``forward`` leaves ``C_t`` pending and :meth:`commit_` (after the
    optimizer step) makes it the new ``covariance``: a step that is computed twice (the gradient
    cache) or skipped (a non-finite loss) moves it once or not at all. The per-sample means are
    each process's own (DDP averages). Computed in float32 at least.

    Shapes: ``z_a``, ``z_b``: (n, D), row i of both is the same image. Returns the loss and the
    two terms (detached).
    """

    covariance: Tensor

    def __init__(self, dim: int, beta: float = 0.9, rho: float = 8.0) -> None:
        super().__init__()
        if not 0.0 <= beta < 1.0 or not rho >= 0:
            raise UserError(f"TiCo needs 0 <= beta < 1 and rho >= 0, got {beta}, {rho}")
        self.beta, self.rho = beta, rho
        self.register_buffer("covariance", torch.zeros(dim, dim))
        self.pending: Tensor | None = None  # C_t of the last forward, until commit_()

    def forward(self, z_a: Tensor, z_b: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        with torch.autocast(z_a.device.type, enabled=False):
            dtype = torch.promote_types(z_a.dtype, torch.float32)
            z_a, z_b = F.normalize(z_a.to(dtype), dim=1), F.normalize(z_b.to(dtype), dim=1)
            second_moment = all_reduce_sum(z_a.T @ z_a) / (z_a.shape[0] * get_world_size())  # B_t, (D, D)
            c = self.beta * self.covariance.to(dtype) + (1 - self.beta) * second_moment
            self.pending = c
            invariance = -(z_a * z_b).sum(dim=1).mean()
            contrast = ((z_a @ c) * z_a).sum(dim=1).mean()
            loss = invariance + self.rho * contrast
            return loss, {"invariance": invariance.detach(), "covariance_contrast": contrast.detach()}

    @torch.no_grad()
    def commit_(self) -> None:
        """``covariance <- C_t`` of the last forward (once)."""
        if self.pending is not None:
            self.covariance.copy_(self.pending)
            self.pending = None


@dataclass
class TiCoConfig(MethodConfig):
    """TiCo hyper-parameters (defaults: lightly's TiCoLoss and ImageNet benchmark; docs/recipes.md)."""

    beta: float = 0.9  # EMA rate of the covariance C (lightly's TiCoLoss default and benchmarks)
    rho: float = 8.0  # weight of the covariance contrast term (lightly's TiCoLoss default and ImageNet benchmark)
    base_momentum: float = 0.99  # target network's EMA rate at step 0 (lightly's ImageNet benchmark)
    final_momentum: float = 1.0  # target EMA rate at the last step, reached on a cosine schedule
    proj_hidden_dim: int = 4096  # projector hidden width (lightly's TiCoProjectionHead: 4096)
    proj_dim: int = 256  # embedding dimension D (lightly's TiCoProjectionHead: 256)
    asymmetric_augs: bool = True  # view 1: blur p 1.0, solarize 0.0; view 2: blur 0.1, solarize 0.2 (lightly's TiCoTransform)

    def validate(self) -> None:
        if not 0.0 <= self.beta < 1.0 or not self.rho >= 0:
            raise UserError(f"method_cfg needs 0 <= beta < 1 and rho >= 0, got {self.beta}, {self.rho}")
        if not 0.0 <= self.base_momentum <= self.final_momentum <= 1.0:
            raise UserError(f"method_cfg needs 0 <= base_momentum <= final_momentum <= 1, got {self.base_momentum}, {self.final_momentum}")
        if self.proj_hidden_dim < 1 or self.proj_dim < 1:
            raise UserError("method_cfg.proj_hidden_dim and proj_dim must be >= 1")


@register_method("tico")
class TiCo(Method):
    """Online backbone and 2-layer projector on view 1, their EMA target on view 2; the TiCo loss."""

    Config = TiCoConfig
    description = "Regularisation: invariance plus contrast against an EMA covariance of past embeddings (TiCo)"
    paper = "Zhu et al., TiCo: Transformation Invariance and Covariance Contrast for Self-Supervised Visual Representation Learning, 2022"
    min_batch_size = 2  # the projector's BatchNorm needs more than one sample
    supports_grad_cache = True

    def __init__(self, backbone: nn.Module, cfg: TiCoConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or TiCoConfig()
        self.encoder = backbone
        self.projector = mlp(feature_dim(backbone), cfg.proj_hidden_dim, cfg.proj_dim, 2)  # Linear-BN-ReLU-Linear
        self.target_encoder = freeze_(copy.deepcopy(self.encoder))
        self.target_projector = freeze_(copy.deepcopy(self.projector))
        self.criterion = TiCoLoss(cfg.proj_dim, cfg.beta, cfg.rho)

    @classmethod
    def recipe(cls, image_size: int, family: Family) -> Recipe:
        """Small images: SGD, lr 0.3 x B/256, wd 1e-4 (lightly's Imagenette ResNet-18 TiCo, the one
        ResNet-18 reference; no reference trains TiCo on small images). ImageNet-size: LARS (eta
        0.001, no clipping), lr 0.2 x B/256, wd 1.5e-6 (lightly's ImageNet ResNet-50 benchmark). No
        reference trains TiCo on a ViT, so ViTs get the same recipe (docs/recipes.md)."""
        if image_size < 96:
            return Recipe(optimizer="sgd", lr=0.3, lr_scaling="linear", weight_decay=1e-4)
        return Recipe(optimizer="lars", lr=0.2, lr_scaling="linear", weight_decay=1.5e-6)

    def views(self, base: AugmentConfig, image_size: int) -> list[ViewSpec]:
        """BYOL's asymmetric views (lightly's TiCoTransform): blur p 1.0 / 0.1, solarize p 0.0 /
        0.2; blur only from ``base.blur_min_size`` (96) px on."""
        if not self.cfg.asymmetric_augs:
            return super().views(base, image_size)
        return asymmetric(base, image_size, {"blur_p": 1.0, "solarize_p": 0.0}, {"blur_p": 0.1, "solarize_p": 0.2})

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.encoder, self.target_encoder), (self.projector, self.target_projector)]

    def momentum_at(self, info: StepInfo) -> float:
        return cosine_schedule(info, self.cfg.base_momentum, self.cfg.final_momentum)

    def after_optimizer_step(self, info: StepInfo) -> None:
        """The EMA of the target network, then the covariance of this step becomes C_{t-1}."""
        super().after_optimizer_step(info)
        self.criterion.commit_()

    def embed(self, batch: Batch, targets: bool = True) -> Tensor:
        """(B, 3, S, S) x 2 -> (B, 2, proj_dim): the online z_a of view 1 and the target's z_b of
        view 2 (without gradient); ``targets=False``: (B, 1, proj_dim), z_a only."""
        z_a: Tensor = self.projector(self.encoder(batch.views[0]))
        if not targets:
            return z_a[:, None]
        with torch.no_grad():
            z_b = self.target_projector(self.target_encoder(batch.views[1]))
        return torch.stack([z_a, z_b], dim=1)

    def loss_from_embeddings(self, emb: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """(B, 2, proj_dim) -> the TiCo loss and the logs of its two terms."""
        loss, terms = self.criterion(emb[:, 0], emb[:, 1])
        return loss, {"loss": loss.detach(), **terms, EMBEDDING_LOG: emb[:, 0].detach()}

    def training_step(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        """``batch.views``: two augmented (B, 3, S, S) batches -> (scalar loss, logs)."""
        return self.loss_from_embeddings(self.embed(batch))
