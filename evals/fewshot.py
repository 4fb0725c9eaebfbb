"""Few-shot linear evaluation: logistic regression on ``k`` labelled images per class.

The protocol of Tian et al. 2020 ("Rethinking Few-Shot Image Classification: a Good Embedding Is
All You Need?", ECCV; github.com/WangYueFt/rfs ``eval/meta_eval.py`` at commit 9337f9b): frozen
features, L2-normalised, and scikit-learn's ``LogisticRegression(solver="lbfgs", C=1,
multi_class="multinomial")`` fitted on the labelled images, scored on the whole test split.

Here the same classifier is fitted in torch (float64, full-batch L-BFGS with a strong-Wolfe line
search, on the evaluation device): it minimises scikit-learn's objective, the mean cross-entropy
plus ``||W||^2 / (2 C n)`` (bias not penalised), which is strictly convex in ``W``, so both reach
the same classifier (``tests/test_fewshot.py`` checks the accuracies are equal).

For each ``k`` and each draw ``d``, the labelled images are the ``k`` of each class with the
smallest counter-based key ``u(seed, k, d, image index)``: a pure function of ``(seed, d, k)``,
independent of the order of the split and of any RNG state. The metrics are the mean and standard
deviation (over draws, ddof 1; 0 with one draw) of the test top-1 per ``k``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from sslbench.api import EvalContext, Option, Score, UserError, at_least, counter_uniform, register_protocol

C = 1.0  # inverse L2 strength: scikit-learn's default, as RFS uses it
MAX_ITER = 1000  # L-BFGS iterations (RFS: max_iter=1000)
REFERENCE = "Tian et al. 2020 (RFS), github.com/WangYueFt/rfs eval/meta_eval.py @9337f9b"
_STREAM_BASE = 1 << 20  # the draws' counter streams sit above any training epoch


def parse_shots(text: str) -> list[int]:
    """``'1,2,5,10'`` -> ``[1, 2, 5, 10]``; each an int >= 1."""
    try:
        values = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise UserError(f"--fewshot-k: {text!r} is not a list of shots >= 1, e.g. 1,2,5,10")
    return sorted(set(values))


def _check_shots(text: str) -> str | None:
    try:
        parse_shots(text)
    except UserError:
        return "must be comma-separated ints >= 1, e.g. 1,2,5,10"
    return None


FEWSHOT_K = Option("--fewshot-k", "1,2,5,10", "few-shot: labelled images per class, comma-separated (default 1,2,5,10)", check=_check_shots)
FEWSHOT_DRAWS = Option("--fewshot-draws", 5, "few-shot: seeded draws of the labelled images per k (default 5)", type=int, check=at_least(1))


def fewshot_indices(labels: Tensor, k: int, draw: int, seed: int) -> Tensor:
    """Sorted indices of ``k`` images per class: those with the smallest key
    ``counter_uniform(seed, 2**20 + k, index, draw)`` (ties: the lower index). A class with fewer
    than ``k`` images is a :class:`UserError`."""
    labels = labels.cpu()
    keys = counter_uniform(seed, _STREAM_BASE + k, torch.arange(labels.numel()), draw, 1)[:, 0]
    chosen = []
    for c in torch.unique(labels).tolist():
        members = (labels == c).nonzero().flatten()
        if members.numel() < k:
            raise UserError(f"--fewshot-k {k}: class {c} has only {members.numel()} training images; use a smaller k")
        order = torch.sort(keys[members], stable=True).indices
        chosen.append(members[order[:k]])
    return torch.cat(chosen).sort().values


def fit_logistic(x: Tensor, y: Tensor, n_classes: int, *, c: float = C, max_iter: int = MAX_ITER) -> tuple[Tensor, Tensor]:
    """Multinomial logistic regression, scikit-learn's objective ``mean CE + ||W||^2 / (2 c n)``,
    by float64 L-BFGS on ``x``'s device. ``x (n, D)``, ``y (n,)``; returns ``W (D, C)``, ``b (C,)``."""
    x = x.to(torch.float64)
    w = torch.zeros(x.shape[1], n_classes, dtype=torch.float64, device=x.device, requires_grad=True)
    b = torch.zeros(n_classes, dtype=torch.float64, device=x.device, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, tolerance_grad=1e-10, tolerance_change=1e-14, line_search_fn="strong_wolfe")
    reg = 0.5 / (c * x.shape[0])

    def closure() -> Tensor:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(x @ w + b, y) + reg * w.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), b.detach()


def fewshot_eval(
    train_feats: Tensor, train_labels: Tensor, test_feats: Tensor, test_labels: Tensor, *, shots: list[int], draws: int, seed: int
) -> tuple[dict[str, float], dict[str, list[float]]]:
    """``fewshot_{k}_mean`` / ``fewshot_{k}_std`` test top-1 (percent) per ``k`` in ``shots``, and
    the accuracy of every draw (``{str(k): [...]}``). Runs on ``train_feats``' device."""
    dev = train_feats.device
    xtr = F.normalize(train_feats.to(torch.float64), dim=1)
    xte = F.normalize(test_feats.to(dev, torch.float64), dim=1)
    ytr, yte = train_labels.to(dev, torch.long), test_labels.to(dev, torch.long)
    n_classes = max(int(ytr.max()), int(yte.max())) + 1
    metrics: dict[str, float] = {}
    per_draw: dict[str, list[float]] = {}
    for k in shots:
        accs = []
        for d in range(draws):
            idx = fewshot_indices(train_labels, k, d, seed).to(dev)
            w, b = fit_logistic(xtr[idx], ytr[idx], n_classes)
            pred = (xte @ w + b).argmax(dim=1)  # argmax: the lowest class among equal scores, as scikit-learn
            accs.append(100.0 * (pred == yte).double().mean().item())
        acc = torch.tensor(accs, dtype=torch.float64)
        metrics[f"fewshot_{k}_mean"] = float(acc.mean())
        metrics[f"fewshot_{k}_std"] = float(acc.std()) if draws > 1 else 0.0
        per_draw[str(k)] = accs
    return metrics, per_draw


@register_protocol(
    "fewshot",
    options=[FEWSHOT_K, FEWSHOT_DRAWS],
    reuse_key=lambda cfg, opts: {"shots": parse_shots(opts.fewshot_k), "draws": opts.fewshot_draws, "seed": opts.seed, "C": C},
    per_features=True,
    description="logistic regression on k labelled images per class (L2-normalised features), mean and std over seeded draws",
)
def fewshot(ctx: EvalContext, fraction: float | None) -> Score:
    opts = ctx.opts
    shots = parse_shots(opts.fewshot_k)
    train, test = ctx.features()
    metrics, per_draw = fewshot_eval(
        train.to(ctx.device), ctx.split("train").labels, test, ctx.split("test").labels, shots=shots, draws=opts.fewshot_draws, seed=opts.seed
    )
    record = {
        "shots": shots,
        "draws": opts.fewshot_draws,
        "seed": opts.seed,
        "C": C,
        "classifier": "multinomial logistic regression, float64 L-BFGS (scikit-learn's lbfgs objective)",
        "max_iter": MAX_ITER,
        "feature_processing": "l2-normalised, frozen, no augmentation",
        "draw": "k per class with the smallest counter-based key of (seed, k, draw, index)",
        "std": "over draws, ddof 1",
        "top1_by_draw": per_draw,
        "reference": REFERENCE,
    }
    return Score(metrics, record)
