"""MoCo v2: contrastive learning against a queue of keys from a momentum encoder.

He, Fan, Wu, Xie, Girshick. "Momentum Contrast for Unsupervised Visual Representation Learning."
CVPR 2020 (v1: queue, momentum encoder, InfoNCE); Chen, Fan, Girshick, He. "Improved Baselines
with Momentum Contrastive Learning." arXiv:2003.04297, 2020 (v2: MLP head, tau 0.2, blur).

BatchNorm: MoCo trains with per-GPU BatchNorm and "shuffling BN" (Sec. 3.3): keys are computed
on a shuffled split of the batch, so a query and its positive key never share batch statistics
that the model could use to find the positive. sslbench does not shuffle; with more than one
process the trainer turns every BatchNorm into :class:`sslbench.core.dist.SyncBatchNorm`, whose
statistics are those of the whole global batch, as SimCLR ("global BN") and MoCo v3 do. No
per-process subset then has statistics of its own, and a run computes exactly what one process
computes on the same global batch (shuffle-BN's result depends on how the batch is split over
processes). Global BN does not remove the signal completely (the positive keys share the global
batch's statistics, the queued negatives come from earlier batches), but it is spread over the
whole global batch rather than over one process's few samples.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sslbench.api import (
    EMBEDDING_LOG,
    Batch,
    Family,
    InfoNCELoss,
    MemoryBank,
    Method,
    MethodConfig,
    Recipe,
    StepInfo,
    UserError,
    encode_views,
    feature_dim,
    freeze_,
    mlp,
    register_method,
)

__all__ = ["InfoNCELoss", "MoCo", "MoCoConfig"]


@dataclass
class MoCoConfig(MethodConfig):
    """MoCo v2 hyper-parameters (defaults for small data; ImageNet values in the comments)."""

    temperature: float = 0.2  # InfoNCE tau (0.2 in MoCo v2, Sec. 2)
    queue_size: int = 4096  # K, keys in the queue (65536 for ImageNet)
    momentum: float = 0.99  # key encoder EMA rate m, constant (0.999 for ImageNet)
    proj_hidden_dim: int = 2048  # MLP head hidden width (MoCo v2: 2048)
    proj_dim: int = 128  # output dimension of q and k (MoCo v2: 128)
    symmetric: bool = False  # both views serve as queries, losses averaged (2 keys per image enqueued)

    def validate(self) -> None:
        if not self.temperature > 0:
            raise UserError(f"method_cfg.temperature must be > 0, got {self.temperature}")
        if self.queue_size < 1:
            raise UserError(f"method_cfg.queue_size must be >= 1, got {self.queue_size}")
        if not 0.0 <= self.momentum <= 1.0:
            raise UserError(f"method_cfg.momentum must be in [0, 1], got {self.momentum}")
        if self.proj_hidden_dim < 1 or self.proj_dim < 1:
            raise UserError("method_cfg.proj_hidden_dim and proj_dim must be >= 1")


@register_method("moco")
class MoCo(Method):
    """Query encoder f_q (backbone + MLP head) and momentum key encoder f_k; InfoNCE of each query
    against its key and a FIFO queue of past keys."""

    Config = MoCoConfig
    description = "Contrastive: InfoNCE against a queue of momentum-encoder keys (MoCo v2)"
    paper = "He et al., Momentum Contrast for Unsupervised Visual Representation Learning, CVPR 2020; Chen et al., Improved Baselines with Momentum Contrastive Learning, 2020"
    min_batch_size = 2  # contrastive methods need 2 (BatchNorm statistics need more than one sample)

    def __init__(self, backbone: nn.Module, cfg: MoCoConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or MoCoConfig()
        self.encoder = backbone
        # MoCo v2's head: fc-ReLU-fc, no BatchNorm (Chen et al. 2020, Sec. 2).
        self.projector = mlp(feature_dim(backbone), cfg.proj_hidden_dim, cfg.proj_dim, 2, hidden_bn=False)
        self.key_encoder = freeze_(copy.deepcopy(self.encoder))
        self.key_projector = freeze_(copy.deepcopy(self.projector))
        self.criterion = InfoNCELoss(cfg.temperature)
        # Random unit keys to start with, as in MoCo's code; buffers `queue` and `queue_ptr`.
        self.bank = MemoryBank(self, "queue", cfg.queue_size, cfg.proj_dim)

    @classmethod
    def recipe(cls, image_size: int, family: Family) -> Recipe:
        """SGD with linear lr scaling. ImageNet-size: lr 0.03 x B/256, wd 1e-4
        (MoCo v2, Sec. 2, batch 256; wd from MoCo v1, Sec. 4). Small images: lr 0.3 x B/256,
        wd 1e-4 (solo-learn's CIFAR mocov2plus config, batch 256). No reference trains MoCo v2 on a
        ViT, so ViTs get the same recipe (docs/recipes.md)."""
        if image_size < 96:
            return Recipe(optimizer="sgd", lr=0.3, lr_scaling="linear", weight_decay=1e-4)
        return Recipe(optimizer="sgd", lr=0.03, lr_scaling="linear", weight_decay=1e-4)

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.encoder, self.key_encoder), (self.projector, self.key_projector)]

    def momentum_at(self, info: StepInfo) -> float:
        return self.cfg.momentum  # constant (MoCo v1/v2)

    @torch.no_grad()
    def compute_keys(self, views: Sequence[Tensor]) -> list[Tensor]:
        """L2-normalised keys of each view from the momentum encoder: V x (B, proj_dim)."""
        k = self.key_projector(torch.cat(encode_views(self.key_encoder, views)))
        return list(F.normalize(k.float(), dim=1).chunk(len(views)))

    def training_step(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        """Queries from the first view (both when symmetric), keys from the other; the keys are
        enqueued after the loss is computed, so a batch never contrasts with its own keys."""
        x1, x2 = batch.views[0], batch.views[1]
        queue = self.bank.rows.clone()  # push() below writes in place; autograd keeps this copy
        if self.cfg.symmetric:
            k1, k2 = self.compute_keys([x1, x2])
            q1, q2 = (self.projector(h) for h in encode_views(self.encoder, [x1, x2]))
            loss = (self.criterion(q1, k2, queue) + self.criterion(q2, k1, queue)) / 2
            new_keys = torch.cat([k1, k2])
        else:
            (k2,) = self.compute_keys([x2])
            q1 = self.projector(self.encoder(x1))
            loss = self.criterion(q1, k2, queue)
            new_keys = k2
        self.bank.push(new_keys)  # gathered from every process, so all queues stay identical
        return loss, {"loss": loss.detach(), EMBEDDING_LOG: q1.detach()}
