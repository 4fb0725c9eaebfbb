"""All4One: nearest-neighbour contrast, a centroid contrast over a transformer and feature redundancy.

Estepa, Rodríguez, Igual, Remeseiro, Radeva, Ollero. "All4One: Symbiotic Neighbour Contrastive
Learning via Self-Attention and Redundancy Reduction." ICCV 2023. Three objectives on two views:

- NNCLR's contrast: the support set's nearest neighbour of one view's (momentum) projection must
  pick the other view's prediction among the global batch's;
- centroid contrast: a transformer over the k = 5 nearest neighbours (plus a positional encoding)
  summarises them in its first output token, the "centroid"; it must pick the other view's
  summary of a sequence whose first slot is that view's second prediction, followed by its first
  4 neighbours (the shifted sequence);
- feature contrast: the cross-correlation of the two views' features, each feature normalised
  over the batch, should be the identity (a Barlow-Twins-like redundancy reduction).

Details follow solo-learn, the reference implementation the paper's code builds on
(vturrisi/solo-learn at ``a151225``, ``solo/methods/all4one.py``): a momentum encoder and projector
give the queries and the support set's rows, the contrasts are ``nnclr_loss_func`` (row
cross-entropy against the gathered second argument), ``L = 0.5 centroid + 0.5 nnclr + 0.5 x 10 x
feature``. The support set is gathered from every process (:class:`sslbench.api.MemoryBank`) and the
feature term's batch sums are those of the global batch, so N processes compute what one computes.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
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
    Recipe,
    StepInfo,
    UserError,
    ViewSpec,
    all_reduce_sum_with_grad,
    asymmetric,
    cosine_schedule,
    feature_dim,
    freeze_,
    gather_with_grad,
    get_rank,
    mlp,
    off_diagonal,
    register_method,
)

__all__ = ["All4One", "All4OneConfig", "All4OneLoss", "neighbour_contrast", "slot_encoding"]

NUM_NEIGHBOURS = 5  # k, the neighbours the transformer reads (solo-learn: topk(5), PositionalEncodingPermute1D(5))


@dataclass
class All4OneConfig(MethodConfig):
    """All4One hyper-parameters (solo-learn's CIFAR config ``scripts/pretrain/cifar/all4one.yaml``)."""

    temperature: float = 0.2  # tau of the NNCLR contrast (solo-learn CIFAR: 0.2)
    centroid_temperature: float = 0.1  # tau of the centroid contrast (solo-learn: nnclr_loss_func's default 0.1)
    queue_size: int = 98304  # support set size (solo-learn CIFAR: 98304)
    proj_hidden_dim: int = 2048  # projector hidden width (solo-learn CIFAR: 2048)
    proj_dim: int = 256  # projection, prediction and transformer width (solo-learn CIFAR: 256)
    pred_hidden_dim: int = 4096  # hidden width of both predictors (solo-learn CIFAR: 4096)
    transformer_layers: int = 3  # encoder layers (solo-learn: 3; 8 heads, feed-forward 2 x proj_dim)
    transformer_lr_scale: float = 0.1  # the transformer's lr over the base lr (solo-learn: lr 0.1 beside 1.0)
    feature_weight: float = 10.0  # scale of the feature term inside its 0.5 weight (solo-learn: 10)
    base_momentum: float = 0.99  # momentum encoder's EMA rate at step 0 (solo-learn CIFAR: 0.99)
    final_momentum: float = 1.0  # EMA rate at the last step, cosine schedule (solo-learn CIFAR: 1.0)

    def validate(self) -> None:
        if not self.temperature > 0 or not self.centroid_temperature > 0:
            raise UserError("method_cfg.temperature and centroid_temperature must be > 0")
        if self.queue_size < NUM_NEIGHBOURS:
            raise UserError(f"method_cfg.queue_size must be >= {NUM_NEIGHBOURS} (the neighbours the transformer reads), got {self.queue_size}")
        if min(self.proj_hidden_dim, self.pred_hidden_dim, self.transformer_layers) < 1 or self.proj_dim < 8 or self.proj_dim % 8:
            raise UserError(
                "method_cfg.proj_dim must be a multiple of 8 (the transformer's 8 heads); proj_hidden_dim, pred_hidden_dim, transformer_layers >= 1"
            )
        if not self.transformer_lr_scale > 0 or self.feature_weight < 0:
            raise UserError("method_cfg.transformer_lr_scale must be > 0 and feature_weight >= 0")
        if not 0.0 <= self.base_momentum <= self.final_momentum <= 1.0:
            raise UserError(f"method_cfg needs 0 <= base_momentum <= final_momentum <= 1, got {self.base_momentum}, {self.final_momentum}")


def slot_encoding(slots: int, dim: int) -> Tensor:
    """(slots, dim) sinusoidal table added to a (B, slots, dim) sequence, as solo-learn's
    ``Summer(PositionalEncodingPermute1D(5))`` (package ``positional_encodings``): the permuted
    form treats the *feature index* d as the position and the slots as channels, so entry
    ``[s, d]`` is ``sin(d f_{s//2})`` for even s and ``cos(d f_{s//2})`` for odd s, with
    ``f_i = 10000^(-2i / c)`` and c the slot count rounded up to even."""
    c = slots + slots % 2
    freq = 10000.0 ** (-torch.arange(0, c, 2, dtype=torch.float64) / c)  # (c/2,)
    angle = torch.arange(dim, dtype=torch.float64)[:, None] * freq  # (dim, c/2)
    table = torch.stack([angle.sin(), angle.cos()], dim=-1).flatten(1)[:, :slots]  # (dim, slots), sin/cos interleaved
    return table.T.float()


def neighbour_contrast(a: Tensor, b: Tensor, temperature: float) -> Tensor:
    """solo-learn's ``nnclr_loss_func``: ``CE(a_i . b_k / tau)`` over the global batch's unit b,
    label i; a (n, D) local rows, b (n, D) gathered with gradients, labels offset by rank; the mean
    over this process's rows (DDP averages). Gradients flow into both."""
    a, b = F.normalize(a.float(), dim=1), F.normalize(b.float(), dim=1)
    labels = torch.arange(a.shape[0], device=a.device) + get_rank() * a.shape[0]
    return F.cross_entropy(a @ gather_with_grad(b).T / temperature, labels)


def _unit_columns(x: Tensor) -> Tensor:
    """(n, D) -> (n, D): each column over its L2 norm over the global batch (F.normalize(dim=0))."""
    return x / all_reduce_sum_with_grad((x * x).sum(dim=0)).sqrt().clamp_min(1e-12)


class All4OneLoss(nn.Module):
    """``0.5 L_centroid + 0.5 L_nnclr + 0.5 w L_feature`` (All4One, Sec. 3; solo-learn's weights).

    - ``L_nnclr = (C(nn1, p2, tau) + C(nn2, p1, tau)) / 2`` with C :func:`neighbour_contrast`;
    - ``L_centroid = (C(c1, s2, tau_c) + C(c2, s1, tau_c)) / 2`` for the transformer's first
      output tokens c (the neighbours) and s (the shifted sequence);
    - ``L_feature = (sqrt(mean_j (1 - R_jj)^2) + sqrt(mean_{j != l} R_jl^2)) / 2``, both
      square roots of the two correlations' average, ``R1 = norm0(m1)^T norm0(z2)``,
      ``R2 = norm0(m2)^T norm0(z1)`` (norm0: each column to unit norm over the global batch, no
      centring), m the momentum projections, z the online ones.

    Shapes: every input (n, D), row b the same image. Returns the loss and the three terms.
    """

    def __init__(self, temperature: float = 0.2, centroid_temperature: float = 0.1, feature_weight: float = 10.0) -> None:
        super().__init__()
        self.temperature, self.centroid_temperature, self.feature_weight = temperature, centroid_temperature, feature_weight

    def forward(
        self,
        nn1: Tensor,
        nn2: Tensor,
        p1: Tensor,
        p2: Tensor,
        c1: Tensor,
        c2: Tensor,
        s1: Tensor,
        s2: Tensor,
        m1: Tensor,
        m2: Tensor,
        z1: Tensor,
        z2: Tensor,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        with torch.autocast(p1.device.type, enabled=False):
            nnclr = (neighbour_contrast(nn1, p2, self.temperature) + neighbour_contrast(nn2, p1, self.temperature)) / 2
            centroid = (neighbour_contrast(c1, s2, self.centroid_temperature) + neighbour_contrast(c2, s1, self.centroid_temperature)) / 2
            r1 = all_reduce_sum_with_grad(_unit_columns(m1.float()).T @ _unit_columns(z2.float()))  # (D, D)
            r2 = all_reduce_sum_with_grad(_unit_columns(m2.float()).T @ _unit_columns(z1.float()))
            on = ((torch.diagonal(r1) - 1).pow(2).mean() + (torch.diagonal(r2) - 1).pow(2).mean()) / 2
            off = (off_diagonal(r1).pow(2).mean() + off_diagonal(r2).pow(2).mean()) / 2
            feature = (on.sqrt() + off.sqrt()) / 2
            loss = 0.5 * centroid + 0.5 * nnclr + 0.5 * self.feature_weight * feature
            return loss, {"nnclr": nnclr.detach(), "centroid": centroid.detach(), "feature": feature.detach()}


@register_method("all4one")
class All4One(Method):
    """Backbone, 3-layer projector, two 2-layer predictors, a transformer over neighbours, and
    momentum copies of backbone and projector feeding a support set."""

    Config = All4OneConfig
    description = "Contrastive: nearest-neighbour, transformer-centroid and feature-redundancy objectives (All4One)"
    paper = "Estepa et al., All4One: Symbiotic Neighbour Contrastive Learning via Self-Attention and Redundancy Reduction, ICCV 2023"
    min_batch_size = 2  # a contrastive loss needs at least one negative
    slots: Tensor  # (k, proj_dim) the positional table (slot_encoding)

    def __init__(self, backbone: nn.Module, cfg: All4OneConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or All4OneConfig()
        self.encoder = backbone
        d = cfg.proj_dim
        self.projector = mlp(feature_dim(backbone), cfg.proj_hidden_dim, d, 3, last_bn=True)  # BN on every output, as NNCLR's
        self.predictor = mlp(d, cfg.pred_hidden_dim, d, 2)
        self.predictor2 = mlp(d, cfg.pred_hidden_dim, d, 2)  # the shifted sequence's first slot
        # PyTorch's post-norm layer, ReLU, 8 heads, feed-forward 2d as solo-learn's; no dropout
        # (solo-learn: 0.1): torch's dropout draws from the global RNG, not from (seed, step,
        # sample), so 2 processes would not compute what one computes (docs/recipes.md).
        layer = nn.TransformerEncoderLayer(d, 8, 2 * d, dropout=0.0, batch_first=True)
        self.transformer = nn.TransformerEncoder(layer, cfg.transformer_layers, enable_nested_tensor=False)
        self.register_buffer("slots", slot_encoding(NUM_NEIGHBOURS, d), persistent=False)
        self.momentum_encoder = freeze_(copy.deepcopy(self.encoder))
        self.momentum_projector = freeze_(copy.deepcopy(self.projector))
        self.criterion = All4OneLoss(cfg.temperature, cfg.centroid_temperature, cfg.feature_weight)
        self.bank = MemoryBank(self, "support", cfg.queue_size, d)  # random unit rows, as solo-learn

    @classmethod
    def recipe(cls, image_size: int, family: Family) -> Recipe:
        """LARS, lr 1.0 x B/256 (linear), wd 1e-5: solo-learn's CIFAR All4One config (tuned with
        its LARS form, eta 0.02 and clipping; sslbench keeps eta 0.001 without, see
        docs/recipes.md). No config for larger images or ViTs was read: every size and family gets it."""
        return Recipe(optimizer="lars", lr=1.0, lr_scaling="linear", weight_decay=1e-5)

    def views(self, base: AugmentConfig, image_size: int) -> list[ViewSpec]:
        """BYOL's asymmetric views (solo-learn's ``augmentations/asymmetric.yaml``): blur p 1.0 /
        0.1, solarize p 0.0 / 0.2 (blur only from ``base.blur_min_size`` px on)."""
        return asymmetric(base, image_size, {"blur_p": 1.0, "solarize_p": 0.0}, {"blur_p": 0.1, "solarize_p": 0.2})

    def param_groups(self, groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The transformer's parameters in groups of their own at ``transformer_lr_scale`` x the
        scheduled lr, the groups' other keys kept."""
        mine = {id(p) for p in self.transformer.parameters()}
        out: list[dict[str, Any]] = []
        for g in groups:
            params = list(g["params"])
            rest, tr = [p for p in params if id(p) not in mine], [p for p in params if id(p) in mine]
            out += [{**g, "params": rest}] if rest else []
            out += [{**g, "params": tr, "lr_scale": g.get("lr_scale", 1.0) * self.cfg.transformer_lr_scale}] if tr else []
        return out

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.encoder, self.momentum_encoder), (self.projector, self.momentum_projector)]

    def momentum_at(self, info: StepInfo) -> float:
        return cosine_schedule(info, self.cfg.base_momentum, self.cfg.final_momentum)

    def _centroid(self, seq: Tensor) -> Tensor:
        """(B, k, D) -> (B, D): the transformer's first output token over the encoded sequence."""
        out: Tensor = self.transformer(seq + self.slots)
        return out[:, 0]

    def training_step(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        """``batch.views``: two augmented (B, 3, S, S) batches -> (loss, logs of the three terms).
        Neighbours come from the support set as it was before this step; then view 1's momentum
        projections of every process are pushed."""
        z1, z2 = (self.projector(self.encoder(x)) for x in batch.views)  # (B, D) each
        with torch.no_grad():
            m1, m2 = (F.normalize(self.momentum_projector(self.momentum_encoder(x)).float(), dim=1) for x in batch.views)
        support = self.bank.rows.clone()  # push() below writes in place
        nn1, nn2 = (support[(m @ support.T).topk(NUM_NEIGHBOURS, dim=1).indices] for m in (m1, m2))  # (B, k, D), nearest first
        p1, p2 = self.predictor(z1), self.predictor(z2)
        s1, s2 = (torch.cat([self.predictor2(z).unsqueeze(1), nb[:, :-1]], dim=1) for z, nb in ((z1, nn1), (z2, nn2)))
        c1, c2, t1, t2 = (self._centroid(seq) for seq in (nn1, nn2, s1, s2))
        loss, terms = self.criterion(nn1[:, 0], nn2[:, 0], p1, p2, c1, c2, t1, t2, m1, m2, z1, z2)
        self.bank.push(m1)
        return loss, {"loss": loss.detach(), **terms, EMBEDDING_LOG: F.normalize(z1.detach().float(), dim=1)}
