"""Method classes for tests/test_testing_kit.py: a small plugin method that is not in sslbench's
registry (:class:`KitMethod`), and broken variants of it, each with one mistake the checks of
:mod:`sslbench.testing` must catch. They live in a module of their own so that the processes the
checks start can import them (``_kit_methods:KitMethod``, tests/ on the path)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from sslbench.core.dist import all_reduce_mean
from sslbench.core.heads import encode_views, feature_dim, mlp
from sslbench.core.losses import negative_cosine
from sslbench.core.method import EMBEDDING_LOG, Batch, Method, MethodConfig


@dataclass
class KitConfig(MethodConfig):
    dim: int = 16  # projector output
    center_momentum: float = 0.9  # EMA rate of the centre


class KitMethod(Method):
    """Two views through the backbone and a projector; each view's centred projection predicts the
    other's (stop-gradient). The centre is an EMA of the batch mean over every process (the kind of
    buffer DINO keeps): a registered buffer, updated the same way on every process."""

    Config = KitConfig
    description = "test plugin: centred projections of two views predict each other"
    paper = "none (a test of sslbench.testing)"

    def __init__(self, backbone: nn.Module, cfg: KitConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or KitConfig()
        self.encoder = backbone
        self.projector = mlp(feature_dim(backbone), 32, cfg.dim, 2)
        self.register_buffer("center", torch.zeros(cfg.dim))

    def batch_mean(self, z: Tensor) -> Tensor:
        """The mean of the global batch's rows: every process's mean, averaged over processes."""
        return all_reduce_mean(z.mean(dim=0))

    def project(self, z: Tensor) -> Tensor:
        """The projector's output as the loss sees it."""
        return z

    def training_step(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        z0, z1 = (self.project(self.projector(h)) for h in encode_views(self.encoder, batch.views))
        c = self.center.clone()
        loss = (negative_cosine(z0 - c, z1 - c) + negative_cosine(z1 - c, z0 - c)) / 2
        with torch.no_grad():
            m = self.cfg.center_momentum
            self.center.mul_(m).add_(self.batch_mean(torch.cat([z0, z1]).detach()), alpha=1 - m)
        return loss, {"loss": loss.detach(), EMBEDDING_LOG: z0.detach()}


class LocalCenter(KitMethod):
    """Broken: the centre follows each process's own half of the batch, so it diverges between
    processes (DDP does not synchronise buffers)."""

    def batch_mean(self, z: Tensor) -> Tensor:
        return z.mean(dim=0)


class NaNLoss(KitMethod):
    """Broken: the loss is NaN."""

    def training_step(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        loss, logs = super().training_step(batch)
        return loss * float("nan"), logs


class _Flip(torch.autograd.Function):
    """The identity whose backward has the wrong sign (a hand-written collective gone wrong)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return -grad


class FlippedGradient(KitMethod):
    """Broken: the projections pass a custom autograd function whose backward negates the
    gradient, so the optimizer climbs the loss."""

    def project(self, z: Tensor) -> Tensor:
        return _Flip.apply(z)


class PythonCounter(KitMethod):
    """Broken: a loss weight that grows with a step counter kept in a Python attribute, which
    checkpoints do not hold: a resumed run starts counting again."""

    def __init__(self, backbone: nn.Module, cfg: KitConfig | None = None) -> None:
        super().__init__(backbone, cfg)
        self.calls = 0

    def training_step(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        self.calls += 1
        loss, logs = super().training_step(batch)
        loss = loss * (1 + 0.1 * self.calls)
        return loss, {**logs, "loss": loss.detach()}
