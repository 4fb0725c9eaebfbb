"""The losses the method plugins share, each written once.

- :class:`NTXentLoss`: SimCLR's normalised temperature-scaled cross-entropy over 2N views, negatives
  gathered from every process with gradients.
- :class:`InfoNCELoss`: MoCo's InfoNCE of a query against its key and a queue of negatives.
- :class:`MoCoV3Loss`: in-batch InfoNCE of queries against the global batch's keys (MoCo v3).
- Cosine regression: :func:`byol_loss` (``2 - 2 cos``, BYOL) and :func:`negative_cosine`
  (``-cos``, SimSiam), each with a stop-gradient on the target, and their symmetrised forms
  :class:`BYOLLoss` and :class:`SimSiamLoss`.
- :class:`DINOLoss`: DINO's cross-entropy between a centred, sharpened teacher distribution on
  each global view and the student's distribution on every other view; it keeps the centre.

Every loss computes in float32 (also under bf16 autocast) and returns a scalar.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .dist import all_reduce_sum, gather_with_grad, get_rank, get_world_size
from .errors import UserError

__all__ = ["BYOLLoss", "DINOLoss", "InfoNCELoss", "MoCoV3Loss", "NTXentLoss", "SimSiamLoss", "byol_loss", "negative_cosine"]


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


class MoCoV3Loss(nn.Module):
    """MoCo v3's contrastive loss ``ctr(q, k)`` (Chen et al. 2021, Algorithm 1), scaled by 2 tau.

    Logits are ``q_i . k_j / tau`` between L2-normalised queries and the keys of the *global* batch
    (gathered in rank order with :func:`sslbench.dist.gather_with_grad`; keys from the momentum
    encoder carry no gradient, so nothing flows back through the gather). Query i's positive is
    key i of its own process (labels offset by rank x local batch); the loss is the softmax
    cross-entropy averaged over local queries, multiplied by ``2 * tau`` as in the paper's code
    (it makes the gradient scale independent of tau). Computed in float32.

    Shapes: ``q``, ``k``: (N, D), row i of both is the same image. Returns a scalar.
    """

    def __init__(self, temperature: float = 0.2) -> None:
        super().__init__()
        if not temperature > 0:
            raise UserError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature

    def forward(self, q: Tensor, k: Tensor) -> Tensor:
        with torch.autocast(q.device.type, enabled=False):  # similarities in float32, even under bf16
            return self._loss(q, k)

    def _loss(self, q: Tensor, k: Tensor) -> Tensor:
        q = F.normalize(q.float(), dim=1)
        k_all = gather_with_grad(F.normalize(k.float(), dim=1))  # (N_global, D)
        logits = q @ k_all.T / self.temperature  # (N, N_global)
        labels = torch.arange(q.shape[0], device=q.device) + get_rank() * q.shape[0]
        return F.cross_entropy(logits, labels) * (2 * self.temperature)


def byol_loss(p: Tensor, z: Tensor) -> Tensor:
    """BYOL's regression loss (Grill et al. 2020, Eq. 2): ``||p/|p| - z/|z|||^2 = 2 - 2 cos(p, z)``
    per sample, averaged over the batch; ``z`` is a target and gets no gradient (stop-gradient).
    Computed in float32. Shapes: ``p``, ``z``: (N, D) -> scalar."""
    p = F.normalize(p.float(), dim=1)
    z = F.normalize(z.detach().float(), dim=1)
    return (2 - 2 * (p * z).sum(dim=1)).mean()


class BYOLLoss(nn.Module):
    """The symmetrised BYOL loss ``L = L(v, v') + L(v', v)`` (Grill et al. 2020, Sec. 3.1): the sum
    of both directions, as in the paper (values in [0, 8]), each direction the batch mean of
    :func:`byol_loss` between one view's online prediction and the other view's target
    projection. Shapes: ``p1``, ``p2``, ``z1``, ``z2``: (N, D), row i the same image -> scalar."""

    def forward(self, p1: Tensor, p2: Tensor, z1: Tensor, z2: Tensor) -> Tensor:
        return byol_loss(p1, z2) + byol_loss(p2, z1)


def negative_cosine(p: Tensor, z: Tensor) -> Tensor:
    """``D(p, z) = -cos(p, stopgrad(z))`` averaged over the batch (Chen & He 2021, Eq. 1 with the
    stop-gradient of Eq. 3). Computed in float32. Shapes: ``p``, ``z``: (N, D) -> scalar."""
    p = F.normalize(p.float(), dim=1)
    z = F.normalize(z.detach().float(), dim=1)
    return -(p * z).sum(dim=1).mean()


class SimSiamLoss(nn.Module):
    """The symmetrised SimSiam loss ``L = D(p1, z2) / 2 + D(p2, z1) / 2`` (Chen & He 2021, Eq. 4),
    minimum -1. Shapes: ``p1``, ``p2``, ``z1``, ``z2``: (N, D), row i the same image -> scalar."""

    def forward(self, p1: Tensor, p2: Tensor, z1: Tensor, z2: Tensor) -> Tensor:
        return negative_cosine(p1, z2) / 2 + negative_cosine(p2, z1) / 2


class DINOLoss(nn.Module):
    """DINO's self-distillation loss and its centre (Caron et al. 2021, Eq. 1-4, Sec. 3.1).

    For teacher outputs ``t_g`` on the G global views and student outputs ``s_v`` on all V views
    (the global views first, in the same order), with the centre ``c``::

        P_t(g) = softmax((t_g - c) / tau_t)          (centred, sharpened; no gradient)
        L = mean over pairs (g, v), v != g, of  mean_b  -sum_k P_t(g)[b, k] log softmax(s_v / tau_s)[b, k]

    The mean over pairs and then the batch is the official code's (``main_dino.py``,
    ``DINOLoss.forward``: the per-pair batch means are summed and divided by the number of
    pairs); lightly's ``DINOLoss`` computes the same with one einsum over (teacher view, student
    view) pairs, as here. After the loss, the centre follows the teacher's batch mean over the
    global views of *every* process (``update_center``, an all-reduced sum over W processes):
    ``c <- m c + (1 - m) sum_{r,g,b} t / (W G B)`` with ``m = center_momentum`` (0.9), so every
    process keeps the same centre, the one of one process on the global batch. ``center`` is a
    registered buffer: checkpoints and resume keep it.

    Computed in float32 (also under bf16 autocast). Each process's loss is the mean over its local
    samples; DDP's gradient averaging gives the global mean's gradient (the teacher carries none).

    Shapes: ``student`` (V, B, K), ``teacher`` (G, B, K) with G <= V; returns the scalar loss and
    the teacher distributions P_t (G, B, K) (for logging).
    """

    center: Tensor

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9) -> None:
        super().__init__()
        if not student_temp > 0:
            raise UserError(f"student temperature must be > 0, got {student_temp}")
        if not 0.0 <= center_momentum <= 1.0:
            raise UserError(f"center_momentum must be in [0, 1], got {center_momentum}")
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(self, student: Tensor, teacher: Tensor, teacher_temp: float) -> tuple[Tensor, Tensor]:
        with torch.autocast(student.device.type, enabled=False):  # softmaxes in float32, even under bf16
            probs = self.teacher_probs(teacher, teacher_temp)  # (G, B, K)
            log_p = F.log_softmax(student.float() / self.student_temp, dim=-1)  # (V, B, K)
            g, v, b = probs.shape[0], log_p.shape[0], probs.shape[1]
            if not g <= v:
                raise ValueError(f"DINO needs the teacher's G views among the student's V views; got G={g}, V={v}")
            ce = -torch.einsum("gbk,vbk->gv", probs, log_p) / b  # (G, V): batch-mean cross-entropy of each pair
            keep = ~torch.eye(g, v, dtype=torch.bool, device=ce.device)  # drop (g, g): a view against itself
            loss = (ce * keep).sum() / (g * v - g)
        self.update_center(teacher)
        return loss, probs

    @torch.no_grad()
    def teacher_probs(self, teacher: Tensor, teacher_temp: float) -> Tensor:
        """The centred, sharpened teacher distributions ``softmax((t - c) / tau_t)``: (G, B, K), float32."""
        return F.softmax((teacher.float() - self.center) / teacher_temp, dim=-1)

    @torch.no_grad()
    def update_center(self, teacher: Tensor) -> None:
        """``c <- m c + (1 - m) * batch mean``, the mean over the G global views and the B samples of
        every process (teacher (G, B, K)); identical on every process."""
        g, b = teacher.shape[0], teacher.shape[1]
        batch_center = all_reduce_sum(teacher.float().sum(dim=(0, 1))) / (g * b * get_world_size())  # (K,)
        self.center.copy_(self.center * self.center_momentum + batch_center * (1 - self.center_momentum))
