"""SimSiam: a Siamese network with a predictor and a stop-gradient, no negatives, no momentum.

Chen, He. "Exploring Simple Siamese Representation Learning." CVPR 2021. One encoder (backbone +
3-layer projector ending in BatchNorm) embeds both views; a 2-layer bottleneck predictor maps one
view's projection to the other's, which is held fixed by a stop-gradient (Sec. 3, Algorithm 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sslbench.api import (
    EMBEDDING_LOG,
    Batch,
    Family,
    Method,
    MethodConfig,
    Recipe,
    SimSiamLoss,
    UserError,
    encode_views,
    feature_dim,
    mlp,
    negative_cosine,
    register_method,
)

__all__ = ["SimSiam", "SimSiamConfig", "SimSiamLoss", "negative_cosine"]


@dataclass
class SimSiamConfig(MethodConfig):
    """SimSiam hyper-parameters (the paper's ImageNet architecture, Sec. 4 "Baseline settings")."""

    proj_layers: int = 3  # projector depth, BN on every layer's output (the CIFAR experiments use 2)
    proj_hidden_dim: int = 2048  # projector hidden width (paper: 2048)
    proj_dim: int = 2048  # output dimension of z and p (paper: 2048)
    pred_hidden_dim: int | None = None  # predictor bottleneck width (None: proj_dim // 4, paper: 512)
    fixed_predictor_lr: bool = True  # the predictor keeps the base lr, no schedule (paper, Sec. 4.2, Table 1)

    def validate(self) -> None:
        if min(self.proj_layers, self.proj_hidden_dim, self.proj_dim) < 1:
            raise UserError("method_cfg.proj_layers, proj_hidden_dim and proj_dim must be >= 1")
        if self.pred_hidden_dim is not None and self.pred_hidden_dim < 1:
            raise UserError(f"method_cfg.pred_hidden_dim must be >= 1 or None, got {self.pred_hidden_dim}")
        if self.pred_hidden_dim is None and self.proj_dim < 4:
            raise UserError(f"method_cfg.proj_dim must be >= 4 when pred_hidden_dim is None, got {self.proj_dim}")


@register_method("simsiam")
class SimSiam(Method):
    """Shared encoder f (backbone + projector), predictor h; D(h(z1), sg(z2)) symmetrised."""

    Config = SimSiamConfig
    description = "Non-contrastive: predictor + stop-gradient, no negatives, no momentum encoder (SimSiam)"
    paper = "Chen and He, Exploring Simple Siamese Representation Learning, CVPR 2021"
    supports_grad_cache = True
    min_batch_size = 2  # the projector's and predictor's BatchNorm need more than one sample

    def __init__(self, backbone: nn.Module, cfg: SimSiamConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or SimSiamConfig()
        self.encoder = backbone
        # The official code's output BN has no affine parameters.
        self.projector = mlp(feature_dim(backbone), cfg.proj_hidden_dim, cfg.proj_dim, cfg.proj_layers, last_bn=True, last_bn_affine=False)
        pred_hidden = cfg.pred_hidden_dim or cfg.proj_dim // 4
        self.predictor = mlp(cfg.proj_dim, pred_hidden, cfg.proj_dim, 2)
        self.criterion = SimSiamLoss()

    @classmethod
    def recipe(cls, image_size: int, family: Family) -> Recipe:
        """SGD with linear lr scaling. ImageNet-size: lr 0.05 x B/256, wd 1e-4
        (Sec. 4 "Baseline settings"). Small images: lr 0.03 x B/256, wd 5e-4 (Appendix D, the
        CIFAR-10 experiments). No reference trains SimSiam on a ViT, so ViTs get the same recipe
        (docs/recipes.md)."""
        if image_size < 96:
            return Recipe(optimizer="sgd", lr=0.03, lr_scaling="linear", weight_decay=5e-4)
        return Recipe(optimizer="sgd", lr=0.05, lr_scaling="linear", weight_decay=1e-4)

    def param_groups(self, groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """With ``fixed_predictor_lr``, move the predictor's parameters into groups of their own
        with ``fixed_lr=True`` (they keep the base lr the optimizer is built with), each group's
        other keys (weight decay, LARS exclusion) unchanged, so the no-decay split is kept."""
        if not self.cfg.fixed_predictor_lr:
            return groups
        pred = {id(p) for p in self.predictor.parameters()}
        out: list[dict[str, Any]] = []
        for g in groups:
            params = list(g["params"])
            rest = [p for p in params if id(p) not in pred]
            mine = [p for p in params if id(p) in pred]
            if rest:
                out.append({**g, "params": rest})
            if mine:
                out.append({**g, "params": mine, "fixed_lr": True})
        return out

    def embed(self, batch: Batch, targets: bool = True) -> Tensor:
        """(B, 3, S, S) x 2 -> (B, 4, proj_dim): per sample p1, p2, z1, z2 (z is the stop-gradient
        target, but it is computed with the online network, so every column carries gradient and
        ``targets`` changes nothing)."""
        z = self.projector(torch.cat(encode_views(self.encoder, batch.views)))
        p = self.predictor(z)
        return torch.stack([*p.chunk(2), *z.chunk(2)], dim=1)

    def loss_from_embeddings(self, emb: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        loss = self.criterion(emb[:, 0], emb[:, 1], emb[:, 2], emb[:, 3])
        # Collapse monitor (Chen & He 2021, Fig. 2): std of the normalised z per channel, ~1/sqrt(d) when healthy.
        z_std = F.normalize(emb[:, 2].detach().float(), dim=1).std(dim=0).mean()
        return loss, {"loss": loss.detach(), "z_std": z_std, EMBEDDING_LOG: emb[:, 2].detach()}

    def training_step(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        return self.loss_from_embeddings(self.embed(batch))
