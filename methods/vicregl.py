"""VICRegL: VICReg on the global embeddings plus VICReg on matched local features.

Bardes, Ponce, LeCun. "VICRegL: Self-Supervised Learning of Local Visual Features." NeurIPS 2022.
Details follow the official code (facebookresearch/VICRegL at 803ae4c, ``main_vicregl.py``,
``utils.py``, ``transforms.py``). Each view's backbone feature map (a convnet's last spatial map,
a ViT's patch tokens) goes through a "maps" expander position by position; its positions are
matched with the other view's twice: (a) by location, each position's centre in the source image
(from the crop boxes, :attr:`Batch.boxes`) against the other view's nearest centre, keeping the
``match_fraction`` closest pairs, and (b) by feature distance, each position against its nearest
neighbour in the other view's embeddings (all positions, the official ``l2_all_matches``). VICReg
acts on every matched set, both directions; ``loss = alpha * global + (1 - alpha) * local``.
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
    VICRegLoss,
    ViewSpec,
    asymmetric,
    expander,
    feature_dim,
    gather_with_grad,
    register_method,
)

__all__ = ["VICRegL", "VICRegLConfig", "grid_locations", "local_vicreg", "nearest_matches", "vicregl_local_loss", "vicregl_loss"]


@dataclass
class VICRegLConfig(MethodConfig):
    """VICRegL hyper-parameters (official defaults of ``main_vicregl.py`` unless noted)."""

    alpha: float = 0.75  # weight of the global loss; the local one gets 1 - alpha (official --alpha 0.75, README's ResNet-50 runs)
    sim_weight: float = 25.0  # invariance weight, global and local (official --inv-coeff)
    var_weight: float = 25.0  # variance weight (official --var-coeff)
    cov_weight: float = 1.0  # covariance weight (official --cov-coeff)
    proj_hidden_dim: int = 2048  # global expander width (official --mlp 8192-8192-8192; VICReg's small-data 2048)
    proj_dim: int = 2048  # global embedding dimension (official 8192)
    maps_hidden_dim: int = 512  # local ("maps") expander width (official --maps-mlp 512-512-512)
    maps_dim: int = 512  # local embedding dimension (official 512)
    match_fraction: tuple[float, float] = (
        20 / 49,
        4 / 49,
    )  # share of positions kept by location, first -> second view and back (official --num_matches 20 4 of ResNet-50's 7x7)
    asymmetric_augs: bool = True  # VICReg's views: blur p 1.0 / 0.1, solarize 0.0 / 0.2 (official transforms.py)

    def validate(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise UserError(f"method_cfg.alpha must be in [0, 1], got {self.alpha}")
        if min(self.sim_weight, self.var_weight, self.cov_weight) < 0:
            raise UserError("method_cfg.sim_weight, var_weight and cov_weight must be >= 0")
        if min(self.proj_hidden_dim, self.proj_dim, self.maps_hidden_dim, self.maps_dim) < 1:
            raise UserError("method_cfg.proj_hidden_dim, proj_dim, maps_hidden_dim and maps_dim must be >= 1")
        if len(self.match_fraction) != 2 or not all(0 < f <= 1 for f in self.match_fraction):
            raise UserError(f"method_cfg.match_fraction must be two shares in (0, 1], got {self.match_fraction}")

    def num_matches(self, positions: int) -> tuple[int, int]:
        """The location matches kept of ``positions``: each share, rounded, at least 1 (20 and 4 of 49)."""
        a, b = (max(1, round(f * positions)) for f in self.match_fraction)
        return a, b


def grid_locations(boxes: Tensor, rows: int, cols: int) -> Tensor:
    """(B, 5) crop boxes (:attr:`Batch.boxes`) -> (B, rows * cols, 2): the centre (row, column) of
    every feature-map cell in the source image, in fractions of its height and width, row-major;
    a flipped view's columns run right to left (official ``_location_to_NxN_grid``)."""
    top, left, h, w, flip = boxes.unbind(1)
    r = (torch.arange(rows, device=boxes.device, dtype=boxes.dtype) + 0.5) / rows
    c = (torch.arange(cols, device=boxes.device, dtype=boxes.dtype) + 0.5) / cols
    c = torch.where(flip.unsqueeze(1) > 0.5, 1 - c, c)  # (B, cols)
    y = (top.unsqueeze(1) + r * h.unsqueeze(1)).unsqueeze(2).expand(-1, rows, cols)
    x = (left.unsqueeze(1) + c * w.unsqueeze(1)).unsqueeze(1).expand(-1, rows, cols)
    return torch.stack([y, x], dim=-1).flatten(1, 2)


def nearest_matches(distances: Tensor, k: int | None) -> tuple[Tensor, Tensor]:
    """(B, N, M) distances -> (B, k) positions of the input and (B, k) their nearest candidates:
    the k inputs closest to their nearest candidate, in input order (official ``neirest_neighbores``;
    ties to the lower index). ``k=None``: every input."""
    nearest_d, nearest = distances.min(dim=2)
    if k is None or k >= distances.shape[1]:
        keep = torch.arange(distances.shape[1], device=distances.device).expand(distances.shape[0], -1)
    else:
        keep = torch.sort(torch.sort(nearest_d, dim=1, stable=True).indices[:, :k], dim=1).values
    return keep, nearest.gather(1, keep)


def local_vicreg(x: Tensor, y: Tensor, sim: float, var: float, cov: float) -> tuple[Tensor, Tensor, Tensor]:
    """VICReg of matched local embeddings (B, k, D) (official ``_vicreg_loss``): the mean squared
    error, then per position k the variance hinge and covariance over the global batch, averaged
    over positions and the two sides. Returns the weighted (invariance, variance, covariance)."""
    inv = sim * F.mse_loss(x, y)
    v = c = x.new_zeros(())
    for z in (gather_with_grad(x), gather_with_grad(y)):
        n, _, d = z.shape
        z = z - z.mean(dim=0)
        v = v + F.relu(1.0 - torch.sqrt(z.var(dim=0) + 1e-4)).mean() / 2
        zk = z.transpose(0, 1)  # (k, n, D)
        covariance = zk.transpose(1, 2) @ zk / (n - 1)  # (k, D, D)
        off = covariance.pow(2).sum((1, 2)) - torch.diagonal(covariance, dim1=1, dim2=2).pow(2).sum(1)
        c = c + (off / d).mean() / 2
    return inv, var * v, cov * c


def vicregl_local_loss(
    maps: tuple[Tensor, Tensor], locations: tuple[Tensor, Tensor], num_matches: tuple[int, int], weights: tuple[float, float, float]
) -> tuple[Tensor, Tensor, Tensor]:
    """The local loss of two views (official ``local_loss`` with two crops): maps (B, N, D) and
    locations (B, N, 2); both view orders, each with feature and location matching both ways.
    Returns the (invariance, variance, covariance) terms, weighted."""
    total = [maps[0].new_zeros(()) for _ in range(3)]
    for a, b in ((0, 1), (1, 0)):
        for dist, ks in ((torch.cdist(maps[a], maps[b]), (None, None)), (torch.cdist(locations[a], locations[b]), num_matches)):
            for (src, dst), d, k in (((a, b), dist, ks[0]), ((b, a), dist.transpose(1, 2), ks[1])):
                keep, nn_idx = nearest_matches(d.detach(), k)
                x = maps[src].gather(1, keep.unsqueeze(-1).expand(-1, -1, maps[src].shape[-1]))
                y = maps[dst].gather(1, nn_idx.unsqueeze(-1).expand(-1, -1, maps[dst].shape[-1]))
                for i, term in enumerate(local_vicreg(x, y, *weights)):
                    total[i] = total[i] + term / 2
    return total[0] / 2, total[1] / 2, total[2] / 2


def vicregl_loss(
    z: tuple[Tensor, Tensor], maps: tuple[Tensor, Tensor], locations: tuple[Tensor, Tensor], cfg: VICRegLConfig
) -> tuple[Tensor, dict[str, Tensor]]:
    """``alpha * global + (1 - alpha) * local`` (official ``forward``) for embeddings z (B, D),
    local embeddings (B, N, D') and their locations (B, N, 2) of two views, with the detached terms
    (global ones unweighted, as VICReg logs them; local ones weighted, as the official code logs them)."""
    with torch.autocast(z[0].device.type, enabled=False):
        # The official global loss averages the covariance over the views, VICRegLoss sums it: half the weight.
        global_loss, terms = VICRegLoss(cfg.sim_weight, cfg.var_weight, cfg.cov_weight / 2)(z[0], z[1])
        weights = (cfg.sim_weight, cfg.var_weight, cfg.cov_weight)
        ks = cfg.num_matches(maps[0].shape[1])
        inv, var, cov = vicregl_local_loss((maps[0].float(), maps[1].float()), locations, ks, weights)
    loss = cfg.alpha * global_loss + (1 - cfg.alpha) * (inv + var + cov)
    local = {"local_invariance": inv.detach(), "local_variance": var.detach(), "local_covariance": cov.detach()}
    return loss, {"loss": loss.detach(), **terms, **local}


@register_method("vicregl")
class VICRegL(Method):
    """VICReg on pooled features plus VICReg on location- and feature-matched local features."""

    Config = VICRegLConfig
    description = "VICReg on global embeddings and on local features matched by location and by feature (VICRegL)"
    paper = "Bardes, Ponce, LeCun, VICRegL: Self-Supervised Learning of Local Visual Features, NeurIPS 2022"
    min_batch_size = 2  # the unbiased variance needs at least two samples

    def __init__(self, backbone: nn.Module, cfg: VICRegLConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or VICRegLConfig()
        self.encoder = backbone
        dim = feature_dim(backbone)
        self.projector = expander(dim, cfg.proj_hidden_dim, cfg.proj_dim, 3)  # official utils.MLP, batch norm
        self.maps_projector = expander(dim, cfg.maps_hidden_dim, cfg.maps_dim, 3)

    @classmethod
    def recipe(cls, image_size: int, family: Family) -> Recipe:
        """ImageNet-size: LARS lr 0.3 x B/256, wd 1e-6 (the README's ResNet-50 100-epoch command;
        ViTs: its ConvNeXt AdamW lr 7.5e-4 x B/256, wd 0.05). Small images: VICReg's small-data
        recipe (LARS lr 0.3, wd 1e-4; see docs/recipes.md)."""
        if family == "vit":
            return Recipe(optimizer="adamw", lr=7.5e-4, lr_scaling="linear", weight_decay=0.05)
        return Recipe(optimizer="lars", lr=0.3, lr_scaling="linear", weight_decay=1e-4 if image_size < 96 else 1e-6)

    def views(self, base: AugmentConfig, image_size: int) -> list[ViewSpec]:
        """VICReg's asymmetric pair (blur p 1.0 / 0.1, solarize 0.0 / 0.2)."""
        if not self.cfg.asymmetric_augs:
            return super().views(base, image_size)
        return asymmetric(base, image_size, {"blur_p": 1.0, "solarize_p": 0.0}, {"blur_p": 0.1, "solarize_p": 0.2})

    def features(self, x: Tensor) -> tuple[Tensor, Tensor, int, int]:
        """(B, 3, S, S) -> pooled h (B, C), local features (B, rows * cols, C), rows, cols."""
        f = self.encoder.forward_features(x)  # type: ignore[operator]
        h = self.encoder.forward_head(f, pre_logits=True)  # type: ignore[operator]
        if f.dim() == 4:  # convnet: (B, C, rows, cols)
            rows, cols = f.shape[2], f.shape[3]
            return h, f.flatten(2).transpose(1, 2), rows, cols
        tokens = f[:, int(getattr(self.encoder, "num_prefix_tokens", 0)) :]  # ViT: patch tokens, row-major
        side = int(round(tokens.shape[1] ** 0.5))
        return h, tokens, side, tokens.shape[1] // side

    def training_step(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        """``batch.views``: two (B, 3, S, S) views and their crop boxes (:meth:`Batch.view_boxes`) -> (loss, logs)."""
        z, maps, locations = [], [], []
        for x, box in zip(batch.views, batch.view_boxes()):
            h, local, rows, cols = self.features(x)
            z.append(self.projector(h))
            b, n, c = local.shape
            maps.append(self.maps_projector(local.reshape(b * n, c)).view(b, n, -1))
            locations.append(grid_locations(box.float(), rows, cols))
        loss, logs = vicregl_loss((z[0], z[1]), (maps[0], maps[1]), (locations[0], locations[1]), self.cfg)
        return loss, {**logs, EMBEDDING_LOG: z[0].detach()}
