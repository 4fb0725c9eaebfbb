"""Linear probe on frozen features.

Protocol (linear evaluation of Kolesnikov et al. 2019, "Revisiting Self-Supervised Visual
Representation Learning", and Chen et al. 2020, "A Simple Framework for Contrastive Learning of
Visual Representations"):

- The encoder is frozen; features are extracted once by the caller, without augmentation
  (:func:`probe_encoder` does it with :func:`sslbench.evaluation.features.extract_features`).
- Features are standardised with the mean and standard deviation of the data the classifier is
  fitted on (the training part during the search, all of train for the final fit). This is what
  a non-affine BatchNorm in front of the linear layer does at test time (He et al. 2022, MAE), it
  makes one learning-rate grid fit every backbone, and it is a fixed affine map of the features,
  so it changes no linear separability.
- Hyperparameters are chosen on a class-balanced validation split held out from the training
  set (``val_fraction`` of every class, fixed by ``seed``), never on the test set. The best
  (lr, weight decay) pair is retrained on the whole training set and evaluated once on test.
- ``optimizer="sgd"``: softmax regression trained with mini-batch SGD (momentum 0.9), a cosine
  learning-rate schedule and cross-entropy; the whole grid is trained at once (one parameter
  group per configuration, identical batches). ``optimizer="lbfgs"``: full-batch L-BFGS with a
  strong-Wolfe line search on the same objective, the ``l2``-regularised multinomial logistic
  regression of Chen et al. 2020 (transfer evaluation); ``lr`` is then the L-BFGS initial step.
- Weight decay ``wd`` means the penalty ``wd / 2 * ||W||^2`` on the weights (not the bias) for
  both optimizers, i.e. PyTorch's SGD ``weight_decay=wd``.
- Classifiers start from zero weights, so the result depends on ``seed`` only through the
  validation split and the batch order.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sslbench.api import Transform, UserError, extract_features, module_device
from sslbench.evals.knn import topk_accuracy

OPTIMIZERS = ("sgd", "lbfgs")
DEFAULT_SGD_LRS: tuple[float, ...] = (0.01, 0.1, 1.0)
DEFAULT_LBFGS_LRS: tuple[float, ...] = (1.0,)
DEFAULT_WEIGHT_DECAYS: tuple[float, ...] = (0.0, 1e-4, 1e-3)
MOMENTUM = 0.9


@dataclass
class LinearClassifier:
    """Weights ``(D, C)`` and bias ``(C,)`` of a fitted softmax classifier, plus the feature
    standardisation it was fitted with."""

    weight: Tensor
    bias: Tensor
    mean: Tensor
    std: Tensor

    def logits(self, feats: Tensor) -> Tensor:
        return ((feats - self.mean) / self.std) @ self.weight + self.bias


def default_lrs(optimizer: str) -> tuple[float, ...]:
    """The learning-rate grid used when ``lrs`` is not given."""
    return DEFAULT_LBFGS_LRS if optimizer == "lbfgs" else DEFAULT_SGD_LRS


def stratified_split(labels: Tensor, val_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Split indices ``0..N-1`` into (fit, validation), class by class.

    Each class sends ``round(val_fraction * n_c)`` of its ``n_c`` rows (chosen by ``seed``) to
    validation, keeping at least one row for fitting. Both index tensors are sorted, disjoint and
    together cover every row.
    """
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"val_fraction must be in (0, 1), got {val_fraction}")
    labels = labels.cpu()
    g = torch.Generator().manual_seed(seed)
    fit_parts, val_parts = [], []
    for c in torch.unique(labels).tolist():
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(idx.numel(), generator=g)]
        n_val = min(math.floor(val_fraction * idx.numel() + 0.5), idx.numel() - 1)
        val_parts.append(idx[:n_val])
        fit_parts.append(idx[n_val:])
    return torch.cat(fit_parts).sort().values, torch.cat(val_parts).sort().values


def _standardiser(feats: Tensor, standardize: bool) -> tuple[Tensor, Tensor]:
    if not standardize:
        return torch.zeros_like(feats[0]), torch.ones_like(feats[0])
    mean = feats.mean(dim=0)
    std = feats.std(dim=0, unbiased=False).clamp_min(1e-6)  # a constant feature maps to 0
    return mean, std


def _fit_sgd(
    x: Tensor,
    y: Tensor,
    n_classes: int,
    configs: Sequence[tuple[float, float]],
    *,
    epochs: int,
    batch_size: int,
    generator: torch.Generator,
) -> list[tuple[Tensor, Tensor]]:
    """Train one softmax classifier per (lr, wd) in ``configs`` on standardised ``x``, all at
    once on the same batches. Returns one (W, b) pair per configuration.

    The G classifiers are the column blocks of one ``(D, G*C)`` matrix, so a step is a single
    GEMM. The update is PyTorch's SGD with momentum, written out so that every column block gets
    its own lr and weight decay: ``buf = m * buf + (grad + wd * W)``, ``W -= lr_t * buf``, with
    ``lr_t = lr * (1 + cos(pi * t / T)) / 2`` (:func:`sslbench.api.cosine_between` from 1 to
    0) and no weight decay on the bias.
    """
    from sslbench.api import cosine_between

    n, dim = x.shape
    n_cfg = len(configs)
    lr = torch.tensor([c[0] for c in configs], device=x.device).repeat_interleave(n_classes)  # (G*C,)
    wd = torch.tensor([c[1] for c in configs], device=x.device).repeat_interleave(n_classes)
    weight = torch.zeros(dim, n_cfg * n_classes, device=x.device, requires_grad=True)
    bias = torch.zeros(n_cfg * n_classes, device=x.device, requires_grad=True)
    buf_w, buf_b = torch.zeros_like(weight), torch.zeros_like(bias)
    total = epochs * math.ceil(n / batch_size)
    step = 0
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator).to(x.device)
        x_epoch, y_epoch = x[order], y[order].repeat_interleave(n_cfg)  # one gather per epoch
        for start in range(0, n, batch_size):
            xb = x_epoch[start : start + batch_size]
            yb = y_epoch[start * n_cfg : (start + xb.shape[0]) * n_cfg]
            logits = (xb @ weight + bias).view(-1, n_classes)  # (B*G, C)
            # Sum over configurations of each one's mean loss: each block gets its own gradient.
            loss = F.cross_entropy(logits, yb, reduction="sum") / xb.shape[0]
            grad_w, grad_b = torch.autograd.grad(loss, (weight, bias))
            lr_t = lr * cosine_between(step, total, 1.0, 0.0)
            with torch.no_grad():
                buf_w.mul_(MOMENTUM).add_(grad_w + wd * weight)
                buf_b.mul_(MOMENTUM).add_(grad_b)
                weight.sub_(lr_t * buf_w)
                bias.sub_(lr_t * buf_b)
            step += 1
    blocks = zip(weight.detach().split(n_classes, dim=1), bias.detach().split(n_classes))
    return [(w.contiguous(), b.contiguous()) for w, b in blocks]


def _fit_lbfgs(x: Tensor, y: Tensor, n_classes: int, lr: float, wd: float, *, max_iter: int) -> tuple[Tensor, Tensor]:
    """Full-batch L-BFGS on mean cross-entropy + ``wd / 2 * ||W||^2``. Returns (W, b)."""
    w = torch.zeros(x.shape[1], n_classes, device=x.device, requires_grad=True)
    b = torch.zeros(n_classes, device=x.device, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=lr, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(x @ w + b, y) + 0.5 * wd * w.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def _fit(
    feats: Tensor,
    labels: Tensor,
    configs: Sequence[tuple[float, float]],
    *,
    n_classes: int,
    optimizer: str,
    epochs: int,
    batch_size: int,
    standardize: bool,
    seed: int,
) -> list[LinearClassifier]:
    """Fit one classifier per (lr, wd) in ``configs`` on ``feats``/``labels``."""
    mean, std = _standardiser(feats, standardize)
    x = (feats - mean) / std
    with torch.enable_grad():
        if optimizer == "sgd":
            g = torch.Generator().manual_seed(seed)
            params = _fit_sgd(x, labels, n_classes, configs, epochs=epochs, batch_size=batch_size, generator=g)
        else:
            params = [_fit_lbfgs(x, labels, n_classes, lr, wd, max_iter=epochs) for lr, wd in configs]
    return [LinearClassifier(w, b, mean, std) for w, b in params]


def _evaluate(clf: LinearClassifier, feats: Tensor, labels: Tensor, ks: tuple[int, ...]) -> tuple[dict[int, float], float]:
    """(top-k accuracies in percent, mean cross-entropy) of ``clf`` on ``feats``."""
    with torch.no_grad():
        logits = clf.logits(feats)
        return topk_accuracy(logits, labels, ks), F.cross_entropy(logits, labels).item()


def linear_probe(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    test_labels: Tensor,
    *,
    val_fraction: float = 0.1,
    lrs: Sequence[float] | None = None,
    weight_decays: Sequence[float] = DEFAULT_WEIGHT_DECAYS,
    epochs: int = 100,
    batch_size: int = 256,
    optimizer: str = "sgd",
    standardize: bool = True,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """Train a linear classifier on frozen features and report its test accuracy.

    Args:
        train_feats, train_labels: ``(N, D)`` features and ``(N,)`` labels in ``[0, C)``.
        test_feats, test_labels: ``(M, D)`` and ``(M,)``; used only for the final report.
        val_fraction: share of every training class held out to choose (lr, wd).
        lrs: learning-rate grid; default :data:`DEFAULT_SGD_LRS` for SGD and ``(1.0,)`` (the
            L-BFGS step) for L-BFGS.
        weight_decays: weight-decay grid (penalty ``wd / 2 * ||W||^2``).
        epochs: SGD passes over the data, or the L-BFGS iteration limit.
        batch_size: SGD mini-batch size (unused by L-BFGS).
        optimizer: ``sgd`` or ``lbfgs``.
        standardize: standardise features with the fitting data's mean/std (recommended).
        seed: fixes the validation split and the SGD batch order.
        device: where to train; ``None`` means ``train_feats.device``.

    Returns:
        ``linear_top1`` and (with >= 5 classes) ``linear_top5`` test accuracy in percent,
        ``linear_val_top1`` of the chosen configuration on the validation split (absent when
        the grid has a single configuration: no split is made then), and the chosen
        ``linear_best_lr`` and ``linear_best_wd``. The last two are hyperparameters rather than
        scores: record them in the row's protocol with :func:`linear_protocol`.

    The best configuration has the highest validation top-1; ties go to the lower validation
    loss, then to the earlier configuration in grid order (lr-major).
    """
    if optimizer not in OPTIMIZERS:
        raise UserError(f"optimizer must be one of {', '.join(OPTIMIZERS)}; got {optimizer!r}")
    lr_grid = tuple(float(v) for v in (default_lrs(optimizer) if lrs is None else lrs))
    wd_grid = tuple(float(v) for v in weight_decays)
    if not lr_grid or not wd_grid or min(lr_grid) <= 0 or min(wd_grid) < 0:
        raise UserError(f"the lr grid must be non-empty and > 0, the wd grid non-empty and >= 0; got lrs={lr_grid}, weight_decays={wd_grid}")
    if epochs < 1 or batch_size < 1:
        raise UserError(f"epochs and batch_size must be >= 1; got {epochs}, {batch_size}")
    if train_feats.ndim != 2 or test_feats.ndim != 2 or train_feats.shape[1] != test_feats.shape[1]:
        raise UserError(f"linear probe needs (N, D) train and (M, D) test features; got {tuple(train_feats.shape)} and {tuple(test_feats.shape)}")
    if train_labels.shape != (train_feats.shape[0],) or test_labels.shape != (test_feats.shape[0],):
        raise UserError("linear probe: labels must be 1-D with one entry per feature row")
    if train_feats.shape[0] == 0 or test_feats.shape[0] == 0:
        raise UserError("linear probe needs non-empty train and test sets")

    dev = torch.device(device) if device is not None else train_feats.device
    xtr = train_feats.detach().to(dev, torch.float32)
    ytr = train_labels.to(dev, torch.long)
    xte = test_feats.detach().to(dev, torch.float32)
    yte = test_labels.to(dev, torch.long)
    if int(ytr.min()) < 0 or int(yte.min()) < 0:
        raise UserError("linear probe: labels must be >= 0")
    n_classes = max(int(ytr.max()), int(yte.max())) + 1
    ks = (1, 5) if n_classes >= 5 else (1,)
    fit = functools.partial(
        _fit,
        n_classes=n_classes,
        optimizer=optimizer,
        epochs=epochs,
        batch_size=batch_size,
        standardize=standardize,
        seed=seed,
    )

    configs = [(lr, wd) for lr in lr_grid for wd in wd_grid]
    val_top1: float | None = None
    best = configs[0]
    if len(configs) > 1:
        fit_idx, val_idx = stratified_split(ytr, val_fraction, seed)
        fit_idx, val_idx = fit_idx.to(dev), val_idx.to(dev)
        if val_idx.numel() == 0:
            raise UserError(
                f"val_fraction={val_fraction} leaves no validation rows for {ytr.numel()} training rows; "
                "raise val_fraction or pass a single lr and weight decay"
            )
        candidates = fit(xtr[fit_idx], ytr[fit_idx], configs)
        scores = [_evaluate(clf, xtr[val_idx], ytr[val_idx], (1,)) for clf in candidates]
        # max() keeps the first of equal keys: grid order breaks the remaining ties.
        i_best = max(range(len(configs)), key=lambda i: (scores[i][0][1], -scores[i][1]))
        best, val_top1 = configs[i_best], scores[i_best][0][1]

    (final,) = fit(xtr, ytr, [best])
    acc, _ = _evaluate(final, xte, yte, ks)
    out = {"linear_top1": acc[1]}
    if 5 in acc:
        out["linear_top5"] = acc[5]
    if val_top1 is not None:
        out["linear_val_top1"] = val_top1
    out.update(linear_best_lr=best[0], linear_best_wd=best[1])
    return out


def linear_protocol(
    *,
    optimizer: str = "sgd",
    lrs: Sequence[float] | None = None,
    weight_decays: Sequence[float] = DEFAULT_WEIGHT_DECAYS,
    epochs: int = 100,
    batch_size: int = 256,
    val_fraction: float = 0.1,
    standardize: bool = True,
    seed: int = 0,
    best_lr: float | None = None,
    best_wd: float | None = None,
    train_augmentation: str | None = None,
) -> dict[str, Any]:
    """A self-describing record of the linear-probe protocol, for result rows.

    Pass the same options as to :func:`linear_probe` and the chosen ``best_lr``/``best_wd`` it
    returned. ``train_augmentation`` names the ``train_transform`` of :func:`probe_encoder`
    (``None``: training features without augmentation, the standard protocol).
    """
    sgd = optimizer == "sgd"
    return {
        "name": "linear",
        "optimizer": optimizer,
        "momentum": MOMENTUM if sgd else None,
        "schedule": "cosine" if sgd else None,
        "lr_grid": list(default_lrs(optimizer) if lrs is None else lrs),
        "wd_grid": list(weight_decays),
        "epochs": epochs,
        "batch_size": batch_size if sgd else None,
        "val_fraction": val_fraction,
        "selection": "validation top-1 (class-balanced split of train), then retrain on all of train",
        "standardize": "train mean/std" if standardize else None,
        "train_augmentation": train_augmentation,
        "seed": seed,
        "best_lr": best_lr,
        "best_wd": best_wd,
        "reference": "Kolesnikov et al. 2019; Chen et al. 2020",
    }


def probe_encoder(
    encoder: nn.Module,
    train_images: Tensor,
    train_labels: Tensor,
    test_images: Tensor,
    test_labels: Tensor,
    *,
    image_size: int,
    extract_batch_size: int = 256,
    precision: str = "no",
    transform: Transform | None = None,
    train_transform: Transform | None = None,
    val_fraction: float = 0.1,
    lrs: Sequence[float] | None = None,
    weight_decays: Sequence[float] = DEFAULT_WEIGHT_DECAYS,
    epochs: int = 100,
    batch_size: int = 256,
    optimizer: str = "sgd",
    standardize: bool = True,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """Linear probe of a frozen encoder on uint8 images: extract features, then
    :func:`linear_probe`.

    Features come from :func:`sslbench.evaluation.features.extract_features` on the encoder's own device
    (eval mode, no gradients), so the encoder's parameters, BatchNorm buffers and train/eval
    flags are left exactly as they were.

    Args:
        transform: the evaluation transform for test features (and training features unless
            ``train_transform`` is given); default :func:`sslbench.core.augment.eval_batch`.
        train_transform: hook for probing on augmented training features: when given, the
            training features are extracted once through it (one augmented view per image,
            fixed for all epochs) instead of ``transform``. ``None`` is the standard protocol.
        extract_batch_size: images per forward pass during extraction.
        device: where the probe is trained; ``None`` means the encoder's device.
        The remaining options are those of :func:`linear_probe`.
    """
    train_feats = extract_features(
        encoder,
        train_images,
        image_size=image_size,
        batch_size=extract_batch_size,
        precision=precision,
        transform=train_transform if train_transform is not None else transform,
    )
    test_feats = extract_features(
        encoder,
        test_images,
        image_size=image_size,
        batch_size=extract_batch_size,
        precision=precision,
        transform=transform,
    )
    return linear_probe(
        train_feats,
        train_labels,
        test_feats,
        test_labels,
        val_fraction=val_fraction,
        lrs=lrs,
        weight_decays=weight_decays,
        epochs=epochs,
        batch_size=batch_size,
        optimizer=optimizer,
        standardize=standardize,
        seed=seed,
        device=device if device is not None else module_device(encoder),
    )
