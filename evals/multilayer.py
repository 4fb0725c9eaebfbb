"""Multi-layer linear probe: DINOv2's linear evaluation (Oquab et al. 2023, "DINOv2: Learning Robust
Visual Features without Supervision", Sec. 7 and ``dinov2/eval/linear.py`` of
facebookresearch/dinov2 at 05c66df).

- Features: the encoder is frozen; each image is encoded once (no augmentation) and its features
  are cached. A vision transformer gives the [CLS] token of each of its last ``n_blocks`` blocks
  (each through the final norm), concatenated, and with ``avgpool`` the mean of the last block's
  patch tokens after them: DINOv2's ``create_linear_input``. A convnet gives each of its last
  ``n_blocks`` stages global-average-pooled, concatenated. (A vision transformer without a class
  token contributes each block's mean patch token instead.) Intermediate layers come from timm's
  ``forward_intermediates`` (:func:`sslbench.evaluation.features.intermediate_layers`).
- Classifiers: a grid of lr x weight decay softmax classifiers trained together on the cached
  features: one forward of a batch feeds every classifier (their weights are the column blocks
  of one matrix product), the loss is the sum of their mean cross-entropies (DINOv2 sums the
  losses of its classifiers), and each has its own parameter group of one SGD optimizer:
  momentum 0.9, cosine decay to 0 over all steps (DINOv2's ``CosineAnnealingLR``), lr scaled by
  ``batch_size / 256`` (DINOv2's ``scale_lr``), weights from N(0, 0.01), bias 0 (DINOv2's
  ``LinearClassifier``); weight decay on the weights only. Every classifier starts from the same
  weights, drawn with ``seed``, and sees the same batches.
- Selection: the grid is trained on train minus a class-balanced validation split
  (``val_fraction`` of every class, fixed by ``seed``: :func:`sslbench.evals.linear.stratified_split`);
  the setting with the highest validation top-1 (the first in grid order among equals, as
  DINOv2's strict ``>``) is retrained on all of train and tested once. (DINOv2 picks on its
  validation set, ImageNet val, which is also its test set; here the test split picks nothing.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from sslbench.api import (
    EvalContext,
    Intermediates,
    LayerTokens,
    Option,
    Score,
    UserError,
    at_least,
    is_vision_transformer,
    register_protocol,
    split_features,
)
from sslbench.evals.knn import topk_accuracy
from sslbench.evals.linear import stratified_split

#: DINOv2's lr grid (``get_args_parser``'s ``learning_rates``), before the ``batch_size / 256`` scaling.
DEFAULT_LRS: tuple[float, ...] = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1)
#: Weight decays: sslbench's linear-probe grid (evals/linear.py); DINOv2 trains with 0 only.
DEFAULT_WEIGHT_DECAYS: tuple[float, ...] = (0.0, 1e-4, 1e-3)
MOMENTUM = 0.9  # DINOv2: torch.optim.SGD(..., momentum=0.9, weight_decay=0)
INIT_STD = 0.01  # DINOv2's LinearClassifier: weight.normal_(0, 0.01), bias 0


def layer_features(layers: Sequence[LayerTokens], n_blocks: int, avgpool: bool) -> Tensor:
    """DINOv2's ``create_linear_input`` for the output of :func:`intermediate_layers`: the class
    token of each of the last ``n_blocks`` layers (its mean token where it has no class token, a
    convnet stage's global average pool), concatenated, then with ``avgpool`` the mean patch token
    of the last layer (vision transformers with a class token only). ``(B, D')`` float32."""
    last = list(layers)[-n_blocks:]
    parts = [tokens.mean(dim=1) if cls is None else cls for cls, tokens in last]
    if avgpool and last[-1][0] is not None:
        parts.append(last[-1][1].mean(dim=1))
    return torch.cat(parts, dim=-1).float()


def _epoch_order(n: int, seed: int, epoch: int) -> Tensor:
    """The batch order of ``epoch``: a permutation drawn from (seed, epoch) alone."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch + 1))


def fit_grid(
    x: Tensor,
    y: Tensor,
    n_classes: int,
    configs: Sequence[tuple[float, float]],
    *,
    epochs: int,
    batch_size: int,
    seed: int,
) -> list[tuple[Tensor, Tensor]]:
    """Train one softmax classifier per (lr, wd) of ``configs`` on features ``x (N, D)`` and labels
    ``y (N,)``, all together (see the module docstring); ``lr`` is scaled by ``batch_size / 256``.
    Returns one (weight ``(D, C)``, bias ``(C,)``) pair per configuration."""
    n, dim = x.shape
    start = torch.randn(dim, n_classes, generator=torch.Generator().manual_seed(seed)).mul_(INIT_STD).to(x.device)
    weights = [start.clone().requires_grad_() for _ in configs]
    biases = [torch.zeros(n_classes, device=x.device, requires_grad=True) for _ in configs]
    scale = batch_size / 256.0
    groups: list[dict[str, Any]] = []
    for (lr, wd), w, b in zip(configs, weights, biases):
        groups += [{"params": [w], "lr": lr * scale, "weight_decay": wd}, {"params": [b], "lr": lr * scale, "weight_decay": 0.0}]
    opt = torch.optim.SGD(groups, lr=0.0, momentum=MOMENTUM)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * math.ceil(n / batch_size), eta_min=0.0)
    g = len(configs)
    with torch.enable_grad():
        for epoch in range(epochs):
            order = _epoch_order(n, seed, epoch).to(x.device)
            for begin in range(0, n, batch_size):
                idx = order[begin : begin + batch_size]
                logits = x[idx] @ torch.cat(weights, dim=1) + torch.cat(biases)  # (B, G*C): every classifier, one GEMM
                # the sum over classifiers of each one's mean cross-entropy: each gets its own gradient
                loss = F.cross_entropy(logits.view(-1, n_classes), y[idx].repeat_interleave(g), reduction="sum") / idx.numel()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    return [(w.detach(), b.detach()) for w, b in zip(weights, biases)]


def multilayer_probe(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    test_labels: Tensor,
    *,
    lrs: Sequence[float] = DEFAULT_LRS,
    weight_decays: Sequence[float] = DEFAULT_WEIGHT_DECAYS,
    epochs: int = 10,
    batch_size: int = 128,
    val_fraction: float = 0.1,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> tuple[dict[str, float], dict[str, Any]]:
    """The grid on cached features ``(N, D)``/``(M, D)``, selected on a validation split of train,
    the chosen setting retrained on all of train and tested.

    Returns the metrics (``multilayer_top1``, ``multilayer_top5`` with >= 5 classes,
    ``multilayer_val_top1``) and the selection (``best_lr``, ``best_wd``, ``grid_val_top1``: the
    validation top-1 of every (lr, wd), lr-major)."""
    configs = [(float(lr), float(wd)) for lr in lrs for wd in weight_decays]
    if not configs or min(c[0] for c in configs) <= 0 or min(c[1] for c in configs) < 0:
        raise UserError(f"multilayer: the lr grid must be non-empty and > 0, the wd grid non-empty and >= 0; got {list(lrs)}, {list(weight_decays)}")
    if epochs < 1 or batch_size < 1:
        raise UserError(f"multilayer: epochs and batch size must be >= 1; got {epochs}, {batch_size}")
    dev = torch.device(device) if device is not None else train_feats.device
    xtr, ytr = train_feats.to(dev, torch.float32), train_labels.to(dev, torch.long)
    xte, yte = test_feats.to(dev, torch.float32), test_labels.to(dev, torch.long)
    n_classes = max(int(ytr.max()), int(yte.max())) + 1
    fit_idx, val_idx = (i.to(dev) for i in stratified_split(ytr, val_fraction, seed))
    if val_idx.numel() == 0:
        raise UserError(f"multilayer: val_fraction={val_fraction} leaves no validation rows for {ytr.numel()} training rows; use more data")
    fitted = fit_grid(xtr[fit_idx], ytr[fit_idx], n_classes, configs, epochs=epochs, batch_size=batch_size, seed=seed)
    with torch.no_grad():
        val = [topk_accuracy(xtr[val_idx] @ w + b, ytr[val_idx], (1,))[1] for w, b in fitted]
    best = max(range(len(configs)), key=lambda i: val[i])  # max() keeps the first of equals: grid order
    ((w, b),) = fit_grid(xtr, ytr, n_classes, [configs[best]], epochs=epochs, batch_size=batch_size, seed=seed)
    ks = (1, 5) if n_classes >= 5 else (1,)
    with torch.no_grad():
        acc = topk_accuracy(xte @ w + b, yte, ks)
    metrics = {"multilayer_top1": acc[1], **({"multilayer_top5": acc[5]} if 5 in acc else {}), "multilayer_val_top1": val[best]}
    return metrics, {"best_lr": configs[best][0], "best_wd": configs[best][1], "grid_val_top1": val}


# ---------------------------------------------------------------------------------------------
# The protocol

OPTIONS = (
    Option("--multilayer-blocks", 4, "multilayer: last N ViT blocks (convnet stages) to read (default 4, DINOv2)", type=int, check=at_least(1)),
    Option(
        "--multilayer-avgpool",
        "yes",
        "multilayer: append the last block's mean patch token to the [CLS] tokens (default yes, DINOv2's avgpool; ViTs only)",
        choices=("yes", "no"),
    ),
    Option("--multilayer-epochs", 10, "multilayer: passes over the cached train features (default 10, DINOv2)", type=int, check=at_least(1)),
    Option("--multilayer-batch-size", 128, "multilayer: batch size (default 128, DINOv2)", type=int, check=at_least(1)),
)


def _features(ctx: EvalContext, split: str) -> Tensor:
    opts = ctx.opts
    key = f"multilayer:{split}:{opts.multilayer_blocks}:{opts.multilayer_avgpool}"
    if key not in ctx.cache:
        n, avgpool = opts.multilayer_blocks, opts.multilayer_avgpool == "yes"
        model = Intermediates(ctx.encoder, n, lambda layers: layer_features(layers, n, avgpool))
        ctx.cache[key] = split_features(
            model, ctx.split(split), image_size=ctx.image_size, device=ctx.device, precision=ctx.precision, num_workers=ctx.cfg.num_workers
        )
    features: Tensor = ctx.cache[key]
    return features


def _layers(ctx: EvalContext) -> str:
    n, vit = ctx.opts.multilayer_blocks, is_vision_transformer(ctx.encoder)
    if not vit:
        return f"last {n} stages, each global-average-pooled"
    if getattr(ctx.encoder, "cls_token", None) is None:
        return f"last {n} blocks (final norm), each's mean patch token (no class token)"
    pool = ", then the last block's mean patch token" if ctx.opts.multilayer_avgpool == "yes" else ""
    return f"last {n} blocks (final norm): [CLS] of each{pool}"


@register_protocol(
    "multilayer",
    options=OPTIONS,
    reuse_key=lambda cfg, opts: {
        "n_blocks": opts.multilayer_blocks,
        "avgpool": opts.multilayer_avgpool == "yes",
        "epochs": opts.multilayer_epochs,
        "batch_size": opts.multilayer_batch_size,
        "seed": opts.seed,
    },
    description="DINOv2 linear probe on the last N blocks' [CLS] (+ avgpool) or stages, lr x wd grid chosen on a validation split",
)
def multilayer(ctx: EvalContext, fraction: float | None) -> Score:
    opts = ctx.opts
    train, test = _features(ctx, "train"), _features(ctx, "test")
    metrics, chosen = multilayer_probe(
        train,
        ctx.split("train").labels,
        test,
        ctx.split("test").labels,
        epochs=opts.multilayer_epochs,
        batch_size=opts.multilayer_batch_size,
        seed=opts.seed,
        device=ctx.device,
    )
    record = {
        "layers": _layers(ctx),
        "n_blocks": opts.multilayer_blocks,
        "avgpool": opts.multilayer_avgpool == "yes",  # as asked; "layers" says what a convnet or class-token-free ViT used
        "feature_dim": int(train.shape[1]),
        "optimizer": "sgd",
        "momentum": MOMENTUM,
        "schedule": "cosine to 0",
        "lr_grid": list(DEFAULT_LRS),
        "lr_scaling": f"lr * batch_size / 256 = lr * {opts.multilayer_batch_size / 256:g}",
        "wd_grid": list(DEFAULT_WEIGHT_DECAYS),
        "init": f"weights N(0, {INIT_STD}), bias 0",
        "epochs": opts.multilayer_epochs,
        "batch_size": opts.multilayer_batch_size,
        "val_fraction": 0.1,
        "selection": "validation top-1 (class-balanced split of train), then retrain on all of train",
        "seed": opts.seed,
        **chosen,
        "reference": "Oquab et al. 2023 (DINOv2), dinov2/eval/linear.py",
    }
    return Score(metrics, record)
