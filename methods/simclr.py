"""SimCLR: contrastive learning with the NT-Xent loss.

Chen, Kornblith, Norouzi, Hinton. "A Simple Framework for Contrastive Learning of Visual
Representations." ICML 2020 (v1); Chen et al. "Big Self-Supervised Models are Strong
Semi-Supervised Learners." NeurIPS 2020 (v2: the 3-layer projector).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sslbench.dist import gather_with_grad, get_rank
from sslbench.errors import UserError
from sslbench.method import encode_views, mlp
from sslbench.registry import register_method


class NTXentLoss(nn.Module):
    """The normalised temperature-scaled cross-entropy loss (SimCLR, Eq. 1).

    For N images there are 2N views. Each view is an anchor whose positive is its twin; the other
    2(N-1) views are its negatives; self-similarity is excluded. Logits are cosine similarities
    divided by the temperature tau; the loss is the softmax cross-entropy averaged over all 2N
    anchors. Computed in float32 through ``log_softmax`` (no exp overflow at tau = 0.01).

    In a multi-process run each process holds N_local images: negatives come from every process
    through :func:`sslbench.dist.gather_with_grad`, the local anchors' positives sit at labels
    offset by rank, and the loss is the mean over local anchors (DDP's gradient averaging then
    gives exactly the single-process gradient of the global mean).

    Shapes: ``z0``, ``z1``: (N, D), row i of both is the same image. Returns a scalar.
    """

    def __init__(self, temperature: float = 0.5) -> None:
        super().__init__()
        if not temperature > 0:
            raise UserError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature

    def forward(self, z0: Tensor, z1: Tensor) -> Tensor:
        with torch.autocast(z0.device.type, enabled=False):  # similarities in float32, even under bf16
            return self._loss(z0.float(), z1.float())

    def _loss(self, z0: Tensor, z1: Tensor) -> Tensor:
        n = z0.shape[0]
        local = F.normalize(torch.cat([z0, z1]), dim=1)  # (2n, D) anchors
        z0_all = gather_with_grad(local[:n])  # (N, D) across processes
        z1_all = gather_with_grad(local[n:])
        big_n = z0_all.shape[0]
        cands = torch.cat([z0_all, z1_all])  # (2N, D)
        logits = local @ cands.T / self.temperature  # (2n, 2N)
        offset = get_rank() * n
        i = torch.arange(n, device=logits.device)
        own = torch.cat([i, i + big_n]) + offset  # column of each anchor itself
        twin = torch.cat([i + big_n, i]) + offset  # column of its positive
        rows = torch.arange(2 * n, device=logits.device)
        logits = logits.index_put((rows, own), torch.full((), float("-inf"), device=logits.device))
        return F.cross_entropy(logits, twin)


@dataclass
class SimCLRConfig:
    """SimCLR hyper-parameters (defaults: the paper's CIFAR setting, Appendix B.9)."""

    temperature: float = 0.5  # NT-Xent tau (0.5 for CIFAR; 0.1 for ImageNet at batch 4096)
    projector: str = "v1"  # v1: 2-layer MLP head; v2: 3-layer MLP head (SimCLR v2)
    proj_hidden_dim: int = 2048  # projector hidden width
    proj_dim: int = 128  # output dimension of z

    def validate(self) -> None:
        if not self.temperature > 0:
            raise UserError(f"method_cfg.temperature must be > 0, got {self.temperature}")
        if self.projector not in ("v1", "v2"):
            raise UserError(f"method_cfg.projector must be one of v1, v2; got {self.projector!r}")
        if self.proj_hidden_dim < 1 or self.proj_dim < 1:
            raise UserError("method_cfg.proj_hidden_dim and proj_dim must be >= 1")


@register_method("simclr")
class SimCLR(nn.Module):
    """Two augmented views through a shared encoder f and projector g; NT-Xent on z = g(f(x))."""

    Config = SimCLRConfig
    description = "Contrastive: NT-Xent over 2N views, in-batch negatives (gathered across processes)"
    paper = "Chen et al., A Simple Framework for Contrastive Learning of Visual Representations, ICML 2020"
    min_batch_size = 2  # a contrastive loss needs at least one negative

    def __init__(self, backbone: nn.Module, cfg: SimCLRConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or SimCLRConfig()
        self.encoder = backbone
        layers = 2 if cfg.projector == "v1" else 3
        self.projector = mlp(backbone.num_features, cfg.proj_hidden_dim, cfg.proj_dim, layers)
        self.criterion = NTXentLoss(cfg.temperature)

    @staticmethod
    def recipe(image_size: int) -> dict:
        """Optimizer defaults: LARS with linear lr scaling (SimCLR Sec. 4 / Appendix B.9):
        lr 0.3 x B/256, wd 1e-6 for ImageNet-size images; lr 1.0 x B/256 with wd 1e-6 is the
        paper's CIFAR choice at batch 1024, and short CPU runs at batch 256 train better with
        wd 1e-5 (solo-learn's CIFAR config), so small images use lr 1.0 x B/256, wd 1e-5."""
        if image_size < 96:
            return {"optimizer": "lars", "lr": 1.0, "lr_scaling": "linear", "weight_decay": 1e-5}
        return {"optimizer": "lars", "lr": 0.3, "lr_scaling": "linear", "weight_decay": 1e-6}

    def embed(self, views: Sequence[Tensor]) -> Tensor:
        """(B, 3, S, S) x 2 -> (B, 2, proj_dim): both views' projections, per sample."""
        z = self.projector(torch.cat(encode_views(self.encoder, views)))
        return torch.stack(z.chunk(2), dim=1)

    def loss_from_embeddings(self, emb: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        loss = self.criterion(emb[:, 0], emb[:, 1])
        return loss, {"loss": loss.detach()}

    def training_step(self, views: Sequence[Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        return self.loss_from_embeddings(self.embed(views))
