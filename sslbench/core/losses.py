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

from sslbench.core.dist import all_reduce_sum, all_reduce_sum_with_grad, gather_no_grad, gather_with_grad, get_rank, get_world_size
from sslbench.core.errors import UserError

__all__ = [
    "BYOLLoss",
    "DINOLoss",
    "koleo_loss",
    "masked_patch_cross_entropy",
    "multicrop_cross_entropy",
    "InfoNCELoss",
    "MoCoV3Loss",
    "NTXentLoss",
    "SimSiamLoss",
    "byol_loss",
    "negative_cosine",
]


class NTXentLoss(nn.Module):
    """The normalised temperature-scaled cross-entropy loss (SimCLR, Eq. 1).

    For N images there are 2N views. Each view is an anchor whose positive is its twin; the other
    2(N-1) views are its negatives; self-similarity is excluded. Logits are cosine similarities
    divided by the temperature tau; the loss is the softmax cross-entropy averaged over all 2N
    anchors. Computed in float32 through ``log_softmax`` (no exp overflow at tau = 0.01).

    In a multi-process run each process holds N_local images: negatives come from every process
    through :func:`sslbench.core.dist.gather_with_grad`, the local anchors' positives sit at labels
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
    (gathered in rank order with :func:`sslbench.core.dist.gather_with_grad`; keys from the momentum
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


def multicrop_cross_entropy(probs: Tensor, log_p: Tensor) -> Tensor:
    """DINO's cross-entropy over view pairs: the mean over pairs (g, v), v != g, of the batch mean
    of ``-sum_k probs[g, b, k] log_p[v, b, k]`` (official ``DINOLoss.forward``; DINOv2's
    ``dino_clstoken_loss`` divides the same sum by the same number of terms).
    Shapes: ``probs`` (G, B, K) teacher targets, ``log_p`` (V, B, K) student log-probabilities, the G
    global views first; returns a scalar."""
    g, v, b = probs.shape[0], log_p.shape[0], probs.shape[1]
    if not g <= v:
        raise ValueError(f"DINO needs the teacher's G views among the student's V views; got G={g}, V={v}")
    ce = -torch.einsum("gbk,vbk->gv", probs, log_p) / b  # (G, V): batch-mean cross-entropy of each pair
    keep = ~torch.eye(g, v, dtype=torch.bool, device=ce.device)  # drop (g, g): a view against itself
    return (ce * keep).sum() / (g * v - g)


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
            loss = multicrop_cross_entropy(probs, log_p)
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


# ---------------------------------------------------------------------------------------------
# The modern zoo (SwAV, Barlow Twins, VICReg, NNCLR; issue 17). Statistics of the global batch come
# through sslbench.core.dist, so each loss computes on N processes what it computes on one.

__all__ += ["BarlowTwinsLoss", "NNCLRLoss", "SwAVLoss", "VICRegLoss", "off_diagonal", "sinkhorn_knopp"]


def off_diagonal(m: Tensor) -> Tensor:
    """The D(D-1) off-diagonal entries of a square (D, D) matrix, flattened."""
    d = m.shape[0]
    return m.flatten()[:-1].view(d - 1, d + 1)[:, 1:].flatten()


@torch.no_grad()
def sinkhorn_knopp(scores: Tensor, epsilon: float = 0.05, iterations: int = 3) -> Tensor:
    """SwAV's codes: the Sinkhorn-Knopp approximation of the equipartitioned assignment
    (Caron et al. 2020, Sec. 3.1, Eq. 3 and its solution ``Q* = Diag(u) exp(C^T Z / eps) Diag(v)``).

    ``Q = exp(scores^T / epsilon)`` (K prototypes x B samples) is scaled to total 1, then
    ``iterations`` times every prototype's row to total 1/K and every sample's column to total 1/B;
    the result times B is returned transposed, so each sample's code (row) sums to 1. The sums over
    samples (each row's total, the grand total) and the sample count B are taken over every
    process with :func:`sslbench.core.dist.all_reduce_sum`: the codes are those of the global batch, as
    in the official ``distributed_sinkhorn``. Computed in float32 without gradient.

    ``scores`` are cosines of unit vectors (|s| <= 1), so ``exp(s / epsilon)`` stays finite in
    float32 for epsilon >= 0.012. Shapes: ``scores`` (n, K), this process's samples -> (n, K).
    """
    with torch.autocast(scores.device.type, enabled=False):
        q = torch.exp(scores.float() / epsilon).T  # (K, n)
        k = q.shape[0]
        b = all_reduce_sum(torch.full((), float(q.shape[1]), device=q.device))  # samples of all processes
        q = q / all_reduce_sum(q.sum())
        for _ in range(iterations):
            q = q / all_reduce_sum(q.sum(dim=1, keepdim=True)) / k  # each prototype: total 1/K
            q = q / q.sum(dim=0, keepdim=True) / b  # each sample: total 1/B
        return (q * b).T


class SwAVLoss(nn.Module):
    """SwAV's swapped prediction over multi-crop views (Caron et al. 2020, Eq. 1 and 2, Sec. 3.2).

    ``scores[v]`` are the prototype scores ``z_v^T C`` of view v (unit z, unit prototypes). The
    codes ``q_s`` come from the first ``num_assign`` views only (the global crops), through
    :func:`sinkhorn_knopp` on the global batch, optionally with a queue's scores prepended
    (``queue_scores[s]``, rows of this process's share of the queue; their codes are dropped).
    Every other view v predicts ``q_s`` with ``p_v = softmax(scores[v] / temperature)``:

    ``L = 1/S sum_s 1/(V-1) sum_{v != s} mean_b (-sum_k q_s[b, k] log p_v[b, k])``

    as in the official code. Each process's loss is the mean over its own samples (DDP's averaging
    then gives the global mean); codes carry no gradient. Computed in float32.

    Shapes: ``scores``: V x (n, K); ``queue_scores``: num_assign x (m, K) or None. Returns a scalar.
    """

    def __init__(self, temperature: float = 0.1, epsilon: float = 0.05, iterations: int = 3, num_assign: int = 2) -> None:
        super().__init__()
        if not temperature > 0 or not epsilon > 0 or iterations < 1 or num_assign < 1:
            raise UserError(
                f"SwAV needs temperature > 0, epsilon > 0, iterations >= 1, num_assign >= 1; got {temperature}, {epsilon}, {iterations}, {num_assign}"
            )
        self.temperature, self.epsilon, self.iterations, self.num_assign = temperature, epsilon, iterations, num_assign

    def codes(self, scores: Tensor, queue_scores: Tensor | None = None) -> Tensor:
        """Sinkhorn codes (n, K) of one view's scores (n, K), with the queue's scores (m, K) first."""
        s = scores.detach().float()
        if queue_scores is not None:
            s = torch.cat([queue_scores.detach().float(), s])
        return sinkhorn_knopp(s, self.epsilon, self.iterations)[-scores.shape[0] :]

    def forward(self, scores: list[Tensor], queue_scores: list[Tensor] | None = None) -> Tensor:
        views = len(scores)
        if views < 2 or views < self.num_assign:
            raise ValueError(f"SwAV needs at least 2 views and {self.num_assign} to assign codes from, got {views}")
        with torch.autocast(scores[0].device.type, enabled=False):
            log_p = [F.log_softmax(s.float() / self.temperature, dim=1) for s in scores]
            loss = torch.zeros((), device=scores[0].device)
            for s in range(self.num_assign):
                q = self.codes(scores[s], None if queue_scores is None else queue_scores[s])
                for v in range(views):
                    if v != s:
                        loss = loss - (q * log_p[v]).sum(dim=1).mean() / (views - 1)
            return loss / self.num_assign


def _standardise_global(z: Tensor, n: int, eps: float) -> Tensor:
    """(n_local, D) -> (n_local, D): each column to mean 0 and biased variance 1 over the global
    batch of ``n`` rows (sums through :func:`sslbench.core.dist.all_reduce_sum_with_grad`; two passes)."""
    mean = all_reduce_sum_with_grad(z.sum(dim=0)) / n
    dev = z - mean
    var = all_reduce_sum_with_grad((dev * dev).sum(dim=0)) / n
    return dev / torch.sqrt(var + eps)


class BarlowTwinsLoss(nn.Module):
    """The Barlow Twins loss (Zbontar et al. 2021, Eq. 1 and 2).

    ``L = sum_i (1 - C_ii)^2 + lambda * sum_i sum_{j != i} C_ij^2`` with the cross-correlation
    ``C_ij = sum_b a_bi c_bj / N`` of the two views' embeddings standardised per dimension over the
    batch (mean 0, biased variance 1, eps 1e-5: the official code's ``BatchNorm1d(affine=False)``).

    The batch is the global one: the column statistics and ``C`` are sums over every process
    (:func:`sslbench.core.dist.all_reduce_sum_with_grad`), so every process computes the same loss and,
    with DDP's averaging, exactly the single-process gradient. (The official code all-reduces ``C``
    without a gradient, which scales the gradient by 1/W.) Computed in float32.

    Shapes: ``z1``, ``z2``: (n, D), row b of both is the same image. Returns a scalar.
    """

    def __init__(self, lambd: float = 0.0051, eps: float = 1e-5) -> None:
        super().__init__()
        if not lambd >= 0:
            raise UserError(f"the Barlow Twins lambda must be >= 0, got {lambd}")
        self.lambd, self.eps = lambd, eps

    def forward(self, z1: Tensor, z2: Tensor) -> Tensor:
        with torch.autocast(z1.device.type, enabled=False):
            n = z1.shape[0] * get_world_size()
            a = _standardise_global(z1.float(), n, self.eps)
            c = _standardise_global(z2.float(), n, self.eps)
            corr = all_reduce_sum_with_grad(a.T @ c) / n  # (D, D)
            on_diag = (torch.diagonal(corr) - 1).pow(2).sum()
            return on_diag + self.lambd * off_diagonal(corr).pow(2).sum()


class VICRegLoss(nn.Module):
    """VICReg's loss (Bardes et al. 2022) as the official code computes it: ``lambda s + mu v + nu c``.

    - invariance ``s``: the mean squared error between the two views' embeddings (mean over
      samples and dimensions; each process's own samples, DDP averages);
    - variance ``v``: per view ``mean_j relu(gamma - sqrt(Var(z_j) + eps))`` with the unbiased
      variance, gamma 1, eps 1e-4, averaged over the two views (the paper writes the sum; the
      official code, whose weights these are, averages);
    - covariance ``c``: per view the sum of the squared off-diagonal entries of the covariance
      matrix ``(z - mean)^T (z - mean) / (N - 1)``, divided by D, summed over the two views.

    Variance and covariance are those of the global batch: the embeddings are gathered from every
    process with :func:`sslbench.core.dist.gather_with_grad` first, as the official code does. Returns
    the loss and the three terms (detached), for logging. Computed in float32.

    Shapes: ``z1``, ``z2``: (n, D), row b of both is the same image.
    """

    def __init__(self, sim_weight: float = 25.0, var_weight: float = 25.0, cov_weight: float = 1.0, gamma: float = 1.0, eps: float = 1e-4) -> None:
        super().__init__()
        if min(sim_weight, var_weight, cov_weight) < 0 or not eps > 0:
            raise UserError(f"VICReg needs weights >= 0 and eps > 0, got {sim_weight}, {var_weight}, {cov_weight}, {eps}")
        self.sim_weight, self.var_weight, self.cov_weight, self.gamma, self.eps = sim_weight, var_weight, cov_weight, gamma, eps

    def forward(self, z1: Tensor, z2: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        with torch.autocast(z1.device.type, enabled=False):
            z1, z2 = z1.float(), z2.float()
            inv = F.mse_loss(z1, z2)
            var = torch.zeros((), device=z1.device)
            cov = torch.zeros((), device=z1.device)
            for z in (gather_with_grad(z1), gather_with_grad(z2)):
                n, d = z.shape
                z = z - z.mean(dim=0)
                std = torch.sqrt(z.var(dim=0) + self.eps)  # unbiased
                var = var + F.relu(self.gamma - std).mean() / 2
                cov = cov + off_diagonal(z.T @ z / (n - 1)).pow(2).sum() / d
            loss = self.sim_weight * inv + self.var_weight * var + self.cov_weight * cov
            return loss, {"invariance": inv.detach(), "variance": var.detach(), "covariance": cov.detach()}


class NNCLRLoss(nn.Module):
    """NNCLR's symmetric contrastive loss with nearest neighbours as positives (Dwibedi et al. 2021,
    Eq. 2 with the prediction head, symmetrised as in Sec. 3.2).

    ``S[i, k] = NN(z1_i) . p2_k / tau`` between the unit nearest neighbours (from the support set)
    of view 1's projections and view 2's unit predictions, over the global batch. Eq. 2 is the
    cross-entropy of each row (NN(z1_i) must pick p2_i among all p2_k); the symmetrised loss adds
    each column (p2_i must pick NN(z1_i) among all NN(z1_k)), and the two view orders are averaged:
    ``L = (CE_rows(S12) + CE_cols(S12) + CE_rows(S21) + CE_cols(S21)) / 4``, the four terms of
    VISSL's ``nnclr_loss`` (facebookresearch/vissl, ``vissl/losses/nnclr_loss.py``). The peers
    differ: solo-learn (vturrisi/solo-learn at 9187ea3, ``solo/losses/nnclr.py`` and
    ``solo/methods/nnclr.py``) uses the two row terms only, ``(CE_rows(S12) + CE_rows(S21)) / 2``
    over gathered predictions; lightly (lightly-ai/lightly at e8d317f, the NNCLR model of
    ``docs/source/getting_started/benchmarks/cifar10_benchmark.py``) uses
    ``(NTXent(NN(z1), p2) + NTXent(NN(z2), p1)) / 2`` with its ``NTXentLoss``
    (``lightly/loss/ntx_ent_loss.py``): SimCLR's 2n-row form, where a neighbour also has the other
    neighbours and a prediction the other predictions as negatives, within the process's batch
    (``gather_distributed=False`` by default). Neighbours carry no gradient; predictions of
    other processes come through :func:`sslbench.core.dist.gather_with_grad`, labels are offset by rank,
    and each process averages over its own rows. Computed in float32.

    Shapes: ``nn1``, ``nn2``, ``p1``, ``p2``: (n, D), row b of all four is the same image. Returns a
    scalar.
    """

    def __init__(self, temperature: float = 0.1) -> None:
        super().__init__()
        if not temperature > 0:
            raise UserError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature

    def _pair(self, nn_a: Tensor, p_b: Tensor) -> Tensor:
        """CE over the rows and over the columns of ``S = NN_a . p_b^T / tau`` (this process's rows)."""
        nn_a = F.normalize(nn_a.detach().float(), dim=1)
        p_b = F.normalize(p_b.float(), dim=1)
        labels = torch.arange(p_b.shape[0], device=p_b.device) + get_rank() * p_b.shape[0]
        rows = nn_a @ gather_with_grad(p_b).T / self.temperature  # (n, N): NN(z_a) picks p_b
        cols = p_b @ gather_no_grad(nn_a).T / self.temperature  # (n, N): p_b picks NN(z_a)
        return F.cross_entropy(rows, labels) + F.cross_entropy(cols, labels)

    def forward(self, nn1: Tensor, nn2: Tensor, p1: Tensor, p2: Tensor) -> Tensor:
        with torch.autocast(p1.device.type, enabled=False):
            return (self._pair(nn1, p2) + self._pair(nn2, p1)) / 4


# ---------------------------------------------------------------------------------------------
# The zoo's second wave (issue 29): decoupled contrastive learning, shared by DCL and DCLW.

__all__ += ["DCLLoss"]


class DCLLoss(nn.Module):
    """The decoupled contrastive loss (Yeh et al. 2022, "Decoupled Contrastive Learning", Eq. 6 as
    lightly's ``DCLLoss`` cites it) and, with ``sigma``, its weighted form DCLW (the paper's
    negative von Mises-Fisher weight).

    For N images with unit embeddings ``z_i^(1)``, ``z_i^(2)`` every one of the 2N views is an
    anchor, and with temperature tau::

        L_i^(k) = -w_i <z_i^(1), z_i^(2)> / tau + log sum_{l in {1,2}, j != i} exp(<z_i^(k), z_j^(l)> / tau)

    NT-Xent without the positive pair in the denominator: only the 2(N-1) views of other images
    are summed. The loss is the mean over the 2N anchors (lightly's ``DCLLoss``: the mean of the
    two view orders). DCL: ``w_i = 1``. DCLW: ``w_i = 2 - exp(<z_i^(1), z_i^(2)> / sigma) /
    mean_j exp(<z_j^(1), z_j^(2)> / sigma)``, the same for both anchors of image i, with the mean
    over the global batch and no gradient through the weight (lightly's
    ``negative_mises_fisher_weights`` detaches it; the weights average to 1).

    In a multi-process run the other processes' views come through
    :func:`sslbench.core.dist.gather_with_grad` (the negatives), the positive similarities through
    :func:`sslbench.core.dist.gather_no_grad` (the weights' mean), and each process's loss is the mean
    over its own 2n anchors: DDP's averaging then gives the single-process gradient. Computed in
    float32 at least (float64 input stays float64).

    Shapes: ``z0``, ``z1``: (n, D), row i of both is the same image. Returns a scalar.
    """

    def __init__(self, temperature: float = 0.1, sigma: float | None = None) -> None:
        super().__init__()
        if not temperature > 0:
            raise UserError(f"temperature must be > 0, got {temperature}")
        if sigma is not None and not sigma > 0:
            raise UserError(f"sigma must be > 0, got {sigma}")
        self.temperature, self.sigma = temperature, sigma

    def forward(self, z0: Tensor, z1: Tensor) -> Tensor:
        with torch.autocast(z0.device.type, enabled=False):  # similarities in float32, even under bf16
            dtype = torch.promote_types(z0.dtype, torch.float32)
            return self._loss(z0.to(dtype), z1.to(dtype))

    def weights(self, z0: Tensor, z1: Tensor) -> Tensor:
        """DCLW's weights (n,) of unit ``z0``, ``z1`` (n, D): ``2 - N softmax_global(<z0_i, z1_i> / sigma)_i``."""
        assert self.sigma is not None
        s = (z0 * z1).sum(dim=1).detach() / self.sigma  # (n,)
        s_all = gather_no_grad(s)  # (N,)
        return 2 - s_all.shape[0] * torch.exp(s - torch.logsumexp(s_all, dim=0))

    def _loss(self, z0: Tensor, z1: Tensor) -> Tensor:
        n = z0.shape[0]
        local = F.normalize(torch.cat([z0, z1]), dim=1)  # (2n, D) anchors
        cands = torch.cat([gather_with_grad(local[:n]), gather_with_grad(local[n:])])  # (2N, D)
        big_n = cands.shape[0] // 2
        logits = local @ cands.T / self.temperature  # (2n, 2N)
        i = torch.arange(n, device=logits.device) + get_rank() * n
        own, twin = torch.cat([i, i + big_n]), torch.cat([i + big_n, i])  # columns of the anchor and of its positive
        rows = torch.arange(2 * n, device=logits.device).repeat(2)
        neg_inf = torch.full((), float("-inf"), dtype=logits.dtype, device=logits.device)
        negatives = torch.logsumexp(logits.index_put((rows, torch.cat([own, twin])), neg_inf), dim=1)  # (2n,)
        positive = (local * local.roll(n, dims=0)).sum(dim=1) / self.temperature  # (2n,) <z_i^(1), z_i^(2)> / tau
        if self.sigma is not None:
            positive = positive * self.weights(local[:n], local[n:]).repeat(2)
        return (negatives - positive).mean()


def masked_patch_cross_entropy(probs: Tensor, student: Tensor, weights: Tensor, n_samples: int, student_temp: float) -> Tensor:
    """iBOT's masked patch self-distillation (Zhou et al. 2022, Eq. 2; official ``iBOTLoss.forward``,
    DINOv2's ``iBOTPatchLoss.forward_masked``): for every masked patch m of a student view, the
    cross-entropy ``-sum_k probs[m, k] log softmax(student[m] / tau_s)[k]``, averaged over the
    masked patches of its view (``weights[m]`` = 1 / the masked count of m's view) and then over
    the ``n_samples`` views of this process (a view without masked patches counts as 0), as the
    official codes (mean over the batch of each view's masked mean, then over the 2 global views).
    Shapes: ``probs`` (M, K) teacher targets (no gradient), ``student`` (M, K) logits, ``weights``
    (M,); returns a scalar, computed in float32."""
    with torch.autocast(student.device.type, enabled=False):
        log_p = F.log_softmax(student.float() / student_temp, dim=-1)
        return -(weights.float() * (probs.float() * log_p).sum(dim=-1)).sum() / n_samples


def koleo_loss(x: Tensor, eps: float = 1e-8) -> Tensor:
    """The Kozachenko-Leonenko entropy estimator as a regulariser (Sablayrolles et al., "Spreading
    vectors for similarity search", ICLR 2019; DINOv2 Sec. 4, official ``KoLeoLoss``):
    ``-mean_i log(||x_i - x_j(i) + eps|| + eps)`` over L2-normalised rows, j(i) the nearest other row
    (largest inner product). The rows are the global batch (:func:`gather_with_grad`); the
    official code takes each GPU's own batch. Shapes: (n, D) -> scalar, float32."""
    with torch.autocast(x.device.type, enabled=False):
        z = gather_with_grad(F.normalize(x.float(), p=2, dim=-1, eps=eps))  # (N, D)
        with torch.no_grad():
            dots = z @ z.T
            dots.fill_diagonal_(-1.0)  # never oneself
            nearest = dots.argmax(dim=1)
        dist = F.pairwise_distance(z, z[nearest], p=2, eps=eps)  # ||z_i - z_j + eps||, torch's PairwiseDistance
        return -torch.log(dist + eps).mean()
