"""Alignment and uniformity on the hypersphere as an sslbench method plugin: the whole method in one file.

Wang, Isola. "Understanding Contrastive Representation Learning through Alignment and Uniformity on
the Hypersphere." ICML 2020. Two properties of unit embeddings are optimised directly: alignment
(the two views of an image land close together) and uniformity (the embeddings of different
images spread over the sphere, measured by a Gaussian potential). No negatives in a softmax, no
predictor, no momentum encoder. The official code is github.com/SsnL/align_uniform.

This file is the worked example of docs/write-your-own-method.md; tests/test_methods_contract.py
imports it from this path and trains it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sslbench.api import Batch, Family, Method, MethodConfig, Recipe, UserError, encode_views, feature_dim, gather_with_grad, mlp, register_method


class AlignUniformLoss(nn.Module):
    """``align_weight * L_align + uniform_weight * (L_uniform(x) + L_uniform(y)) / 2``: the paper's
    definitions of the two losses (Wang & Isola 2020), as the official STL-10 example combines them.

    - ``L_align = mean_i ||x_i - y_i||^alpha`` over the positive pairs (x_i, y_i);
    - ``L_uniform(x) = log mean_{i != j} exp(-t ||x_i - x_j||^2)`` over all pairs of the batch.

    x and y are L2-normalised here. Uniformity is a property of the whole batch: its pairs come
    from the global batch, gathered with :func:`sslbench.api.gather_with_grad`, so every process
    computes the same uniformity and, with DDP's averaging, the single-process gradient. Computed
    in float32.

    Shapes: ``x``, ``y``: (N, D), row i of both is the same image. Returns a scalar.
    """

    def __init__(self, align_weight: float = 1.0, uniform_weight: float = 1.0, alpha: float = 2.0, t: float = 2.0) -> None:
        super().__init__()
        self.align_weight, self.uniform_weight, self.alpha, self.t = align_weight, uniform_weight, alpha, t

    def uniformity(self, x: Tensor) -> Tensor:
        """(N, D) unit rows -> scalar: the log of the mean Gaussian potential over pairs i != j."""
        x = gather_with_grad(x)
        n = x.shape[0]
        sq_dist = (2 - 2 * x @ x.T).clamp(min=0)  # ||x_i - x_j||^2 of unit vectors
        potential = torch.exp(-self.t * sq_dist).masked_fill(torch.eye(n, dtype=torch.bool, device=x.device), 0)
        return torch.log(potential.sum() / (n * (n - 1)))

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        with torch.autocast(x.device.type, enabled=False):  # distances in float32, even under bf16
            x, y = F.normalize(x.float(), dim=1), F.normalize(y.float(), dim=1)
            align = (x - y).norm(dim=1).pow(self.alpha).mean()
            uniform = (self.uniformity(x) + self.uniformity(y)) / 2
            return self.align_weight * align + self.uniform_weight * uniform


@dataclass
class AlignUniformConfig(MethodConfig):
    """Hyper-parameters (defaults: the official STL-10 example, ``examples/stl10/main.py``)."""

    align_weight: float = 1.0  # weight of the alignment loss
    uniform_weight: float = 1.0  # weight of the uniformity loss
    alpha: float = 2.0  # exponent of the alignment distance
    t: float = 2.0  # scale of the uniformity's Gaussian potential
    proj_hidden_dim: int = 2048  # projector hidden width
    proj_dim: int = 128  # dimension of the unit embeddings (official: 128)

    def validate(self) -> None:
        if self.align_weight < 0 or self.uniform_weight < 0:
            raise UserError("method_cfg.align_weight and uniform_weight must be >= 0")
        if not self.alpha > 0 or not self.t > 0:
            raise UserError(f"method_cfg.alpha and t must be > 0, got {self.alpha}, {self.t}")
        if self.proj_hidden_dim < 1 or self.proj_dim < 1:
            raise UserError("method_cfg.proj_hidden_dim and proj_dim must be >= 1")


@register_method("align_uniform")
class AlignUniform(Method):
    """Two views through a shared backbone and a 2-layer projector; alignment and uniformity of the unit outputs."""

    Config = AlignUniformConfig
    description = "Alignment of positive pairs and uniformity on the hypersphere (Wang & Isola)"
    paper = "Wang and Isola, Understanding Contrastive Representation Learning through Alignment and Uniformity on the Hypersphere, ICML 2020"
    min_batch_size = 2  # uniformity needs at least one pair of different images

    def __init__(self, backbone: nn.Module, cfg: AlignUniformConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or AlignUniformConfig()
        self.encoder = backbone  # h: what downstream evaluation uses
        # Linear-BN-ReLU, then a Linear to the embedding (the official encoder's fc7 and fc8).
        self.projector = mlp(feature_dim(backbone), cfg.proj_hidden_dim, cfg.proj_dim, 2)
        self.criterion = AlignUniformLoss(cfg.align_weight, cfg.uniform_weight, cfg.alpha, cfg.t)

    @classmethod
    def recipe(cls, image_size: int, family: Family) -> Recipe:
        """SGD with linear lr scaling, lr 0.12 x B/256, wd 1e-4, at every image size and for every
        backbone ``family``: the official STL-10 example (64 px, batch 768, an AlexNet variant);
        the paper has no other recipe for this loss alone."""
        return Recipe(optimizer="sgd", lr=0.12, lr_scaling="linear", weight_decay=1e-4)

    def training_step(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        """``batch.views``: two augmented, normalised (B, 3, S, S) batches -> (scalar loss, logs)."""
        h = encode_views(self.encoder, batch.views)  # one backbone pass over both views
        x, y = self.projector(torch.cat(h)).chunk(2)  # one projector pass too
        loss = self.criterion(x, y)
        return loss, {"loss": loss.detach()}
