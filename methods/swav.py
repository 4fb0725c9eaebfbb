"""SwAV: online clustering with swapped assignments between multi-crop views.

Caron, Misra, Mairal, Goyal, Bojanowski, Joulin. "Unsupervised Learning of Visual Features by
Contrasting Cluster Assignments." NeurIPS 2020. Each view's unit projection z is scored against K
unit prototypes; the codes of the two global crops come from Sinkhorn-Knopp over the global batch
(equal use of every prototype), and every other view predicts them (the swapped prediction). For
small batches a queue of past projections joins the Sinkhorn from a given epoch on. Details follow
the official code (facebookresearch/swav, ``main_swav.py``): prototypes normalised before every
forward pass, their gradients dropped for the first iterations, the queue used once it is full.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

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
    Prototypes,
    Recipe,
    StepInfo,
    SwAVLoss,
    UserError,
    ViewSpec,
    check_local_crops,
    encode_views,
    feature_dim,
    fit_to_patches,
    get_rank,
    get_world_size,
    mlp,
    register_method,
)

__all__ = ["SwAV", "SwAVConfig"]


@dataclass
class SwAVConfig(MethodConfig):
    """SwAV hyper-parameters (defaults: solo-learn's CIFAR multi-crop config; ImageNet in the comments)."""

    num_prototypes: int = 3000  # K (paper: 3000)
    temperature: float = 0.1  # softmax temperature of the predictions (paper: 0.1)
    epsilon: float = 0.05  # Sinkhorn-Knopp entropy regulariser (paper: 0.05)
    sinkhorn_iterations: int = 3  # Sinkhorn-Knopp iterations (paper: 3)
    proj_hidden_dim: int = 2048  # projection head hidden width (paper: 2048)
    proj_dim: int = 128  # projection (and prototype) dimension (paper: 128)
    num_local_crops: int = 6  # low-resolution crops besides the 2 global ones (paper: 6)
    local_crop_size: int = 0  # side of the local crops in px; 0: 9/16 of the image size (18 at 32 px; paper: 96 at 224)
    local_crop_scale: tuple[float, float] = (0.08, 0.5)  # area range of the local crops (paper: 0.05, 0.14)
    queue_size: int = 3840  # projections in the queue; 0: no queue (paper: 3840 at batch 256)
    epoch_queue_starts: int = 50  # epoch from which the queue fills; used once full (paper: 15 at batch 256)
    freeze_prototypes_epochs: float = 2.0  # prototypes get no update for this many epochs (paper: 1, i.e. 313 iterations at batch 4096)

    def validate(self) -> None:
        if min(self.num_prototypes, self.proj_hidden_dim, self.proj_dim, self.sinkhorn_iterations) < 1:
            raise UserError("method_cfg.num_prototypes, proj_hidden_dim, proj_dim and sinkhorn_iterations must be >= 1")
        if not self.temperature > 0:
            raise UserError(f"method_cfg.temperature must be > 0, got {self.temperature}")
        if not 0.02 <= self.epsilon:
            raise UserError(f"method_cfg.epsilon must be >= 0.02 (exp(1/epsilon) must stay finite in float32), got {self.epsilon}")
        if self.num_local_crops < 0 or self.local_crop_size < 0 or self.queue_size < 0 or self.epoch_queue_starts < 0:
            raise UserError("method_cfg.num_local_crops, local_crop_size, queue_size and epoch_queue_starts must be >= 0")
        lo, hi = self.local_crop_scale
        if not 0 < lo <= hi <= 1:
            raise UserError(f"method_cfg.local_crop_scale must satisfy 0 < min <= max <= 1, got {self.local_crop_scale}")
        if self.freeze_prototypes_epochs < 0:
            raise UserError(f"method_cfg.freeze_prototypes_epochs must be >= 0, got {self.freeze_prototypes_epochs}")


@register_method("swav")
class SwAV(Method):
    """Backbone, 2-layer projection head and K prototypes; swapped prediction of Sinkhorn codes."""

    Config = SwAVConfig
    description = "Clustering: swapped prediction of Sinkhorn-Knopp codes over multi-crop views (SwAV)"
    paper = "Caron et al., Unsupervised Learning of Visual Features by Contrasting Cluster Assignments, NeurIPS 2020"
    min_batch_size = 2  # batch statistics (BatchNorm) need more than one sample

    def __init__(self, backbone: nn.Module, cfg: SwAVConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or SwAVConfig()
        self.encoder = backbone
        self.projector = mlp(feature_dim(backbone), cfg.proj_hidden_dim, cfg.proj_dim, 2)
        self.prototypes = Prototypes(cfg.proj_dim, cfg.num_prototypes)
        self.criterion = SwAVLoss(cfg.temperature, cfg.epsilon, cfg.sinkhorn_iterations, num_assign=2)
        # Both global crops' projections side by side, (queue_size, 2 * proj_dim): buffers `queue`, `queue_ptr`.
        self.bank = MemoryBank(self, "queue", cfg.queue_size, 2 * cfg.proj_dim, init="zeros") if cfg.queue_size else None

    @classmethod
    def recipe(cls, image_size: int, family: Family) -> Recipe:
        """LARS with linear lr scaling, wd 1e-6. ImageNet-size: lr 0.3 x B/256 (the official
        4096-batch scripts: 4.8), global crops of area (0.14, 1). Small images: lr 0.6 x B/256
        (solo-learn's CIFAR config, as the official batch-256 script's 0.6), global crops of area
        (0.2, 1) (solo-learn's CIFAR multi-crop config). LARS eta 0.001 without clipping (the
        official LARC). No reference trains SwAV on a ViT, so ViTs get the same recipe
        (docs/recipes.md)."""
        if image_size < 96:
            return Recipe(optimizer="lars", lr=0.6, lr_scaling="linear", weight_decay=1e-6, aug={"crop_scale": (0.2, 1.0)})
        return Recipe(optimizer="lars", lr=0.3, lr_scaling="linear", weight_decay=1e-6, aug={"crop_scale": (0.14, 1.0)})

    def views(self, base: AugmentConfig, image_size: int) -> list[ViewSpec]:
        """2 global crops of ``base`` at ``image_size``, then ``num_local_crops`` crops of area
        ``local_crop_scale`` at ``local_crop_size`` (multi-crop, Caron et al. 2020, Sec. 3.2); on a
        ViT the default size is rounded to a multiple of the patch (16 px at 32 px with 4 px patches)."""
        given = self.cfg.local_crop_size > 0
        size = fit_to_patches(self.cfg.local_crop_size or max(1, round(image_size * 9 / 16)), self.encoder, given, "method_cfg.local_crop_size")
        check_local_crops(size, image_size, self.cfg.num_local_crops, "method_cfg.local_crop_size", "method_cfg.num_local_crops")
        local = replace(base, crop_scale=self.cfg.local_crop_scale)
        return [ViewSpec(base, image_size)] * 2 + [ViewSpec(local, size)] * self.cfg.num_local_crops

    def after_backward(self, info: StepInfo) -> None:
        """No prototype update in the first ``freeze_prototypes_epochs`` (gradients set to None,
        as the official code does: neither momentum nor weight decay moves them)."""
        if info.epoch_float < self.cfg.freeze_prototypes_epochs:
            self.prototypes.weight.grad = None

    def _queue_scores(self, info: StepInfo, z_global: Tensor) -> list[Tensor] | None:
        """This process's share of the queue scored by the prototypes (2 x (m, K)) once the queue
        has filled, then push the global crops' projections (n, 2 * proj_dim). The queue fills from
        epoch ``epoch_queue_starts`` on and is used once every row holds a projection: a pure
        function of the step, so resumed and multi-process runs use it at the same steps."""
        if self.bank is None:
            return None
        start = self.cfg.epoch_queue_starts * info.steps_per_epoch
        if info.step < start:
            return None
        out = None
        if info.step - start >= math.ceil(self.cfg.queue_size / (z_global.shape[0] * get_world_size())):
            rows = self.bank.rows.tensor_split(get_world_size())[get_rank()]  # the global queue, once over processes
            with torch.no_grad():
                out = [self.prototypes(part) for part in rows.chunk(2, dim=1)]
        self.bank.push(z_global.detach())  # gathered from every process: every queue stays identical
        return out

    def training_step(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        """``batch.views``: 2 global (B, 3, S, S) and the local (B, 3, s, s) crops -> (loss, logs)."""
        self.prototypes.normalize_()  # the official code's first act in every iteration
        h = encode_views(self.encoder, batch.views)  # one backbone pass per crop size
        z = F.normalize(self.projector(torch.cat(h)), dim=1)  # (V * B, proj_dim), one head pass
        scores = list(self.prototypes(z).chunk(len(batch.views)))  # V x (B, K)
        z1, z2 = z.chunk(len(batch.views))[:2]
        queue_scores = self._queue_scores(batch.info, torch.cat([z1, z2], dim=1))
        loss = self.criterion(scores, queue_scores)
        return loss, {"loss": loss.detach(), EMBEDDING_LOG: z1.detach()}
