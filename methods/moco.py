"""MoCo v2: contrastive learning against a queue of keys from a momentum encoder.

He, Fan, Wu, Xie, Girshick. "Momentum Contrast for Unsupervised Visual Representation Learning."
CVPR 2020 (v1: queue, momentum encoder, InfoNCE); Chen, Fan, Girshick, He. "Improved Baselines
with Momentum Contrastive Learning." arXiv:2003.04297, 2020 (v2: MLP head, tau 0.2, blur).

BatchNorm: MoCo trains with per-GPU BatchNorm and "shuffling BN" (Sec. 3.3): keys are computed
on a shuffled split of the batch, so a query and its positive key never share batch statistics
that the model could use to find the positive. sslbench does not shuffle; with more than one
process the trainer turns every BatchNorm into :class:`sslbench.dist.SyncBatchNorm`, whose
statistics are those of the whole global batch, as SimCLR ("global BN") and MoCo v3 do. No
per-process subset then has statistics of its own, and a run computes exactly what one process
computes on the same global batch (shuffle-BN's result depends on how the batch is split over
processes). Global BN does not remove the signal completely (the positive keys share the global
batch's statistics, the queued negatives come from earlier batches), but it is spread over the
whole global batch rather than over one process's few samples.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sslbench.dist import gather_no_grad
from sslbench.errors import UserError
from sslbench.method import encode_views, mlp
from sslbench.momentum import constant_momentum, freeze_
from sslbench.registry import register_method


class InfoNCELoss(nn.Module):
    """MoCo's InfoNCE loss (He et al. 2020, Eq. 1).

    Each query's positive is its own key; its negatives are the K keys of the queue. Logits are
    ``[q . k+, q . queue^T] / tau`` with the positive at index 0, and the loss is the softmax
    cross-entropy with label 0, averaged over queries. ``q`` and ``k`` are L2-normalised here; the
    queue must already hold unit vectors. Computed in float32.

    Shapes: ``q``, ``k``: (N, D), row i of both is the same image; ``queue``: (K, D). Returns a
    scalar.
    """

    def __init__(self, temperature: float = 0.2) -> None:
        super().__init__()
        if not temperature > 0:
            raise UserError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature

    def forward(self, q: Tensor, k: Tensor, queue: Tensor) -> Tensor:
        with torch.autocast(q.device.type, enabled=False):  # similarities in float32, even under bf16
            return self._loss(q, k, queue)

    def _loss(self, q: Tensor, k: Tensor, queue: Tensor) -> Tensor:
        q = F.normalize(q.float(), dim=1)
        k = F.normalize(k.float(), dim=1)
        pos = (q * k).sum(dim=1, keepdim=True)  # (N, 1)
        neg = q @ queue.float().T  # (N, K)
        logits = torch.cat([pos, neg], dim=1) / self.temperature  # (N, 1 + K)
        labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
        return F.cross_entropy(logits, labels)


@dataclass
class MoCoConfig:
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
class MoCo(nn.Module):
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
        self.projector = mlp(backbone.num_features, cfg.proj_hidden_dim, cfg.proj_dim, 2, hidden_bn=False)
        self.key_encoder = freeze_(copy.deepcopy(self.encoder))
        self.key_projector = freeze_(copy.deepcopy(self.projector))
        self.criterion = InfoNCELoss(cfg.temperature)
        # Random unit keys to start with, as in MoCo's code; rows are keys, oldest at queue_ptr.
        self.register_buffer("queue", F.normalize(torch.randn(cfg.queue_size, cfg.proj_dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    @staticmethod
    def recipe(image_size: int) -> dict:
        """Optimizer defaults: SGD with linear lr scaling. ImageNet-size: lr 0.03 x B/256, wd 1e-4
        (MoCo v2, Sec. 2, batch 256; wd from MoCo v1, Sec. 4). Small images: lr 0.3 x B/256,
        wd 1e-4 (solo-learn's CIFAR mocov2plus config, batch 256)."""
        if image_size < 96:
            return {"optimizer": "sgd", "lr": 0.3, "lr_scaling": "linear", "weight_decay": 1e-4}
        return {"optimizer": "sgd", "lr": 0.03, "lr_scaling": "linear", "weight_decay": 1e-4}

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.encoder, self.key_encoder), (self.projector, self.key_projector)]

    def momentum_at(self, step: int, total_steps: int) -> float:
        return constant_momentum(step, total_steps, self.cfg.momentum)

    @torch.no_grad()
    def compute_keys(self, views: Sequence[Tensor]) -> list[Tensor]:
        """L2-normalised keys of each view from the momentum encoder: V x (B, proj_dim)."""
        k = self.key_projector(torch.cat(encode_views(self.key_encoder, views)))
        return list(F.normalize(k.float(), dim=1).chunk(len(views)))

    @torch.no_grad()
    def enqueue(self, keys: Tensor) -> None:
        """Write the keys of every process (gathered in rank order, so all queues stay identical)
        over the oldest entries, wrapping around the end; advance the pointer. (n, D) -> None.
        With more keys than the queue holds, only the newest ``queue_size`` are kept."""
        keys = gather_no_grad(keys)
        size = self.queue.shape[0]
        keys = keys[-size:]
        idx = (self.queue_ptr + torch.arange(keys.shape[0], device=keys.device)) % size
        self.queue.index_copy_(0, idx, keys.to(self.queue.dtype))
        self.queue_ptr.copy_((self.queue_ptr + keys.shape[0]) % size)

    def training_step(self, views: Sequence[Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """Queries from the first view (both when symmetric), keys from the other; the keys are
        enqueued after the loss is computed, so a batch never contrasts with its own keys."""
        x1, x2 = views[0], views[1]
        queue = self.queue.clone()  # enqueue() below writes in place; autograd keeps this copy
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
        self.enqueue(new_keys)
        return loss, {"loss": loss.detach()}
