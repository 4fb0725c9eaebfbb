"""ReSSL: the relation of a strongly augmented view to a queue predicts that of a weak view.

Zheng, You, Wang, Qian, Zhang, Wang, Xu. "ReSSL: Relational Self-Supervised Learning with Weak
Augmentation." NeurIPS 2021. Each image's similarities to a queue of past embeddings, sharpened by
a low temperature, form the teacher's relation for a weakly augmented view (momentum encoder); the
student's relation for a strongly augmented view (online encoder) is trained towards it with a
cross-entropy. Details follow solo-learn's implementation (``solo/methods/ressl.py`` and
``solo/losses/ressl.py`` at commit ``9187ea3``), as the official code (KyleZheng1997/ReSSL): a
2-layer projector without BatchNorm, L2-normalised embeddings, the teacher's keys pushed into the
queue after the loss. The queue is gathered from every process and the key encoder is updated by
the trainer's momentum hooks; where the official code shuffles the key batch over GPUs
(shuffle-BN), sslbench synchronises BatchNorm, as for MoCo (``methods/moco.py``).
"""

from __future__ import annotations

import copy
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
    Recipe,
    StepInfo,
    UserError,
    ViewSpec,
    cosine_schedule,
    feature_dim,
    freeze_,
    mlp,
    register_method,
)

__all__ = ["ReSSL", "ReSSLConfig", "ReSSLLoss", "weak_augmentation"]


@dataclass
class ReSSLConfig(MethodConfig):
    """ReSSL hyper-parameters (solo-learn's CIFAR config; the official ImageNet values in comments)."""

    temperature_q: float = 0.1  # student temperature tau_s (solo-learn and official: 0.1)
    temperature_k: float = 0.04  # teacher temperature tau_t, sharper (solo-learn and official --t: 0.04)
    queue_size: int = 65536  # K, embeddings in the queue (solo-learn's default; official ImageNet: 131072)
    base_momentum: float = 0.99  # key-encoder EMA rate at step 0 (solo-learn: 0.99; official: 0.999, constant)
    final_momentum: float = 1.0  # EMA rate at the last step, reached on a cosine schedule (solo-learn: 1.0)
    proj_hidden_dim: int = 4096  # projector hidden width (solo-learn and official: 4096)
    proj_dim: int = 256  # embedding dimension (solo-learn: 256; official: 512)

    def validate(self) -> None:
        if not self.temperature_q > 0 or not self.temperature_k > 0:
            raise UserError(f"method_cfg.temperature_q and temperature_k must be > 0, got {self.temperature_q}, {self.temperature_k}")
        if self.queue_size < 1 or self.proj_hidden_dim < 1 or self.proj_dim < 1:
            raise UserError("method_cfg.queue_size, proj_hidden_dim and proj_dim must be >= 1")
        if not 0.0 <= self.base_momentum <= self.final_momentum <= 1.0:
            raise UserError(f"method_cfg needs 0 <= base_momentum <= final_momentum <= 1, got {self.base_momentum}, {self.final_momentum}")


def weak_augmentation(base: AugmentConfig) -> AugmentConfig:
    """The teacher's view: ``base``'s random resized crop and flip only, no colour jitter,
    grayscale, blur or solarization (solo-learn's ``augmentations/ressl.yaml``, second pipeline;
    the official ``target_aug``)."""
    return replace(base, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, solarize_p=0.0)


class ReSSLLoss(nn.Module):
    """``-mean_i sum_k p_ik log q_ik`` (ReSSL, Eq. 4), the teacher's relation
    ``p_i = softmax(k_i . Q / tau_t)`` (no gradient) and the student's ``q_i = softmax(q_i . Q / tau_s)``
    over the K queue entries Q.

    Shapes: ``q``, ``k`` (B, D) unit rows, row i of both the same image; ``queue`` (K, D) unit
    rows. Returns a scalar: the mean over this process's images (DDP averages). Computed in float32.
    """

    def __init__(self, temperature_q: float = 0.1, temperature_k: float = 0.04) -> None:
        super().__init__()
        self.temperature_q, self.temperature_k = temperature_q, temperature_k

    def forward(self, q: Tensor, k: Tensor, queue: Tensor) -> Tensor:
        with torch.autocast(q.device.type, enabled=False):
            queue = queue.float()
            target = F.softmax(k.detach().float() @ queue.T / self.temperature_k, dim=1)
            log_student = F.log_softmax(q.float() @ queue.T / self.temperature_q, dim=1)
            return -(target * log_student).sum(dim=1).mean()


@register_method("ressl")
class ReSSL(Method):
    """Online backbone and projector (strong view); momentum copies of both (weak view); a queue."""

    Config = ReSSLConfig
    description = "Relational: a strong view's similarities to a queue match a weak view's, from a momentum encoder (ReSSL)"
    paper = "Zheng et al., ReSSL: Relational Self-Supervised Learning with Weak Augmentation, NeurIPS 2021"
    min_batch_size = 2  # the backbone's BatchNorm needs more than one sample

    def __init__(self, backbone: nn.Module, cfg: ReSSLConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or ReSSLConfig()
        self.encoder = backbone
        # Linear-ReLU-Linear, no BatchNorm (solo-learn's projector; the official ProjectionHead).
        self.projector = mlp(feature_dim(backbone), cfg.proj_hidden_dim, cfg.proj_dim, 2, hidden_bn=False)
        self.momentum_encoder = freeze_(copy.deepcopy(self.encoder))
        self.momentum_projector = freeze_(copy.deepcopy(self.projector))
        self.criterion = ReSSLLoss(cfg.temperature_q, cfg.temperature_k)
        self.bank = MemoryBank(self, "queue", cfg.queue_size, cfg.proj_dim)  # random unit rows to start, as both codes

    @classmethod
    def recipe(cls, image_size: int, family: Family) -> Recipe:
        """SGD with linear lr scaling and wd 1e-4. Small images: lr 0.05 x B/256 (solo-learn's CIFAR
        ``ressl`` config). ImageNet-size: the official code's (``ressl.py``: lr 0.05 at batch 256;
        ``network/ressl.py``: K 131072, 512-d embeddings, momentum 0.999; ``data/augmentation.py``:
        crops of 0.2-1, MoCo v2's colour jitter). No reference trains ReSSL on a ViT."""
        if image_size < 96:
            return Recipe(optimizer="sgd", lr=0.05, lr_scaling="linear", weight_decay=1e-4)
        method = {"queue_size": 131072, "proj_dim": 512, "base_momentum": 0.999, "final_momentum": 0.999}
        aug = {"crop_scale": (0.2, 1.0), "jitter_strength": 0.5}
        return Recipe(optimizer="sgd", lr=0.05, lr_scaling="linear", weight_decay=1e-4, aug=aug, method=method)

    def views(self, base: AugmentConfig, image_size: int) -> list[ViewSpec]:
        """The student's strong view (``base``) and the teacher's weak one (:func:`weak_augmentation`)."""
        return [ViewSpec(base, image_size), ViewSpec(weak_augmentation(base), image_size)]

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.encoder, self.momentum_encoder), (self.projector, self.momentum_projector)]

    def momentum_at(self, info: StepInfo) -> float:
        return cosine_schedule(info, self.cfg.base_momentum, self.cfg.final_momentum)

    def training_step(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        """``batch.views``: the strong and the weak (B, 3, S, S) batch -> (scalar loss, logs). The
        teacher's keys enter the queue after the loss, so a batch is never related to itself."""
        q = F.normalize(self.projector(self.encoder(batch.views[0])).float(), dim=1)
        with torch.no_grad():
            k = F.normalize(self.momentum_projector(self.momentum_encoder(batch.views[1])).float(), dim=1)
        queue = self.bank.rows.clone()  # push() below writes in place; autograd keeps this copy
        loss = self.criterion(q, k, queue)
        self.bank.push(k)  # gathered from every process, so all queues stay identical
        return loss, {"loss": loss.detach(), EMBEDDING_LOG: q.detach()}
