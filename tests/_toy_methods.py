"""Toy methods that use the parts of the contract the built-in methods do not: views of two sizes,
the step's progress, and a per-sample random mask. Each is a real method (it trains, its loss has a
gradient); the contract tests run them next to the registered ones. They are registered only where
a test asks (:func:`register`, or the entry point of ``_toy_plugin``), never globally at import.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sslbench.core.augment import AugmentConfig
from sslbench.core.heads import encode_views, mlp
from sslbench.core.losses import negative_cosine
from sslbench.core.method import Batch, Method, MethodConfig, ViewSpec


@dataclass
class ToyConfig(MethodConfig):
    dim: int = 16  # projector output
    local_views: int = 2  # ToyMultiCrop: local views of half the size
    patch: int = 4  # ToyMask: side of a masked square, px
    mask_ratio: float = 0.5  # ToyMask: share of the squares zeroed per sample


class _Toy(Method):
    Config = ToyConfig
    paper = "none (a test of the method contract)"

    def __init__(self, backbone: nn.Module, cfg: ToyConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or ToyConfig()
        self.encoder = backbone
        self.head = mlp(backbone.num_features, 32, cfg.dim, 2)
        self.seen: list[tuple[int, ...]] = []  # what the last steps saw (the tests read it)


class ToyMultiCrop(_Toy):
    """2 global views at the image size and ``local_views`` at half of it; every view's
    projection predicts the first global view's (stop-gradient)."""

    description = "toy: two global and several local views of half the size"

    def views(self, base: AugmentConfig, image_size: int) -> list[ViewSpec]:
        local = replace(base, crop_scale=(0.1, 0.4))
        return [ViewSpec(base, image_size)] * 2 + [ViewSpec(local, image_size // 2)] * self.cfg.local_views

    def training_step(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        self.seen = [tuple(v.shape) for v in batch.views]
        z = [self.head(h) for h in encode_views(self.encoder, batch.views)]
        loss = sum(negative_cosine(zi, z[0]) for zi in z[1:]) / (len(z) - 1)
        assert isinstance(loss, Tensor)
        return loss, {"loss": loss.detach()}


class ToyProgress(_Toy):
    """A loss weight that follows the step's progress: (1 + progress) x negative cosine."""

    description = "toy: a loss weight scheduled by the step's progress"

    def training_step(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        self.seen.append((batch.info.step, batch.info.total_steps, int(batch.info.progress * 1e6)))
        z0, z1 = (self.head(h) for h in encode_views(self.encoder, batch.views))
        loss = (1.0 + batch.info.progress) * negative_cosine(z0, z1)
        return loss, {"loss": loss.detach(), "progress": torch.tensor(batch.info.progress)}


class ToyMask(_Toy):
    """Zeroes a per-sample random share of ``patch`` x ``patch`` squares of the first view (the
    mask a pure function of (seed, epoch, sample)) and predicts the second view's projection."""

    description = "toy: a per-sample random mask from the counter-based generator"

    def mask(self, batch: Batch) -> Tensor:
        """(B, 1, S, S) of 0/1: a random round(n * ratio) of the n squares of each sample are 0."""
        b, _, s, _ = batch.views[0].shape
        n = (s // self.cfg.patch) ** 2
        order = batch.uniform(0, n).argsort(dim=1)  # a random permutation per sample
        keep = torch.ones(b, n, device=order.device)
        keep.scatter_(1, order[:, : round(n * self.cfg.mask_ratio)], 0.0)
        side = s // self.cfg.patch
        return F.interpolate(keep.view(b, 1, side, side), scale_factor=self.cfg.patch, mode="nearest")

    def training_step(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        m = self.mask(batch)
        self.seen = [tuple(batch.index.tolist()), tuple(int(x) for x in m.flatten(1).sum(1).tolist())]
        x0 = batch.views[0] * m.to(batch.views[0].dtype)
        z0, z1 = (self.head(h) for h in encode_views(self.encoder, [x0, batch.views[1]]))
        loss = negative_cosine(z0, z1)
        return loss, {"loss": loss.detach(), "masked": (1 - m).mean().detach()}


TOYS: dict[str, type[Method]] = {"toy_multicrop": ToyMultiCrop, "toy_progress": ToyProgress, "toy_mask": ToyMask}


def register() -> None:
    """Add the toys to the method registry (idempotent)."""
    from sslbench.core.registry import register_method

    for name, cls in TOYS.items():
        register_method(name)(cls)


def unregister() -> None:
    from sslbench.core.registry import METHODS

    for name in TOYS:
        METHODS._items.pop(name, None)
