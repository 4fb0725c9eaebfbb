"""k-nearest-neighbour classification on frozen features.

The weighted protocol is the one of InstDisc (Wu et al. 2018, "Unsupervised Feature Learning via
Non-Parametric Instance Discrimination", CVPR), used by most SSL code bases (e.g. solo-learn):
features are L2-normalised, similarity is the cosine, the ``k = 200`` most similar training
images vote, and each vote for its class weighs ``exp(sim / T)`` with ``T = 0.1``. The score of
a class is the sum of the weights of the neighbours that carry it.

With ``weighted=False`` every neighbour votes 1 (a majority vote). Ties between classes are
broken exactly as scikit-learn's ``KNeighborsClassifier`` does for uniform weights: its
``predict`` returns ``classes_[argmax(votes)]`` (or ``scipy.stats.mode``), i.e. the *smallest*
class index among the most voted ones. :func:`topk_accuracy` ranks classes with a stable sort,
so the same rule holds for top-1 and top-5 here.

The test set is processed in chunks of ``chunk_size`` rows, so only a ``(chunk_size, N_train)``
block of the similarity matrix exists at a time (a 50,000 x 10,000 matrix is never held whole).
Everything runs on the device of ``train_feats``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from sslbench.api import UserError


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; half precisions and float32 compute in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def knn_classify(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    *,
    k: int = 200,
    temperature: float = 0.1,
    weighted: bool = True,
    num_classes: int | None = None,
    chunk_size: int = 1024,
) -> Tensor:
    """Class scores ``(M, C)`` of the test rows from their ``k`` nearest training rows.

    Args:
        train_feats: ``(N, D)`` training features (any scale; they are L2-normalised here).
        train_labels: ``(N,)`` integer labels in ``[0, C)``.
        test_feats: ``(M, D)`` test features; moved chunk by chunk to ``train_feats.device``.
        k: neighbours per test row; clipped to ``N``.
        temperature: ``T`` of the ``exp(sim / T)`` vote weight (ignored when not weighted).
        weighted: ``exp(sim / T)`` votes (InstDisc) if True, one vote per neighbour if False.
        num_classes: ``C``; defaults to ``max(train_labels) + 1``.
        chunk_size: test rows per similarity block.

    Returns:
        Scores ``(M, C)`` on ``train_feats.device``: summed vote weights (weighted) or vote
        counts (majority vote). float64 when the training features are float64, else float32.
        Weighted scores are scaled per test row by ``exp(-s_max / T)`` (``s_max``: the row's
        highest similarity), which keeps them finite at any temperature and changes no ranking.
    """
    if train_feats.ndim != 2 or test_feats.ndim != 2 or train_feats.shape[1] != test_feats.shape[1]:
        raise UserError(f"k-NN needs (N, D) train and (M, D) test features; got {tuple(train_feats.shape)} and {tuple(test_feats.shape)}")
    if train_labels.shape != (train_feats.shape[0],):
        raise UserError(f"train_labels must have shape ({train_feats.shape[0]},); got {tuple(train_labels.shape)}")
    if train_feats.shape[0] == 0:
        raise UserError("k-NN needs at least one training feature")
    if k < 1 or chunk_size < 1:
        raise UserError(f"k and chunk_size must be >= 1; got k={k}, chunk_size={chunk_size}")
    if weighted and not temperature > 0:
        raise UserError(f"temperature must be > 0, got {temperature}")

    device = train_feats.device
    dtype = _work_dtype(train_feats.dtype)
    labels = train_labels.to(device=device, dtype=torch.long)
    n_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    if int(labels.min()) < 0 or int(labels.max()) >= n_classes:
        raise UserError(f"train labels must lie in [0, {n_classes}); got [{int(labels.min())}, {int(labels.max())}]")
    k = min(k, train_feats.shape[0])

    train_t = F.normalize(train_feats.to(dtype), dim=1).t()  # (D, N), normalised once
    scores = torch.zeros(test_feats.shape[0], n_classes, dtype=dtype, device=device)
    for start in range(0, test_feats.shape[0], chunk_size):
        query = F.normalize(test_feats[start : start + chunk_size].to(device, dtype), dim=1)
        sim = query @ train_t  # (m, N) cosine similarities
        top_sim, top_idx = sim.topk(k, dim=1)
        # exp((sim - best) / T): each row's InstDisc scores divided by exp(best / T), the same
        # ranking, and never inf (exp(sim / T) overflows float32 for T < ~0.011).
        votes = ((top_sim - top_sim[:, :1]) / temperature).exp() if weighted else torch.ones_like(top_sim)
        scores[start : start + query.shape[0]].scatter_add_(1, labels[top_idx], votes)
    return scores


def topk_accuracy(scores: Tensor, labels: Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[int, float]:
    """Top-k accuracy in percent for each ``k`` in ``ks``.

    Classes are ranked by a *stable* descending sort, so among equal scores the smallest class
    index ranks first (scikit-learn's tie rule for ``argmax``/``mode``).
    """
    labels = labels.to(scores.device, torch.long)
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    hits = order[:, : max(ks)] == labels[:, None]
    n = max(labels.shape[0], 1)
    return {k: 100.0 * hits[:, :k].any(dim=1).sum().item() / n for k in ks}


def knn_eval(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    test_labels: Tensor,
    *,
    k: int = 200,
    temperature: float = 0.1,
    weighted: bool = True,
    chunk_size: int = 1024,
) -> dict[str, float]:
    """k-NN top-1 (and top-5 when there are at least 5 classes) test accuracy in percent.

    Returns ``{"knn_top1": ..., "knn_top5": ...}``; see :func:`knn_classify` for the protocol.
    """
    if test_labels.shape != (test_feats.shape[0],):
        raise UserError(f"test_labels must have shape ({test_feats.shape[0]},); got {tuple(test_labels.shape)}")
    if test_feats.shape[0] == 0:
        raise UserError("k-NN evaluation needs at least one test feature")
    if int(test_labels.min()) < 0:
        raise UserError("test labels must be >= 0")
    n_classes = max(int(train_labels.max()), int(test_labels.max())) + 1
    scores = knn_classify(
        train_feats,
        train_labels,
        test_feats,
        k=k,
        temperature=temperature,
        weighted=weighted,
        num_classes=n_classes,
        chunk_size=chunk_size,
    )
    ks = (1, 5) if n_classes >= 5 else (1,)
    acc = topk_accuracy(scores, test_labels, ks)
    out = {"knn_top1": acc[1]}
    if 5 in acc:
        out["knn_top5"] = acc[5]
    return out


def knn_bank_warning(k: int, bank: int) -> str | None:
    """The warning for a k-NN asked for more neighbours (``k``) than its memory bank holds training
    images (``bank``), or None. :func:`knn_classify` then runs with ``k = bank``: every test image is
    scored by a vote of the whole bank, nearest or not, so the accuracy says little of the features
    (with 48 training images and k=200, trained and untrained encoders scored alike)."""
    if k <= bank:
        return None
    return (
        f"k-NN k={k} is more than the {bank} training images in its memory bank, so it runs with k={bank}: every test image is "
        f"scored by a vote of all {bank}, not of its nearest neighbours, and trained and untrained features may score alike; "
        f"set knn_k below {bank} (--set knn_k=N; for a trained run, knn_k in its config.yaml) or use more training images"
    )


def knn_protocol(k: int = 200, temperature: float = 0.1, weighted: bool = True, *, bank: int | None = None) -> dict[str, Any]:
    """A self-describing record of the k-NN protocol, for result rows.

    ``k`` is the requested number of neighbours; :func:`knn_classify` clips it to the training
    set size. With ``bank`` (the number of training images scored against) the record adds
    ``k_effective`` (the k that ran) and, when ``k`` is clipped, ``warnings`` (:func:`knn_bank_warning`).
    """
    record: dict[str, Any] = {
        "name": "knn",
        "k": k,
        **({"k_effective": min(k, bank)} if bank is not None else {}),
        "temperature": temperature if weighted else None,
        "weighting": "exp(sim/T)" if weighted else "uniform (majority vote, ties -> smallest class)",
        "metric": "cosine",
        "feature_processing": "l2-normalised, frozen, no augmentation",  # "features" is the depth (h, projK, z)
        "reference": "Wu et al. 2018 (InstDisc)" if weighted else "majority vote (scikit-learn rule)",
    }
    warning = knn_bank_warning(k, bank) if bank is not None else None
    if warning is not None:
        record["warnings"] = [warning]
    return record
