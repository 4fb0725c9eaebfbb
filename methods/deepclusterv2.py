"""DeepCluster v2: k-means pseudo-labels of the previous epoch as classification targets.

Caron, Misra, Mairal, Goyal, Bojanowski, Joulin. "Unsupervised Learning of Visual Features by
Contrasting Cluster Assignments." NeurIPS 2020, Sec. 3.2 and Appendix A (DeepCluster-v2). At the
start of every epoch, spherical k-means (several runs, one per prototype set) clusters a memory
bank of the unit projections of the whole data set, filled during the previous epoch; the
centroids become the prototypes and each sample's cluster is the target of a cross-entropy of its
views' prototype scores over a temperature. Details follow the official code
(facebookresearch/swav at ``9a2dc80``, ``main_deepclusterv2.py``): both crops' projections in the
bank, k-means head h on crop h mod 2, initial centroids drawn from the bank, 10 iterations, empty
clusters keep their centroid, the prototypes never trained by the gradient.

In sslbench the bank is a :class:`sslbench.api.MemoryBank` of the projections of every process
(gathered) with the samples' global indices beside it, so every process holds the same bank, and
k-means runs on it in every process, seeded by (seed, epoch, head): N processes cluster what one
clusters. Bank, indices, centroids and assignments are buffers, so a checkpoint carries them and a
resumed run clusters what an unbroken one does. The official code fills the bank in a pass over
the data before training; a plugin gets no such pass, so the first epoch (and any sample the bank
missed) takes as target its nearest current centroid (random unit vectors at first).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sslbench.api import (
    EMBEDDING_LOG,
    Batch,
    Family,
    MemoryBank,
    Method,
    MethodConfig,
    Recipe,
    StepInfo,
    UserError,
    feature_dim,
    gather_no_grad,
    mlp,
    register_method,
)

__all__ = ["DeepClusterV2", "DeepClusterV2Config", "deepcluster_loss", "spherical_kmeans"]


@dataclass
class DeepClusterV2Config(MethodConfig):
    """DeepCluster-v2 hyper-parameters (solo-learn's CIFAR config; the official ImageNet values in comments)."""

    num_prototypes: tuple[int, ...] = (3000, 3000, 3000)  # K of each k-means head (solo-learn CIFAR and official: 3 x 3000)
    temperature: float = 0.1  # softmax temperature of the prototype scores (solo-learn and official: 0.1)
    kmeans_iters: int = 10  # k-means iterations per head and epoch (solo-learn and official: 10)
    proj_hidden_dim: int = 2048  # projector hidden width (solo-learn CIFAR and official: 2048)
    proj_dim: int = 128  # projection and prototype dimension (solo-learn CIFAR and official feat_dim: 128)
    memory_size: int = 50000  # bank rows: at least the training-set size (solo-learn and official: the data set; CIFAR 50000)

    def validate(self) -> None:
        if not self.num_prototypes or min(self.num_prototypes) < 1:
            raise UserError(f"method_cfg.num_prototypes must be one or more counts >= 1, got {self.num_prototypes}")
        if not self.temperature > 0:
            raise UserError(f"method_cfg.temperature must be > 0, got {self.temperature}")
        if min(self.kmeans_iters, self.proj_hidden_dim, self.proj_dim, self.memory_size) < 1:
            raise UserError("method_cfg.kmeans_iters, proj_hidden_dim, proj_dim and memory_size must be >= 1")


def spherical_kmeans(x: Tensor, k: int, iters: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Spherical k-means of the unit rows ``x`` (n, D): ``k`` initial centroids are rows at a
    random permutation (cycled when n < k), then ``iters`` times assign every row to the centroid
    of the largest dot product and set each non-empty cluster's centroid to its rows' normalised
    mean (the official ``cluster_memory``). Returns centroids (k, D) and assignments (n,) of the
    final centroids. Deterministic for a given ``generator`` (on the CPU)."""
    n = x.shape[0]
    first = torch.randperm(n, generator=generator).to(x.device)
    centroids = x[first[torch.arange(k, device=x.device) % n]].clone()
    for it in range(iters + 1):
        assign = (x @ centroids.T).argmax(dim=1)
        if it == iters:
            return centroids, assign
        counts = torch.bincount(assign, minlength=k)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        filled = counts > 0
        centroids[filled] = F.normalize(sums[filled] / counts[filled, None].to(x.dtype), dim=1)
    raise AssertionError("unreachable")


def deepcluster_loss(scores: list[Tensor], targets: Tensor, temperature: float) -> Tensor:
    """``mean_h CE(scores_h / tau, targets_h)`` (the official loss): ``scores[h]`` (V*n, K_h) the
    prototype scores of V views of n samples stacked view after view, ``targets`` (H, n) each
    sample's cluster per head, the same for all its views. The mean over this process's rows."""
    views = scores[0].shape[0] // targets.shape[1]
    return torch.stack([F.cross_entropy(s.float() / temperature, t.repeat(views)) for s, t in zip(scores, targets)]).mean()


@register_method("deepclusterv2")
class DeepClusterV2(Method):
    """Backbone and 2-layer projector; k-means centroids of a memory bank as fixed prototypes."""

    Config = DeepClusterV2Config
    description = "Clustering: per-epoch k-means of a memory bank of projections gives the targets (DeepCluster v2)"
    paper = "Caron et al., Unsupervised Learning of Visual Features by Contrasting Cluster Assignments, NeurIPS 2020 (DeepCluster-v2)"
    min_batch_size = 2  # the projector's BatchNorm needs more than one sample
    memory_index: Tensor  # (memory_size,) the sample of each bank row; -1: empty
    centroids: Tensor  # (sum K, proj_dim) the prototypes of every head
    assigned_index: Tensor  # (memory_size,) the last clustering's samples, sorted; int64 max: none
    assignments: Tensor  # (heads, memory_size) their cluster per head

    def __init__(self, backbone: nn.Module, cfg: DeepClusterV2Config | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or DeepClusterV2Config()
        self.encoder = backbone
        self.projector = mlp(feature_dim(backbone), cfg.proj_hidden_dim, cfg.proj_dim, 2)  # Linear-BN-ReLU-Linear
        m, heads = cfg.memory_size, len(cfg.num_prototypes)
        # Both crops' unit projections side by side (m, 2 * proj_dim): buffers `memory`, `memory_ptr`.
        self.bank = MemoryBank(self, "memory", m, 2 * cfg.proj_dim, init="zeros")
        self.register_buffer("memory_index", torch.full((m,), -1, dtype=torch.long))  # sample of each row; -1: empty
        # The prototypes of all heads stacked (sum K, proj_dim): random unit rows, then the centroids.
        self.register_buffer("centroids", F.normalize(torch.randn(sum(cfg.num_prototypes), cfg.proj_dim), dim=1))
        # Last clustering: the clustered samples' indices, sorted, and their cluster per head.
        self.register_buffer("assigned_index", torch.full((m,), -1, dtype=torch.long))
        self.register_buffer("assignments", torch.zeros(heads, m, dtype=torch.long))

    @classmethod
    def recipe(cls, image_size: int, family: Family) -> Recipe:
        """LARS with linear lr scaling, wd 1e-6. Small images: lr 0.6 x B/256 (solo-learn's CIFAR
        config). ImageNet-size: lr 0.3 x B/256 (the official 4096-batch scripts: 4.8), a bank of
        ImageNet's 1,281,167 images. No reference trains DeepCluster-v2 on a ViT (docs/recipes.md)."""
        if image_size < 96:
            return Recipe(optimizer="lars", lr=0.6, lr_scaling="linear", weight_decay=1e-6)
        return Recipe(optimizer="lars", lr=0.3, lr_scaling="linear", weight_decay=1e-6, method={"memory_size": 1281167})

    def _prototypes(self) -> list[Tensor]:
        return list(self.centroids.split(list(self.cfg.num_prototypes)))

    @torch.no_grad()
    def cluster(self, info: StepInfo) -> None:
        """k-means of the bank's filled rows per head (crop h mod 2), seeded by (seed, epoch, h);
        the centroids become the prototypes, the assignments the targets; the bank is emptied for
        the new epoch. Identical in every process (the bank is)."""
        filled = self.memory_index >= 0
        if not bool(filled.any()):
            return
        index = self.memory_index[filled]
        order = index.argsort()
        crops = self.bank.rows[filled].float().chunk(2, dim=1)
        protos = []
        self.assignments.zero_()
        for h, k in enumerate(self.cfg.num_prototypes):
            g = torch.Generator().manual_seed(((info.seed * 1_000_003 + info.epoch) * 101 + h) % (1 << 63))
            c, a = spherical_kmeans(crops[h % 2], k, self.cfg.kmeans_iters, g)
            protos.append(c)
            self.assignments[h, : order.numel()] = a[order]
        self.centroids.copy_(torch.cat(protos))
        self.assigned_index.fill_(torch.iinfo(torch.long).max)[: order.numel()] = index[order]  # sorted, empty rows last
        self.memory_index.fill_(-1)
        self.bank.ptr.zero_()

    def targets(self, index: Tensor, z: list[Tensor]) -> Tensor:
        """(H, n) each sample's cluster from the last clustering; a sample it did not see (the
        first epoch) gets its nearest current centroid for crop h mod 2 of ``z`` (2 x (n, D))."""
        pos = torch.searchsorted(self.assigned_index, index).clamp(max=self.assigned_index.numel() - 1)
        seen = self.assigned_index[pos] == index
        nearest = torch.stack([(z[h % 2].detach().float() @ c.T).argmax(dim=1) for h, c in enumerate(self._prototypes())])
        return torch.where(seen, self.assignments[:, pos], nearest)

    def training_step(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        """``batch.views``: two augmented (B, 3, S, S) batches -> (loss, logs). At an epoch's first
        step (a pure function of the step) the bank is clustered; the step's projections of every
        process then fill it."""
        info = batch.info
        if info.epoch > 0 and info.step == info.epoch * info.steps_per_epoch:
            self.cluster(info)
        z = [F.normalize(self.projector(self.encoder(x)).float(), dim=1) for x in batch.views]  # 2 x (B, D)
        targets = self.targets(batch.index, z)
        zz = torch.cat(z)
        loss = deepcluster_loss([zz @ c.T for c in self._prototypes()], targets, self.cfg.temperature)
        with torch.no_grad():  # the bank: every process's rows, in rank order
            m = self.memory_index.numel()
            idx = gather_no_grad(batch.index.to(zz.device))[-m:]  # as push() keeps the newest m rows
            self.memory_index[(self.bank.ptr + torch.arange(idx.numel(), device=idx.device)) % m] = idx
            self.bank.push(torch.cat(z, dim=1))  # gathers the rows of every process itself
        return loss, {"loss": loss.detach(), EMBEDDING_LOG: z[0].detach()}
