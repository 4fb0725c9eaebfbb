"""Label-free feature metrics: how good (or collapsed) a representation looks without any label.

Each is a function of an embedding matrix (``N`` samples x ``D`` dimensions), computed in float64:

- **Alignment** (Wang & Isola, "Understanding Contrastive Representation Learning through Alignment
  and Uniformity on the Hypersphere", ICML 2020): ``E ||f(x) - f(y)||_2^alpha`` over positive pairs
  ``(x, y)`` (two augmented views of one image), on L2-normalised features; ``alpha = 2``. Lower is
  better aligned; 0 when both views always map to the same point.
- **Uniformity** (ibid.): ``log E exp(-t ||f(x) - f(y)||_2^2)`` over pairs of *distinct* samples
  ``x != y`` (all ``N (N - 1) / 2`` of them, as ``torch.pdist``), on L2-normalised features;
  ``t = 2``. Lower is more uniform; 0 for collapsed features (every distance 0), and about
  ``-4`` for features spread uniformly on a high-dimensional sphere (squared distances near 2).
- **RankMe** (Garrido, Balestriero, Najman & LeCun, "RankMe: Assessing the Downstream Performance of
  Pretrained Self-Supervised Representations by Their Rank", ICML 2023): the effective rank
  ``exp(-sum_k p_k log p_k)`` with ``p_k = sigma_k / ||sigma||_1 + eps`` over the singular values
  ``sigma`` of the (raw, uncentred) embedding matrix, ``eps = 1e-7`` (the paper's). Between 1 (a
  rank-one, collapsed matrix) and ``min(N, D)``.
- **Feature standard deviation** (collapse check of SimSiam, Chen & He, CVPR 2021, Sec. 4.1): the
  standard deviation over samples of each dimension of the L2-normalised embeddings, averaged over
  the ``D`` dimensions (population standard deviation, ``1/N``). Collapsed features give 0; features
  spread isotropically on the sphere give ``1/sqrt(D)``, so ``feature_std * sqrt(D)`` is about 1
  when healthy.

None of them reads a label: the evaluation protocols (``evals/protocols.py``) score them on the test
split of any data set, including one class folder of unlabelled images.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from sslbench.api import RANK_EPS, UserError, effective_rank, normalised_std

RANKME_EPS = RANK_EPS  # Garrido et al. 2023, Eq. 1
ALIGNMENT_ALPHA = 2.0  # Wang & Isola 2020
UNIFORMITY_T = 2.0  # Wang & Isola 2020


def _matrix(z: Tensor, what: str, min_rows: int = 1) -> Tensor:
    if z.ndim != 2 or z.shape[0] < min_rows or z.shape[1] < 1:
        raise UserError(f"{what} needs an embedding matrix (N >= {min_rows}, D >= 1); got shape {tuple(z.shape)}")
    return z.detach().to("cpu", torch.float64)


def alignment(x: Tensor, y: Tensor, alpha: float = ALIGNMENT_ALPHA) -> float:
    """``mean_i ||x_i/|x_i| - y_i/|y_i|||^alpha`` for positive pairs ``(x_i, y_i)``, ``(N, D)`` each."""
    a, b = _matrix(x, "alignment"), _matrix(y, "alignment")
    if a.shape != b.shape:
        raise UserError(f"alignment needs two views of the same shape; got {tuple(a.shape)} and {tuple(b.shape)}")
    return float((F.normalize(a, dim=1) - F.normalize(b, dim=1)).norm(dim=1).pow(alpha).mean())


def uniformity(z: Tensor, t: float = UNIFORMITY_T, chunk: int = 512) -> float:
    """``log mean_{i<j} exp(-t ||z_i/|z_i| - z_j/|z_j|||^2)`` over all pairs of distinct rows of
    ``z`` ``(N, D)``, exactly (a log-sum-exp over row blocks of the pairwise distances)."""
    u = F.normalize(_matrix(z, "uniformity", min_rows=2), dim=1)
    n = u.shape[0]
    parts = []
    for start in range(0, n - 1, chunk):
        block = u[start : start + chunk]
        sq = (2.0 - 2.0 * block @ u.T).clamp_min(0.0)  # ||a - b||^2 of unit vectors
        rows = torch.arange(start, start + block.shape[0]).unsqueeze(1)
        upper = torch.arange(n).unsqueeze(0) > rows  # pairs i < j, each once
        parts.append(torch.logsumexp((-t * sq)[upper], dim=0))
    pairs = n * (n - 1) / 2
    return float(torch.logsumexp(torch.stack(parts), dim=0) - math.log(pairs))


def rankme(z: Tensor, eps: float = RANKME_EPS) -> float:
    """RankMe of ``z`` ``(N, D)``: ``exp`` of the entropy of its L1-normalised singular values (+ eps)
    (:func:`sslbench.core.health.effective_rank`, which the training's collapse check uses too)."""
    return effective_rank(_matrix(z, "RankMe"), eps)


def feature_std(z: Tensor) -> float:
    """The mean over dimensions of the (population) standard deviation over samples of the
    L2-normalised rows of ``z`` ``(N, D)``: 0 when collapsed, about ``1/sqrt(D)`` when isotropic
    (:func:`sslbench.core.health.normalised_std`)."""
    return normalised_std(_matrix(z, "feature_std", min_rows=2))
