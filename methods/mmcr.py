"""MMCR: maximum manifold capacity representations.

Yerxa, Kuang, Simoncelli, Chung. "Learning Efficient Coding of Natural Images with Maximum Manifold
Capacity Representations." NeurIPS 2023. Each image is seen in k views; their unit embeddings are
averaged into a centroid per image, and the loss maximises the nuclear norm (the sum of singular
values) of the batch's centroid matrix: centroids that are long (the views agree) and spread over
many directions (the images differ). Details follow the official code (ThomasYerxa/mmcr,
``mmcr/cifar_stl/loss_mmcr.py`` and ``train.py``): one network for every view, no momentum
branch (the official ImageNet run adds one; not implemented here), a bias-free 2-layer projector.
"""

from __future__ import annotations

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
    UserError,
    ViewSpec,
    encode_views,
    expander,
    feature_dim,
    gather_with_grad,
    register_method,
)

__all__ = ["MMCR", "MMCRConfig", "MMCRLoss"]


class MMCRLoss(nn.Module):
    """The MMCR loss (Yerxa et al. 2023, as the official code computes it, with its optional local term).

    With ``z_iv`` the L2-normalised embedding of view v of image i, ``c_i = (1/k) sum_v z_iv`` the
    centroid, ``C`` the (N, D) matrix of the global batch's centroids and ``Z_i`` the (k, D) matrix
    of image i's views::

        L = -||C||_* + lambda (1/N) sum_i ||Z_i||_*

    ``||.||_*`` is the nuclear norm. The first term spans the batch, so the centroids of every
    process are gathered with :func:`sslbench.api.gather_with_grad` and every process computes the
    global nuclear norm (with DDP's averaging, the single-process gradient); the second is a mean
    over images, each process's own. Computed in float32 at least (singular values by
    ``torch.linalg.svdvals``). Returns the loss and the two nuclear norms (detached).

    Shapes: ``z``: (n, k, D), k views of each of n images.
    """

    def __init__(self, lambd: float = 0.0) -> None:
        super().__init__()
        if not lambd >= 0:
            raise UserError(f"MMCR's lambda must be >= 0, got {lambd}")
        self.lambd = lambd

    def forward(self, z: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        with torch.autocast(z.device.type, enabled=False):
            z = F.normalize(z.to(torch.promote_types(z.dtype, torch.float32)), dim=-1)
            centroids = gather_with_grad(z.mean(dim=1))  # (N, D)
            global_nuc = torch.linalg.svdvals(centroids).sum()
            local_nuc = torch.linalg.svdvals(z).sum(dim=-1).mean() if self.lambd else torch.zeros((), dtype=z.dtype, device=z.device)
            loss = self.lambd * local_nuc - global_nuc
            return loss, {"centroid_nuclear_norm": global_nuc.detach(), "view_nuclear_norm": local_nuc.detach()}


@dataclass
class MMCRConfig(MethodConfig):
    """MMCR hyper-parameters (defaults: the official code and lightly's example; docs/recipes.md)."""

    num_views: int = 8  # views k of each image (official ImageNet --n_aug 8, lightly's CIFAR-10 example k=8; official CIFAR: 40)
    lambd: float = 0.0  # lambda, weight of the mean per-image nuclear norm (official --lmbda 0.0; lightly's MMCRLoss: 5e-3)
    proj_hidden_dim: int = 512  # projector hidden width (official CIFAR/STL projector_dims [512, 128]; ImageNet 8192)
    proj_dim: int = 128  # embedding dimension D (official CIFAR/STL: 128; ImageNet 512)

    def validate(self) -> None:
        if self.num_views < 2:
            raise UserError(f"method_cfg.num_views must be >= 2 (a centroid of one view is that view), got {self.num_views}")
        if not self.lambd >= 0:
            raise UserError(f"method_cfg.lambd must be >= 0, got {self.lambd}")
        if self.proj_hidden_dim < 1 or self.proj_dim < 1:
            raise UserError("method_cfg.proj_hidden_dim and proj_dim must be >= 1")


@register_method("mmcr")
class MMCR(Method):
    """k views through one backbone and a bias-free 2-layer projector; the nuclear norm of the centroids."""

    Config = MMCRConfig
    description = "Manifold capacity: maximise the nuclear norm of the k-view centroids of the global batch (MMCR)"
    paper = "Yerxa et al., Learning Efficient Coding of Natural Images with Maximum Manifold Capacity Representations, NeurIPS 2023"
    min_batch_size = 2  # the projector's BatchNorm needs more than one sample
    supports_grad_cache = True

    def __init__(self, backbone: nn.Module, cfg: MMCRConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or MMCRConfig()
        self.encoder = backbone
        # Linear-BN-ReLU, then a Linear, both without bias (the official code's projector).
        self.projector = expander(feature_dim(backbone), cfg.proj_hidden_dim, cfg.proj_dim, 2)
        self.criterion = MMCRLoss(cfg.lambd)

    @classmethod
    def recipe(cls, image_size: int, family: Family) -> Recipe:
        """Small images: Adam, lr 1e-3, no batch scaling, wd 1e-6 (the official CIFAR/STL
        ``train.py`` and ``pretrain_cifar_stl.py``; sslbench's AdamW, whose decay of 1e-6 x lr is
        negligible either way). ImageNet-size: LARS (eta 0.001, no clipping), lr 0.8 x B/256, wd
        1e-6 (the official ``pretrain_imagenet.py`` and ``mmcr/imagenet/train.py``). No reference
        trains MMCR on a ViT, so ViTs get the same recipe (docs/recipes.md)."""
        if image_size < 96:
            return Recipe(optimizer="adamw", lr=1e-3, lr_scaling="none", weight_decay=1e-6)
        return Recipe(optimizer="lars", lr=0.8, lr_scaling="linear", weight_decay=1e-6)

    def views(self, base: AugmentConfig, image_size: int) -> list[ViewSpec]:
        """``num_views`` views of ``base`` at ``image_size`` (the official code draws every view
        from one augmentation)."""
        return [ViewSpec(base, image_size) for _ in range(self.cfg.num_views)]

    def embed(self, batch: Batch, targets: bool = True) -> Tensor:
        """k x (B, 3, S, S) -> (B, k, proj_dim): every view's projection (all carry gradient)."""
        z = self.projector(torch.cat(encode_views(self.encoder, batch.views)))
        return torch.stack(z.chunk(len(batch.views)), dim=1)

    def loss_from_embeddings(self, emb: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """(B, k, proj_dim) -> the MMCR loss and the logs of its nuclear norms."""
        loss, terms = self.criterion(emb)
        return loss, {"loss": loss.detach(), **terms, EMBEDDING_LOG: emb[:, 0].detach()}

    def training_step(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        """``batch.views``: k augmented (B, 3, S, S) batches -> (scalar loss, logs)."""
        return self.loss_from_embeddings(self.embed(batch))
