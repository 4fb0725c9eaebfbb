"""End-to-end fine-tuning of a pretrained encoder (plus a linear head) on a fraction of the labels.

Protocol (semi-supervised evaluation of SimCLR, Chen et al. 2020, Appendix B.5, and SimCLR v2,
Chen et al. 2020b):

- Labels: a class-balanced subset of the **training** split, ``max(1, round(fraction * n_c))``
  images of each class ``c`` (:func:`sslbench.data.balanced_subset`), fixed by ``seed``; the
  default fractions are 1%, 10% and 100%. The test split is only used for the final report.
- Model: a *copy* of the encoder (the caller's encoder, and the run's ``encoder.safetensors``,
  are never modified), optionally followed by the first ``k`` hidden layers of the method's
  projector (``from_projector_layer=k``; SimCLR v2 fine-tunes from the first layer of its 3-layer
  projector, i.e. ``encoder -> Linear -> BN -> ReLU``), then a linear head initialised to zero.
  Every parameter is trained; BatchNorm layers use batch statistics while training.
- Optimisation (``optimizer``, default ``auto``: AdamW for vision transformers, SGD otherwise;
  :func:`resolve_optimizer`): SGD with Nesterov momentum 0.9 and no weight decay (SimCLR: "we do
  not use any regularization"), a cosine learning-rate decay to zero over all steps without
  warm-up, and cross-entropy; or for ViTs MAE's fine-tuning optimizer (He et al. 2022, App. A.2):
  AdamW, betas (0.9, 0.999), weight decay 0.05 (not on biases, norms, position embeddings and
  class tokens), lr 1e-3, a linear warm-up over the first 5% of the steps, then cosine. SGD at
  0.2 diverges on a trained ViT-Tiny's pooled feature, whose second moment is 5.6x a ResNet-18's;
  Adam's step does not scale with it. From a projector layer the lr is scaled down to the curvature of the start
  (``lr_scaling="curvature"``, the default; :func:`start_lr_factor`): the zero-initialised head's
  loss has curvature proportional to the largest eigenvalue of ``E[f f^T]`` of the features ``f``
  it reads, about 10x larger on 2,048 post-ReLU projector features than on the encoder's, so the
  lr that is right from the encoder diverges there (SimCLR v2 fine-tunes with LARS, whose
  per-layer trust ratio does not act on a zero-initialised head). From the encoder, and with
  AdamW, the scale is 1. Optionally a layer-wise learning-rate decay for vision transformers
  (``layer_decay``, BEiT's and MAE's fine-tuning, 0.75 in MAE: see :func:`layer_decay_groups`);
  the default 1.0 trains every layer at the same rate. The base ``lr`` (SGD's default 0.2) is not scaled with the batch: SimCLR's
  ``0.05 * B / 256`` comes with batches of 4096 and long schedules; on small labelled subsets and
  short schedules it barely moves the model (on digits, 0.2 fine-tunes to ~94% where 0.05 gives
  ~64% in the same steps).
- Augmentation: random resized crop (scale 0.08-1, as Inception/SimCLR) and horizontal flip only,
  computed by :class:`sslbench.core.augment.BatchAugment` with colour jitter, grayscale, blur and
  solarisation off; randomness is a pure function of ``(seed, epoch, image index)``.
- Length: ``epochs`` (default 10) passes over the labelled subset in full mini-batches of
  ``min(batch_size, n)`` images (seeded order; a remainder smaller than a batch is left out of that
  epoch), and at least ``min_steps`` (default 200) optimizer steps: a 1% subset is one batch, so
  ten epochs alone would be ten steps (SimCLR fine-tunes 1% of ImageNet for 60 epochs and 10% for
  30). See :func:`finetune_steps`.
- Evaluation: the test split through :func:`sslbench.core.augment.eval_batch` (resize, centre crop,
  normalise) with the model in eval mode; top-1 and (with >= 5 classes) top-5 accuracy in percent.

Given the same inputs and seed the result is deterministic on the CPU (no weight is initialised at
random: the head starts at zero).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sslbench.api import (
    AugmentConfig,
    BatchAugment,
    ImageSplit,
    UserError,
    autocast,
    balanced_subset,
    check_fraction,
    eval_batch,
    eval_mode,
    module_device,
)
from sslbench.evals.knn import topk_accuracy

DEFAULT_FRACTIONS: tuple[float, ...] = (0.01, 0.1, 1.0)
DEFAULT_EPOCHS = 10
DEFAULT_BATCH_SIZE = 256
DEFAULT_LR = 0.2
DEFAULT_MIN_STEPS = 200
DEFAULT_LAYER_DECAY = 1.0  # no layer-wise lr decay (MAE fine-tunes ViTs with 0.75)
LR_SCALINGS = ("curvature", "none")  # how the lr is set for a start after projector layers
DEFAULT_LR_SCALING = "curvature"
CURVATURE_IMAGES = 2048  # labelled images (a seeded sample when there are more) that measure it
MOMENTUM = 0.9
CROP_SCALE = (0.08, 1.0)
# ``auto``: AdamW for vision transformers (encoders with a patch embedding), SGD otherwise
OPTIMIZERS = ("auto", "sgd", "adamw")
DEFAULT_OPTIMIZER = "auto"
DEFAULT_LRS = {"sgd": DEFAULT_LR, "adamw": 1e-3}  # the lr when none is given (AdamW: MAE's ViT-L base lr)
ADAMW_BETAS = (0.9, 0.999)  # MAE's fine-tuning (torch's defaults)
ADAMW_WEIGHT_DECAY = 0.05  # MAE's fine-tuning; not on biases, norms, position embeddings, class tokens
ADAMW_WARMUP = 0.05  # fraction of the steps with a linear lr warm-up (MAE: 5 of 100 epochs)


def optimizer_record(optimizer: str = "sgd") -> dict[str, object]:
    """How :func:`train_classifier` optimises with ``optimizer`` (``sgd`` or ``adamw``), for result
    rows (fine-tuning and distillation)."""
    if optimizer == "adamw":
        return {
            "optimizer": "adamw",
            "betas": list(ADAMW_BETAS),
            "weight_decay": ADAMW_WEIGHT_DECAY,
            "weight_decay_exempt": "biases, norms, position embeddings, class tokens",
            "schedule": f"linear warm-up over {ADAMW_WARMUP:.0%} of the steps, then cosine to 0",
        }
    return {"optimizer": "sgd", "momentum": MOMENTUM, "nesterov": True, "weight_decay": 0.0, "schedule": "cosine to 0, no warm-up"}


OPTIMIZER_RECORD = optimizer_record("sgd")


def applied_lr_scaling(lr_scaling: str, optimizer: str) -> str:
    """The lr scaling fine-tuning applies: ``lr_scaling`` with SGD; ``none`` with AdamW, whose step
    does not grow with the head's curvature."""
    return lr_scaling if optimizer == "sgd" else "none"


def resolve_optimizer(optimizer: str, encoder: nn.Module) -> str:
    """The fine-tuning optimizer ``optimizer`` names for ``encoder``: ``auto`` is ``adamw`` for a
    vision transformer (:func:`sslbench.backbones.is_vision_transformer`; MAE's and BEiT's fine-tuning) and ``sgd``
    otherwise (SimCLR's); a :class:`UserError` for an unknown name."""
    if optimizer not in OPTIMIZERS:
        raise UserError(f"unknown fine-tuning optimizer {optimizer!r}; use one of {', '.join(OPTIMIZERS)}")
    if optimizer == "auto":
        from sslbench.api import is_vision_transformer

        return "adamw" if is_vision_transformer(encoder) else "sgd"
    return optimizer


def fraction_tag(fraction: float) -> str:
    """``0.01 -> '1pct'``, ``0.1 -> '10pct'``, ``1 -> '100pct'``, ``0.005 -> '0.5pct'``."""
    pct = round(check_fraction(fraction) * 100, 6)
    return f"{pct:g}pct"


def metric_name(fraction: float, kind: str = "top1") -> str:
    """The metric name of a fine-tuning result, e.g. ``finetune_10pct_top1``: the fraction is part
    of the name so that a leaderboard keeps the fractions apart."""
    return f"finetune_{fraction_tag(fraction)}_{kind}"


def label_subset(train: ImageSplit, fraction: float, seed: int) -> tuple[ImageSplit, Tensor]:
    """The labelled training subset for ``fraction`` and its (sorted) indices into ``train``:
    class-balanced, drawn from the training split only, fixed by ``seed``."""
    idx = balanced_subset(train.labels, check_fraction(fraction), seed)
    return train.subset(idx), idx


def projector_layers(run_dir: str | Path, layers: int) -> nn.Sequential:
    """The first ``layers`` hidden layers (``Linear -> BatchNorm -> ReLU`` blocks) of the method's
    projector, with the trained weights of ``RUN_DIR/method.safetensors`` (strictly checked): the
    head of feature depth ``proj<layers>`` (:func:`sslbench.evaluation.features.depth_head`).

    ``layers=1`` on a SimCLR v2 run (``method_cfg.projector=v2``, a 3-layer projector) gives the
    SimCLR v2 fine-tuning start ``projector[0:3]``. Raises :class:`UserError` when the method has no
    ``projector`` or it has fewer hidden layers.
    """
    from sslbench.api import depth_head, hidden_layer_ends, load_projector, load_run_config

    projector = load_projector(run_dir)
    method = load_run_config(run_dir).method
    if not isinstance(projector, nn.Sequential):
        raise UserError(f"method {method!r} has no projector to fine-tune from; use from_projector_layer=0")
    n = len(hidden_layer_ends(projector))
    if not 1 <= layers <= n:
        raise UserError(f"from_projector_layer must be in 0..{n} for this {method} projector ({n} hidden layer(s)), got {layers}")
    head = depth_head(projector, f"proj{layers}", method=method)
    assert isinstance(head, nn.Sequential)
    return head


class FinetuneModel(nn.Module):
    """``encoder -> [projector layers] -> Linear(D, C)`` with a zero-initialised head."""

    def __init__(self, encoder: nn.Module, num_classes: int, *, projector: nn.Module | None = None, image_size: int = 32) -> None:
        super().__init__()
        self.encoder = encoder
        self.projector = projector if projector is not None else nn.Identity()
        with eval_mode(self), torch.no_grad():
            probe = torch.zeros(2, 3, image_size, image_size, device=module_device(encoder))
            dim = self.features(probe).shape[1]
        self.head = nn.Linear(dim, num_classes).to(module_device(encoder))
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.lr_factor = 1.0  # set by finetune_model: :func:`start_lr_factor`
        self.optimizer = "sgd"  # set by finetune_model: the optimizer it trained with
        self.lr = DEFAULT_LR  # set by finetune_model: the base lr it trained with (before lr_factor)

    def features(self, x: Tensor) -> Tensor:
        out: Tensor = self.projector(self.encoder(x).flatten(1))
        return out

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.head(self.features(x))
        return out


def layer_decay_groups(model: FinetuneModel, decay: float) -> list[dict[str, Any]]:
    """Optimizer groups of ``model`` with a layer-wise learning-rate decay: ``lr_scale = decay **
    (L + 1 - layer)`` for a vision transformer encoder of L blocks, where the embeddings (patch
    and position embeddings, class and register tokens) are layer 0, block i is layer i + 1 and
    everything after the blocks (the final norm, projector layers, the head) is layer L + 1
    (scale 1). This is the rule of BEiT (Bao et al. 2022) and of MAE's fine-tuning (He et al.
    2022, Appendix A.2; ``util/lr_decay.py`` of the official code), decay 0.75 for ViT-B.

    An encoder without a ``blocks`` sequence (not a transformer) is a :class:`UserError` unless
    ``decay == 1`` (one group, scale 1)."""
    if decay == 1.0:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "lr_scale": 1.0}]
    blocks = getattr(model.encoder, "blocks", None)
    if not isinstance(blocks, (nn.Sequential, nn.ModuleList)) or len(blocks) == 0:
        name = getattr(model.encoder, "pretrained_cfg", {}).get("architecture") or type(model.encoder).__name__
        raise UserError(f"--finetune-layer-decay {decay:g} needs a vision transformer encoder (timm blocks); {name} has none, use 1")
    n_blocks = len(blocks)
    embeddings = ("patch_embed", "pos_embed", "cls_token", "reg_token", "dist_token", "pos_embed_prefix")

    def layer(name: str) -> int:
        if name.split(".")[0] in embeddings:
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return n_blocks + 1

    groups: dict[int, list[nn.Parameter]] = {}
    for name, p in model.encoder.named_parameters():
        if p.requires_grad:
            groups.setdefault(layer(name), []).append(p)
    rest = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("encoder.")]
    groups.setdefault(n_blocks + 1, []).extend(rest)
    return [{"params": ps, "lr_scale": decay ** (n_blocks + 1 - i)} for i, ps in sorted(groups.items())]


def finetune_groups(model: FinetuneModel, decay: float, weight_decay: float = 0.0) -> list[dict[str, Any]]:
    """The optimizer groups of fine-tuning: :func:`layer_decay_groups` (each group's ``lr_scale``),
    each split into parameters with ``weight_decay`` and parameters without any: biases and norms
    (:func:`sslbench.core.optim.is_no_decay`) and what the encoder lists in timm's ``no_weight_decay()``
    (position embeddings, class tokens), as MAE's ``param_groups_lrd``."""
    from sslbench.api import is_no_decay, param_groups

    scale = {id(p): g["lr_scale"] for g in layer_decay_groups(model, decay) for p in g["params"]}
    listed = getattr(model.encoder, "no_weight_decay", None)
    skip = set(listed()) if callable(listed) else set()

    def exempt(module: nn.Module, name: str, p: nn.Parameter) -> bool:
        return is_no_decay(module, name, p) or (module is model.encoder and name in skip)

    out: list[dict[str, Any]] = []
    for group in param_groups(model, weight_decay, exempt):
        by_scale: dict[float, list[nn.Parameter]] = {}
        for p in group["params"]:
            by_scale.setdefault(scale[id(p)], []).append(p)
        out += [{"params": ps, "lr_scale": s, "weight_decay": group["weight_decay"]} for s, ps in sorted(by_scale.items())]
    return out


def top_second_moment(features: Tensor, *, tol: float = 1e-6, max_iter: int = 1000) -> float:
    """The largest eigenvalue of the uncentred second moment ``E[f f^T] = X^T X / N`` of
    ``features`` X (N, D), in float64 by power iteration started at the mean feature (the dominant
    direction of post-ReLU features). For a linear head on these features, this is the scale of the
    softmax cross-entropy's curvature in the head's weights, which bounds the stable SGD step."""
    x = features.detach().double().flatten(1)
    n = x.shape[0]
    v = x.mean(0)
    if not bool(v.norm() > 0):
        v = torch.ones_like(v)
    v = v / v.norm()
    lam = 0.0
    for _ in range(max_iter):
        w = x.T @ (x @ v) / n
        new = float(w.norm())
        if new == 0.0:
            return 0.0
        v = w / new
        if abs(new - lam) <= tol * new:
            return new
        lam = new
    return lam


@torch.no_grad()
def start_lr_factor(model: FinetuneModel, images: Tensor, *, image_size: int, seed: int, precision: str = "no") -> float:
    """The factor of the fine-tuning lr for ``model``'s start: ``min(1, lambda(h) / lambda(f))``,
    where ``lambda`` is :func:`top_second_moment` of the encoder's features ``h`` and of the
    features ``f`` the head reads (after the projector layers), both in eval mode on centre crops
    of ``images`` (at most :data:`CURVATURE_IMAGES`, a sample fixed by ``seed``). 1 without
    projector layers. The lr that suits fine-tuning from h then takes the same step relative to the
    head's curvature from a projector layer; it is never raised."""
    if isinstance(model.projector, nn.Identity):
        return 1.0
    from sslbench.api import extract_features

    if images.shape[0] > CURVATURE_IMAGES:
        pick = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(seed))[:CURVATURE_IMAGES]
        images = images[pick.sort().values.to(images.device)]
    dev = module_device(model.encoder)
    with eval_mode(model):
        h = extract_features(model.encoder, images, image_size=image_size, device=dev, precision=precision).to(dev)
        f = torch.cat([model.projector(c).float() for c in h.split(1024)])
    lam_h, lam_f = top_second_moment(h), top_second_moment(f)
    return 1.0 if lam_f <= lam_h else lam_h / lam_f


@torch.no_grad()
def _evaluate(model: nn.Module, test: ImageSplit, image_size: int, device: torch.device, precision: str, batch_size: int = 256) -> dict[str, float]:
    n_classes = len(test.classes)
    ks = (1, 5) if n_classes >= 5 else (1,)
    chunks = []
    with eval_mode(model), autocast(device, precision):
        for start in range(0, len(test), batch_size):
            x = eval_batch(test.images[start : start + batch_size].to(device), image_size)
            chunks.append(model(x).float().cpu())
    acc = topk_accuracy(torch.cat(chunks), test.labels, ks)
    return {f"top{k}": v for k, v in acc.items()}


def finetune(encoder: nn.Module, train: ImageSplit, test: ImageSplit, **kwargs: Any) -> dict[str, float]:
    """Fine-tune a copy of ``encoder`` (and of ``projector``, when given) with a linear head on the
    class-balanced ``fraction`` of ``train``; report test accuracy.

    Returns ``{metric_name(fraction, 'top1'): ..., metric_name(fraction, 'top5'): ...}`` (top-5
    with >= 5 classes), e.g. ``finetune_10pct_top1``. ``encoder`` and ``projector`` are left
    untouched. Takes the keyword arguments of :func:`finetune_model`; see the module docstring
    for the protocol.
    """
    return finetune_model(encoder, train, test, **kwargs)[1]


def finetune_model(
    encoder: nn.Module,
    train: ImageSplit,
    test: ImageSplit,
    *,
    fraction: float = 1.0,
    image_size: int,
    epochs: int = DEFAULT_EPOCHS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    lr: float | None = None,
    seed: int = 0,
    projector: nn.Module | None = None,
    device: torch.device | str | None = None,
    precision: str = "no",
    min_steps: int = DEFAULT_MIN_STEPS,
    crop_scale: tuple[float, float] = CROP_SCALE,
    layer_decay: float = DEFAULT_LAYER_DECAY,
    lr_scaling: str = DEFAULT_LR_SCALING,
    optimizer: str = DEFAULT_OPTIMIZER,
) -> tuple[FinetuneModel, dict[str, float]]:
    """:func:`finetune`, also returning the fine-tuned model (in eval mode; the teacher of
    :mod:`sslbench.evals.distill`; its ``lr_factor`` is the factor :func:`start_lr_factor` applied
    to ``lr``, 1 with ``lr_scaling="none"`` or AdamW). ``optimizer``: ``auto`` (AdamW for a vision
    transformer, SGD otherwise: :func:`resolve_optimizer`), ``sgd`` or ``adamw``; ``lr`` None: that
    optimizer's :data:`DEFAULT_LRS`."""
    fraction = check_fraction(fraction)
    optimizer = resolve_optimizer(optimizer, encoder)
    lr = DEFAULT_LRS[optimizer] if lr is None else lr
    if epochs < 1 or batch_size < 1 or not lr > 0 or min_steps < 0:
        raise UserError(f"fine-tuning needs epochs >= 1, batch_size >= 1, lr > 0 and min_steps >= 0; got {epochs}, {batch_size}, {lr}, {min_steps}")
    if not 0.0 < layer_decay <= 1.0:
        raise UserError(f"the layer-wise lr decay must be in (0, 1], got {layer_decay}")
    if lr_scaling not in LR_SCALINGS:
        raise UserError(f"unknown fine-tuning lr scaling {lr_scaling!r}; use one of {', '.join(LR_SCALINGS)}")
    if not isinstance(train, ImageSplit) or not isinstance(test, ImageSplit):
        raise UserError("fine-tuning needs in-memory splits; raise max_memory_gb or use a smaller data set")
    dev = torch.device(device) if device is not None else module_device(encoder)
    subset, _ = label_subset(train, fraction, seed)
    n_classes = max(len(train.classes), int(train.labels.max()) + 1, int(test.labels.max()) + 1)

    model = FinetuneModel(
        copy.deepcopy(encoder).to(dev),
        n_classes,
        projector=copy.deepcopy(projector).to(dev) if projector is not None else None,
        image_size=image_size,
    )
    n = len(subset)
    if n < 2:
        raise UserError(f"label fraction {fraction} leaves {n} labelled image; fine-tuning needs at least 2")
    labels = subset.labels.to(dev)
    if applied_lr_scaling(lr_scaling, optimizer) == "curvature":
        model.lr_factor = start_lr_factor(model, subset.images, image_size=image_size, seed=seed, precision=precision)
    adamw = optimizer == "adamw"
    model.optimizer, model.lr = optimizer, lr
    steps = finetune_steps(n, epochs=epochs, batch_size=batch_size, min_steps=min_steps)

    def loss_fn(logits: Tensor, idx: Tensor, x: Tensor) -> Tensor:
        return F.cross_entropy(logits, labels[idx])

    train_classifier(
        model,
        subset.images.to(dev),
        loss_fn,
        steps=steps,
        batch_size=batch_size,
        lr=lr * model.lr_factor,
        seed=seed,
        image_size=image_size,
        precision=precision,
        crop_scale=crop_scale,
        what="fine-tuning",
        groups=finetune_groups(model, layer_decay, ADAMW_WEIGHT_DECAY if adamw else 0.0),
        optimizer=optimizer,
        warmup_steps=warmup_steps(steps) if adamw else 0,
    )
    acc = _evaluate(model, test, image_size, dev, precision)
    return model.eval(), {metric_name(fraction, k): v for k, v in acc.items()}


def train_classifier(
    model: nn.Module,
    images: Tensor,
    loss_fn: Callable[[Tensor, Tensor, Tensor], Tensor],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    image_size: int,
    precision: str,
    crop_scale: tuple[float, float] = CROP_SCALE,
    what: str = "fine-tuning",
    groups: list[dict[str, Any]] | None = None,
    optimizer: str = "sgd",
    warmup_steps: int = 0,
) -> None:
    """Train every parameter of ``model`` for ``steps`` optimizer steps on uint8 ``images`` (N, 3,
    H, W) on the model's device: SGD with Nesterov momentum 0.9 and no weight decay, or AdamW
    (``optimizer="adamw"``: betas :data:`ADAMW_BETAS`, each group's ``weight_decay``), lr
    warmed up linearly over ``warmup_steps`` and cosine-decayed from ``lr`` to zero
    (:func:`sslbench.core.optim.lr_at`), full batches of ``min(batch_size, N)`` in a seeded order (a
    remainder smaller than a batch is left out of its epoch), each image a random resized crop
    (``crop_scale``) with a horizontal flip (randomness a pure function of seed, epoch and image
    index). ``loss_fn(logits (B, C) float32, idx (B,), x (B, 3, S, S))`` gives the loss of the
    batch of images ``idx`` whose augmented views ``x`` the model saw. ``groups``: optimizer groups
    whose ``lr_scale`` multiplies their lr (:func:`layer_decay_groups`; default: every parameter at
    scale 1). Shared by fine-tuning and distillation."""
    dev = images.device
    n = images.shape[0]
    aug = BatchAugment(
        AugmentConfig(crop_scale=(float(crop_scale[0]), float(crop_scale[1])), flip_p=0.5, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, solarize_p=0.0),
        image_size,
    )
    from sslbench.api import build_optimizer, lr_at, set_lr

    if groups is None:
        groups = [{"params": [p for p in model.parameters() if p.requires_grad], "lr_scale": 1.0}]
    if optimizer == "adamw":
        opt = build_optimizer("adamw", groups, lr, weight_decay=0.0, betas=ADAMW_BETAS)
    elif optimizer == "sgd":
        opt = torch.optim.SGD(groups, lr=lr, momentum=MOMENTUM, nesterov=True, weight_decay=0.0)
    else:
        raise UserError(f"unknown {what} optimizer {optimizer!r}; use sgd or adamw")
    # fp16 gradients underflow without loss scaling (as the trainer's fp16 does through Accelerate);
    # a pass-through for float32 and bf16
    scaler = torch.amp.GradScaler(dev.type, enabled=precision == "fp16")
    batch = min(batch_size, n)
    steps_per_epoch = max(1, n // batch)  # full batches only (BatchNorm never sees a batch of one)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    step = epoch = 0
    with torch.enable_grad():
        while step < steps:
            order = torch.randperm(n, generator=gen)
            for b in range(min(steps_per_epoch, steps - step)):
                set_lr(opt, lr_at(step, steps, base_lr=lr, warmup_steps=warmup_steps))
                idx_dev = order[b * batch : (b + 1) * batch].to(dev)
                x = aug(images[idx_dev], idx_dev, seed=seed, epoch=epoch, view=0)
                with autocast(dev, precision):
                    logits = model(x)
                loss = loss_fn(logits.float(), idx_dev, x)
                if not torch.isfinite(loss):
                    raise UserError(f"{what} diverged (non-finite loss at step {step}); lower the {what} lr (now {lr})")
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                step += 1
            epoch += 1


def warmup_steps(steps: int) -> int:
    """Warm-up steps of an AdamW fine-tuning of ``steps`` steps: :data:`ADAMW_WARMUP` of them, at
    least 1."""
    return max(1, round(ADAMW_WARMUP * steps))


def finetune_steps(n: int, *, epochs: int, batch_size: int, min_steps: int) -> int:
    """Optimizer steps of a fine-tuning run on ``n`` labelled images: ``epochs`` passes of full
    batches of ``min(batch_size, n)`` images, and at least ``min_steps``."""
    return max(epochs * max(1, n // min(batch_size, n)), min_steps)


def finetune_protocol(
    *,
    fraction: float,
    n_labelled: int,
    epochs: int = DEFAULT_EPOCHS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    lr: float = DEFAULT_LR,
    seed: int = 0,
    from_projector_layer: int | str = 0,
    min_steps: int = DEFAULT_MIN_STEPS,
    crop_scale: tuple[float, float] = CROP_SCALE,
    layer_decay: float = DEFAULT_LAYER_DECAY,
    lr_scaling: str = DEFAULT_LR_SCALING,
    lr_factor: float = 1.0,
    optimizer: str = "sgd",
) -> dict[str, Any]:
    """A self-describing record of the fine-tuning protocol, for result rows (``from_projector_layer``:
    0 for h, K for the first K hidden projector layers, ``"z"`` for the whole projector;
    ``lr_factor``: the factor of ``lr`` that ``lr_scaling`` gave, :func:`start_lr_factor`;
    ``optimizer``: the one used, ``sgd`` or ``adamw``, with its warm-up steps)."""
    steps = finetune_steps(n_labelled, epochs=epochs, batch_size=batch_size, min_steps=min_steps)
    return {
        "name": "finetune",
        "label_fraction": check_fraction(fraction),
        "labelled_images": n_labelled,
        "subset": "class-balanced max(1, round(fraction * n_c)) per class of the train split, fixed by seed",
        "seed": seed,
        "from_projector_layer": from_projector_layer,
        "head": "linear, zero init",
        **optimizer_record(optimizer),
        **({"warmup_steps": warmup_steps(steps)} if optimizer == "adamw" else {}),
        "lr": lr,
        "lr_scaling": lr_scaling,
        "lr_factor": lr_factor,
        "layer_decay": layer_decay,
        "epochs": epochs,
        "min_steps": min_steps,
        "steps": steps,
        "batch_size": batch_size,
        "augmentation": f"random resized crop (scale {crop_scale[0]}-{crop_scale[1]}) + horizontal flip",
        "reference": "Chen et al. 2020 (SimCLR, App. B.5); Chen et al. 2020b (SimCLR v2)",
    }


def finetune_fractions(
    encoder: nn.Module,
    train: ImageSplit,
    test: ImageSplit,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    **kwargs: Any,
) -> dict[float, dict[str, float]]:
    """:func:`finetune` at each label fraction: ``{fraction: metrics}``."""
    return {check_fraction(f): finetune(encoder, train, test, fraction=f, **kwargs) for f in fractions}
