"""LeJEPA: the views' prediction of their global views' centre, regularised by SIGReg.

Balestriero, LeCun. "LeJEPA: Provable and Scalable Self-Supervised Learning Without the
Heuristics." arXiv:2511.08544, 2025. Every view's projection predicts the mean projection of the
image's global views (a squared error), and SIGReg (Sketched Isotropic Gaussian Regularization)
pushes each view's distribution of projections towards an isotropic Gaussian: along random unit
directions, the Epps-Pulley statistic compares the empirical characteristic function of the
projected batch with the standard normal's. One trade-off ``lambd``; no stop-gradient, no
teacher, no predictor network. Details follow the official code (rbalestr-lab/lejepa at commit
``eddffdd``: ``MINIMAL.md``'s SIGReg and training loop, ``lejepa/univariate/epps_pulley.py``):
the integral over [-t_max, t_max] taken as twice the trapezoid rule on [0, t_max] (the integrand
is even), the directions redrawn each step from a generator seeded by the step. Here they are
seeded by (seed, step), so every process and a resumed run draw the same ones, and SIGReg's
means are over the global batch (sums all-reduced with gradients).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
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
    all_reduce_sum_with_grad,
    check_local_crops,
    encode_views,
    feature_dim,
    fit_to_patches,
    get_world_size,
    mlp,
    register_method,
)

__all__ = ["LeJEPA", "LeJEPAConfig", "LeJEPALoss", "slice_directions"]


@dataclass
class LeJEPAConfig(MethodConfig):
    """LeJEPA hyper-parameters (official MINIMAL.md example; the README's ImageNet values in comments)."""

    lambd: float = 0.02  # SIGReg's weight; the prediction's is 1 - lambd (MINIMAL.md: 0.02; README/paper: 0.05)
    num_slices: int = 256  # random unit directions of SIGReg per step (MINIMAL.md: 256; README: 1024)
    knots: int = 17  # trapezoid points on [0, t_max] (official: 17)
    t_max: float = 3.0  # integration limit of the Epps-Pulley statistic (official: 3)
    proj_hidden_dim: int = 2048  # projector hidden width (official MLP 2048-2048)
    proj_dim: int = 16  # projection dimension (MINIMAL.md's command: 16; lightly's head: 64)
    global_views: int = 4  # views at the image size, whose mean is the target (MINIMAL.md: V=4; README: 2)
    local_views: int = 0  # smaller views that only predict (README: 6)
    local_crop_size: int | None = None  # px; None: 7/16 of the image side (README: 98 px at 224)
    local_crop_scale: tuple[float, float] = (0.05, 0.3)  # local crop area range (README: 0.05-0.3)

    def validate(self) -> None:
        if not 0.0 <= self.lambd <= 1.0:
            raise UserError(f"method_cfg.lambd must be in [0, 1], got {self.lambd}")
        if min(self.num_slices, self.proj_hidden_dim, self.proj_dim, self.global_views) < 1 or self.knots < 2:
            raise UserError("method_cfg.num_slices, proj_hidden_dim, proj_dim and global_views must be >= 1, knots >= 2")
        if not self.t_max > 0 or self.local_views < 0 or (self.local_crop_size is not None and self.local_crop_size < 1):
            raise UserError("method_cfg.t_max must be > 0, local_views >= 0 and local_crop_size >= 1 px (or None)")
        if not 0 < self.local_crop_scale[0] <= self.local_crop_scale[1] <= 1:
            raise UserError(f"method_cfg.local_crop_scale must satisfy 0 < min <= max <= 1, got {self.local_crop_scale}")


def slice_directions(info: StepInfo, dim: int, num: int, device: torch.device) -> Tensor:
    """(dim, num) unit columns, Gaussian directions drawn from a generator seeded by (seed, step):
    the same on every process and after a resume, never from torch's global random state."""
    g = torch.Generator(device=device)
    g.manual_seed((info.seed * 1_000_003 + info.step) % (1 << 63))
    a = torch.randn(dim, num, generator=g, device=device)
    unit: Tensor = a / torch.linalg.vector_norm(a, dim=0, keepdim=True)
    return unit


class LeJEPALoss(nn.Module):
    """``lambd * SIGReg + (1 - lambd) * prediction`` (LeJEPA, Algorithm 1 and MINIMAL.md).

    - prediction: ``mean_{v, i, d} (c_id - z_vid)^2`` with ``c_i`` the mean of image i's global views;
    - SIGReg: for each view v and unit direction a, the Epps-Pulley statistic of the projections
      ``x_i = z_vi . a`` over the N images of the global batch,
      ``N * int |mean_i exp(i t x_i) - exp(-t^2/2)|^2 exp(-t^2/2) dt`` over [-t_max, t_max]
      (trapezoid rule), averaged over directions and views.

    Shapes: ``z`` (V, B, D), the first ``num_global`` views global; ``directions`` (D, M). B is
    this process's share: the characteristic function's sums are all-reduced over processes.
    Returns the loss and its two terms (detached). Computed in float32.
    """

    t: Tensor  # (K,) the knots, linspace(0, t_max, K)
    phi: Tensor  # (K,) exp(-t^2 / 2)
    weights: Tensor  # (K,) trapezoid weights times phi

    def __init__(self, lambd: float = 0.05, knots: int = 17, t_max: float = 3.0) -> None:
        super().__init__()
        self.lambd = lambd
        t = torch.linspace(0, t_max, knots)
        weights = torch.full((knots,), 2 * t_max / (knots - 1))  # twice the trapezoid weights on [0, t_max]
        weights[[0, -1]] /= 2
        self.register_buffer("t", t, persistent=False)
        self.register_buffer("phi", torch.exp(-t.square() / 2), persistent=False)  # the N(0, 1) characteristic function
        self.register_buffer("weights", weights * self.phi, persistent=False)  # times the window exp(-t^2 / 2)

    def sigreg(self, z: Tensor, directions: Tensor) -> Tensor:
        n = z.shape[1] * get_world_size()
        xt = (z @ directions).unsqueeze(-1) * self.t  # (V, B, M, K)
        sums = all_reduce_sum_with_grad(torch.stack([xt.cos().sum(1), xt.sin().sum(1)]))  # (2, V, M, K)
        err = (sums[0] / n - self.phi).square() + (sums[1] / n).square()
        return (err @ self.weights * n).mean()

    def forward(self, z: Tensor, num_global: int, directions: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        with torch.autocast(z.device.type, enabled=False):
            z, directions = z.float(), directions.float()
            prediction = (z[:num_global].mean(0) - z).square().mean()
            sigreg = self.sigreg(z, directions)
            loss = self.lambd * sigreg + (1 - self.lambd) * prediction
            return loss, {"prediction": prediction.detach(), "sigreg": sigreg.detach()}


@register_method("lejepa")
class LeJEPA(Method):
    """Views through a shared backbone and a 3-layer projector; the LeJEPA loss on the projections."""

    Config = LeJEPAConfig
    description = "Prediction of the global views' centre plus SIGReg, a sketched isotropic-Gaussian test (LeJEPA)"
    paper = "Balestriero and LeCun, LeJEPA: Provable and Scalable Self-Supervised Learning Without the Heuristics, 2025"
    min_batch_size = 2  # the projector's BatchNorm needs more than one sample

    def __init__(self, backbone: nn.Module, cfg: LeJEPAConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or LeJEPAConfig()
        self.encoder = backbone
        # (Linear-BN-ReLU) x 2, then a Linear: MINIMAL.md's torchvision MLP(512, [2048, 2048, proj_dim]).
        self.projector = mlp(feature_dim(backbone), cfg.proj_hidden_dim, cfg.proj_dim, 3)
        self.criterion = LeJEPALoss(cfg.lambd, cfg.knots, cfg.t_max)

    @classmethod
    def recipe(cls, image_size: int, family: Family) -> Recipe:
        """AdamW, weight decay 5e-2 for ViTs and 5e-4 for convnets (README, "Training
        Configuration"). Small images: lr 2e-3 x B/256 and MINIMAL.md's views (4 of one size,
        colour jitter strength 1, solarization 0.2). ImageNet-size: the README's lr 5e-4 x B/256,
        2 global (scale 0.3-1) + 6 local views, lambda 0.05, 1024 directions, lightly's 64-d head."""
        wd = 5e-2 if family == "vit" else 5e-4
        if image_size < 96:
            return Recipe(optimizer="adamw", lr=2e-3, lr_scaling="linear", weight_decay=wd, aug={"jitter_strength": 1.0, "solarize_p": 0.2})
        aug = {"crop_scale": (0.3, 1.0), "jitter_strength": 0.5, "solarize_p": 0.2}
        method = {"lambd": 0.05, "num_slices": 1024, "proj_dim": 64, "global_views": 2, "local_views": 6}
        return Recipe(optimizer="adamw", lr=5e-4, lr_scaling="linear", weight_decay=wd, aug=aug, method=method)

    def views(self, base: AugmentConfig, image_size: int) -> list[ViewSpec]:
        """``global_views`` views of ``base`` at ``image_size``, then ``local_views`` of side
        ``local_crop_size`` (crop scale ``local_crop_scale``); the same colour and blur settings."""
        cfg = self.cfg
        size = fit_to_patches(
            cfg.local_crop_size or max(1, round(image_size * 7 / 16)), self.encoder, cfg.local_crop_size is not None, "method_cfg.local_crop_size"
        )
        check_local_crops(size, image_size, cfg.local_views, "method_cfg.local_crop_size", "method_cfg.local_views")
        local = ViewSpec(replace(base, crop_scale=cfg.local_crop_scale), size)
        return [ViewSpec(base, image_size)] * cfg.global_views + [local] * cfg.local_views

    def training_step(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        """``batch.views``: the global then the local (B, 3, S_v, S_v) batches -> (scalar loss,
        logs of both terms). One backbone pass per view size, one projector pass over all views."""
        h = encode_views(self.encoder, batch.views)
        z = torch.stack(self.projector(torch.cat(h)).chunk(len(h)))  # (V, B, D)
        directions = slice_directions(batch.info, z.shape[-1], self.cfg.num_slices, z.device)
        loss, terms = self.criterion(z, self.cfg.global_views, directions)
        return loss, {"loss": loss.detach(), **terms, EMBEDDING_LOG: z[0].detach()}
