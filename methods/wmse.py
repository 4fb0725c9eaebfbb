"""W-MSE: the mean squared error between whitened embeddings of positive pairs.

Ermolov, Siarohin, Sangineto, Sebe. "Whitening for Self-Supervised Representation Learning."
ICML 2021. The embeddings of each view are whitened over a sub-batch (zero mean, identity
covariance, with the Cholesky factor of the covariance), then positives are pulled together with
the MSE of their L2-normalised whitened vectors. Whitening scatters the batch over the sphere, so
no negatives, predictor or momentum encoder are needed. Details follow the official code
(htdt/self-supervised, ``methods/w_mse.py`` and ``methods/whitening.py``): a 2-layer projector to
64 dimensions, the batch split into random sub-batches of ``w_size``, each view whitened on its
own in each sub-batch, the loss averaged over ``w_iter`` random splits and over the pairs of views.
The sub-batches come from the global batch (the official code whitens each GPU's batch alone),
and the split is a pure function of (seed, epoch, sample index): 2 processes compute what 1 does.
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
    expander,
    feature_dim,
    gather_no_grad,
    gather_with_grad,
    register_method,
)

__all__ = ["WMSE", "WMSEConfig", "WMSELoss", "whiten"]


@dataclass
class WMSEConfig(MethodConfig):
    """W-MSE hyper-parameters (the official CIFAR-10 command; ImageNet-100 values in the comments)."""

    proj_hidden_dim: int = 1024  # projector hidden width (official --head_size 1024)
    proj_dim: int = 64  # embedding dimension D (official CIFAR --emb 64; ImageNet-100: 128)
    w_size: int = 128  # whitening sub-batch size, 2 x D (official CIFAR --w_size 128; ImageNet-100: 256)
    w_iter: int = 1  # random splits into sub-batches per step, losses averaged (official --w_iter 1)
    eps: float = 1e-4  # shrinkage (1 - eps) Cov + eps I before the Cholesky factor (official 0: docs/recipes.md)
    num_views: int = 2  # positives per image, loss over every pair (W-MSE 2; the paper's W-MSE 4: 4)

    def validate(self) -> None:
        if self.proj_hidden_dim < 1 or self.proj_dim < 1:
            raise UserError("method_cfg.proj_hidden_dim and proj_dim must be >= 1")
        if self.w_size < 2 or self.w_iter < 1:
            raise UserError(f"method_cfg.w_size must be >= 2 and w_iter >= 1, got {self.w_size}, {self.w_iter}")
        if not 0.0 <= self.eps < 1.0:
            raise UserError(f"method_cfg.eps must be in [0, 1), got {self.eps}")
        if self.num_views < 2:
            raise UserError(f"method_cfg.num_views must be >= 2 (positive pairs), got {self.num_views}")


def whiten(x: Tensor, eps: float = 0.0) -> Tensor:
    """Cholesky whitening of (n, D) rows (Ermolov et al. 2021, Eq. 4): ``W (x_i - mean)`` with
    ``W = L^-1`` and ``L L^T = (1 - eps) Cov + eps I``, Cov the unbiased covariance of the rows.
    Computed in float64 (a D x D problem): the factor of an ill-conditioned Cov in float32 loses
    digits that the gradients amplify. A failed factorisation (a singular Cov with eps 0) gives NaN
    rows, which the trainer reports, instead of a host synchronisation to raise. Returns (n, D),
    in the dtype of ``x``."""
    n, d = x.shape
    xc = (x - x.mean(dim=0, keepdim=True)).double()
    eye = torch.eye(d, dtype=xc.dtype, device=x.device)
    cov = (1 - eps) * (xc.T @ xc) / (n - 1) + eps * eye
    chol, info = torch.linalg.cholesky_ex(cov)
    out: Tensor = torch.linalg.solve_triangular(chol, xc.T, upper=False).T  # (L^-1 xc^T)^T
    return out.masked_fill(info > 0, float("nan")).to(x.dtype)


class WMSELoss(nn.Module):
    """The W-MSE loss: for each split of the batch into sub-batches, whiten each view's rows within
    each sub-batch and average ``||w_a / |w_a| - w_b / |w_b|||^2 = 2 - 2 cos(w_a, w_b)`` over the
    samples and over every pair of views (a, b); then average over the splits. A split is a
    permutation of the N rows cut into ``max(1, N // w_size)`` consecutive near-equal sub-batches
    (exactly ``w_size`` rows when N is a multiple of it, as the official code requires).

    Shapes: ``z`` (V, N, D), V views of the same N images (the global batch); ``perms``
    (w_iter, N), each row a permutation of 0..N-1. Returns a scalar. Computed in float32, the
    whitening itself in float64 (:func:`whiten`).
    """

    def __init__(self, w_size: int = 128, eps: float = 0.0) -> None:
        super().__init__()
        self.w_size, self.eps = w_size, eps

    def forward(self, z: Tensor, perms: Tensor) -> Tensor:
        with torch.autocast(z.device.type, enabled=False):
            z = z.float()
            v, n, _ = z.shape
            pairs = [(a, b) for a in range(v) for b in range(a + 1, v)]
            total = torch.zeros((), device=z.device)
            for perm in perms:
                for idx in torch.tensor_split(perm, max(1, n // self.w_size)):
                    w = F.normalize(torch.stack([whiten(z[a, idx], self.eps) for a in range(v)]), dim=-1)
                    for a, b in pairs:
                        total = total + (w[a] - w[b]).pow(2).sum()
            return total / (n * len(pairs) * perms.shape[0])


@register_method("wmse")
class WMSE(Method):
    """Views through a shared backbone and a 2-layer projector; the W-MSE loss on the global batch."""

    Config = WMSEConfig
    description = "Whitening: MSE between positives whitened over sub-batches of the global batch (W-MSE)"
    paper = "Ermolov et al., Whitening for Self-Supervised Representation Learning, ICML 2021"
    min_batch_size = 2  # a covariance needs two samples

    def __init__(self, backbone: nn.Module, cfg: WMSEConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or WMSEConfig()
        self.encoder = backbone
        # Linear-BN-ReLU, then a Linear to D (the official get_head, --head_layers 2) without its
        # bias: whitening centres z, so a bias gets no gradient (only rounding, which Adam amplifies).
        self.projector = expander(feature_dim(backbone), cfg.proj_hidden_dim, cfg.proj_dim, 2)
        self.criterion = WMSELoss(cfg.w_size, cfg.eps)

    @classmethod
    def recipe(cls, image_size: int, family: Family) -> Recipe:
        """Adam(W) with linear lr scaling, lr 2e-3 x B/256, wd 1e-6, crops of 0.2-1 of the image
        below 96 px: solo-learn's CIFAR and ImageNet-100 ``wmse`` configs (the official code: Adam,
        lr 3e-3 at batch 512). No reference trains W-MSE on a ViT, so ViTs get the same recipe."""
        aug = {"crop_scale": (0.2, 1.0)} if image_size < 96 else {}
        return Recipe(optimizer="adamw", lr=2e-3, lr_scaling="linear", weight_decay=1e-6, aug=aug)

    def views(self, base: AugmentConfig, image_size: int) -> list[ViewSpec]:
        """``num_views`` views of ``base`` (the official MultiSample: one augmentation, drawn anew)."""
        return [ViewSpec(base, image_size) for _ in range(self.cfg.num_views)]

    def training_step(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        """``batch.views``: ``num_views`` augmented (B, 3, S, S) batches -> (scalar loss, logs).
        Each view through the backbone alone, all through the projector at once (official code);
        the embeddings of every process gathered, with gradients, into (V, N, D)."""
        h = [self.encoder(x) for x in batch.views]
        z = torch.stack(self.projector(torch.cat(h)).chunk(len(h)))  # (V, B, D)
        z_all = gather_with_grad(z.transpose(0, 1).contiguous()).transpose(0, 1)  # (V, N, D)
        # One permutation of the global batch per split: argsort of per-sample counter-based uniforms.
        perms = gather_no_grad(batch.uniform(0, self.cfg.w_iter)).T.argsort(dim=1)  # (w_iter, N)
        loss = self.criterion(z_all, perms)
        return loss, {"loss": loss.detach(), EMBEDDING_LOG: z[0].detach()}
