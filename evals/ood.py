"""Out-of-distribution detection with the k-NN distance of frozen features.

The score of Sun et al. 2022 ("Out-of-Distribution Detection with Deep Nearest Neighbors", ICML;
github.com/deeplearning-wisc/knn-ood ``run_cifar.py`` at commit 97125c6: ``k = 50`` on CIFAR-10):
features are L2-normalised, an image's distance is the cosine distance ``1 - cos`` to its ``k``-th
nearest training feature (the run's train split), and its in-distribution score is minus that
distance (the official code ranks by the squared Euclidean distance of normalised features,
``2 - 2 cos``: the same order, so the same AUROC and FPR).

The run's test split is in-distribution (positive); each far set of ``--ood-data SPEC[,...]`` is
out-of-distribution: the test split of another data set (any data spec, read at the run's image
size), or ``corrupt:NAME:SEVERITY``, the run's own test images under a corruption of
:mod:`sslbench.evals.robustness` (e.g. ``corrupt:gaussian_noise:5``). Per far set:

- ``ood_<name>_auroc``: the area under the ROC curve in percent (ties count one half), i.e. the
  Mann-Whitney statistic, computed from average ranks;
- ``ood_<name>_fpr95``: the percentage of far images scored at or above the threshold that keeps
  95% of the in-distribution images (the largest ``t`` with ``TPR(t) >= 0.95``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from sslbench.api import EvalContext, ImageSplit, Option, Score, UserError, at_least, parse_data_spec, register_protocol
from sslbench.evals.robustness import SEVERITIES, corrupted_features
from sslbench.evals.transfer import parse_specs, spec_names, target_features

OOD_K = Option(
    "--ood-k", 50, "ood: the k of the k-th nearest training feature (default 50, Sun et al. 2022 on CIFAR-10)", type=int, check=at_least(1)
)
CORRUPT = "corrupt"  # the far set "corrupt:NAME:SEVERITY": the run's test images under a corruption
REFERENCE = "Sun et al. 2022 (ICML), github.com/deeplearning-wisc/knn-ood run_cifar.py @97125c6"


def parse_corrupt(spec: str) -> tuple[str, int] | None:
    """``'corrupt:gaussian_noise:5'`` -> ``('gaussian_noise', 5)``; None for any other spec."""
    head, _, rest = spec.partition(":")
    if head != CORRUPT:
        return None
    name, _, severity = rest.partition(":")
    if name not in SEVERITIES or severity not in ("1", "2", "3", "4", "5"):
        raise UserError(f"--ood-data {spec}: write corrupt:NAME:SEVERITY with NAME one of {', '.join(SEVERITIES)} and SEVERITY 1..5")
    return name, int(severity)


def _check_far_sets(text: str) -> str | None:
    try:
        for spec in parse_specs(text, "--ood-data"):
            if parse_corrupt(spec) is None:
                parse_data_spec(spec)
    except UserError as exc:
        return f"is not a list of far sets ({exc})"
    return None


OOD_DATA = Option(
    "--ood-data",
    "corrupt:gaussian_noise:5",
    "ood: comma-separated far sets: data specs (their test split) or corrupt:NAME:SEVERITY (the run's test set corrupted); "
    "default corrupt:gaussian_noise:5",
    metavar="SPEC[,SPEC...]",
    check=_check_far_sets,
)


def knn_distance(bank: Tensor, queries: Tensor, k: int, *, chunk_size: int = 1024) -> Tensor:
    """``(M,)`` cosine distance ``1 - cos`` of each query to its ``k``-th nearest row of ``bank``
    (both L2-normalised here; ``k`` clipped to the bank's size), on ``bank``'s device."""
    k = min(k, bank.shape[0])
    bank_t = F.normalize(bank.float(), dim=1).t()
    out = []
    for start in range(0, queries.shape[0], chunk_size):
        q = F.normalize(queries[start : start + chunk_size].to(bank.device, torch.float32), dim=1)
        out.append(1.0 - (q @ bank_t).topk(k, dim=1).values[:, -1])
    return torch.cat(out).cpu()


def auroc(score_in: Tensor, score_out: Tensor) -> float:
    """Area under the ROC curve (in-distribution positive, higher score = more in-distribution),
    from the average ranks of all scores (the Mann-Whitney U statistic; a tie counts 1/2)."""
    scores = torch.cat([score_in, score_out]).to(torch.float64)
    _, inverse, counts = torch.unique(scores, return_inverse=True, return_counts=True)
    counts = counts.to(torch.float64)
    below = torch.cumsum(counts, 0) - counts  # scores strictly below each distinct value
    ranks = (below + (counts + 1) / 2.0)[inverse]  # average 1-based rank
    n_in, n_out = score_in.numel(), score_out.numel()
    return float((ranks[:n_in].sum() - n_in * (n_in + 1) / 2.0) / (n_in * n_out))


def fpr_at_tpr(score_in: Tensor, score_out: Tensor, tpr: float = 0.95) -> float:
    """The fraction of out-of-distribution scores ``>= t``, ``t`` the largest threshold that keeps
    at least ``tpr`` of the in-distribution scores (``>= t``)."""
    ordered = torch.sort(score_in.to(torch.float64), descending=True).values
    t = ordered[math.ceil(tpr * ordered.numel() - 1e-9) - 1]
    return float((score_out.to(torch.float64) >= t).double().mean())


def far_features(ctx: EvalContext, spec: str) -> Tensor:
    """Frozen features of a far set: the corrupted run's test images, or another data set's test split."""
    corruption = parse_corrupt(spec)
    if corruption is None:
        feats, _ = target_features(ctx, spec, "test")
        features: Tensor = feats
        return features
    if not isinstance(ctx.split("test"), ImageSplit):
        raise UserError(f"--ood-data {spec}: the run's test split is read from disk; corrupting it needs it in memory: raise --max-memory-gb")
    return corrupted_features(ctx, *corruption)


def far_names(specs: list[str]) -> dict[str, str]:
    """Metric names of the far sets: ``corrupt:gaussian_noise:5`` -> ``corrupt_gaussian_noise_5``,
    a data spec as :func:`sslbench.evals.transfer.spec_names` names it."""
    names = spec_names([s for s in specs if parse_corrupt(s) is None])
    return {s: names[s] if s in names else s.replace(":", "_") for s in specs}


def _prepare(ctx: EvalContext) -> None:
    _check = _check_far_sets(ctx.opts.ood_data)
    if _check:
        raise UserError(f"--ood-data {_check}")


@register_protocol(
    "ood",
    options=[OOD_K, OOD_DATA],
    reuse_key=lambda cfg, opts: {"k": opts.ood_k, "far_sets": parse_specs(opts.ood_data, "--ood-data"), "seed": opts.seed},
    prepare=_prepare,
    uses_labels=False,
    description="OOD detection by the k-NN distance of normalised features: AUROC and FPR@95%TPR, test set vs --ood-data far sets",
)
def ood(ctx: EvalContext, fraction: float | None) -> Score:
    opts = ctx.opts
    specs = parse_specs(opts.ood_data, "--ood-data")
    names = far_names(specs)
    train, test = ctx.features()
    bank = train.to(ctx.device)
    score_in = -knn_distance(bank, test, opts.ood_k)
    metrics: dict[str, float] = {}
    sizes: dict[str, Any] = {}
    for spec in specs:
        score_out = -knn_distance(bank, far_features(ctx, spec), opts.ood_k)
        metrics[f"ood_{names[spec]}_auroc"] = 100.0 * auroc(score_in, score_out)
        metrics[f"ood_{names[spec]}_fpr95"] = 100.0 * fpr_at_tpr(score_in, score_out)
        sizes[names[spec]] = {"spec": spec, "images": int(score_out.numel())}
    record: dict[str, Any] = {
        "k": opts.ood_k,
        "k_effective": min(opts.ood_k, int(train.shape[0])),
        "far_sets": specs,
        "by_name": sizes,
        "in_distribution": f"the test split ({int(test.shape[0])} images)",
        "bank": f"the train split ({int(train.shape[0])} images)",
        "score": "minus the cosine distance to the k-th nearest train feature (L2-normalised)",
        "metrics": "AUROC and FPR at 95% TPR, percent; in-distribution positive",
        "seed": opts.seed,
        "reference": REFERENCE,
    }
    if opts.ood_k > train.shape[0]:
        record["warnings"] = [
            f"--ood-k {opts.ood_k} is more than the {int(train.shape[0])} training images: the k-th neighbour is the farthest of all"
        ]
    return Score(metrics, record)
