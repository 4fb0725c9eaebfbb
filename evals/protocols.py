"""The built-in evaluation protocols of ``sslbench eval`` and ``compare``, one registration each
(:mod:`sslbench.protocols`): k-NN, linear probe, fine-tuning at label fractions and SimCLR v2's
distillation. See ``docs/evaluation.md``.

The evaluators are imported when a protocol runs, so that registering (and ``sslbench --help``)
stays cheap.
"""

from __future__ import annotations

from typing import Any

from sslbench.errors import UserError
from sslbench.protocols import EvalContext, EvalOptions, Option, Score, at_least, positive, register_protocol, within


@register_protocol(
    "knn",
    reuse_key=lambda cfg, opts: {"k": cfg.knn_k, "temperature": cfg.knn_temperature, "weighting": "exp(sim/T)"},
    description="weighted k-NN (k and T from the run's config) on frozen features",
)
def knn(ctx: EvalContext, fraction: float | None) -> Score:
    from .knn import knn_eval, knn_protocol

    train, test = ctx.features()
    dev, cfg = ctx.device, ctx.cfg
    metrics = knn_eval(train.to(dev), ctx.train.labels.to(dev), test.to(dev), ctx.test.labels.to(dev), k=cfg.knn_k, temperature=cfg.knn_temperature)
    return Score(metrics, knn_protocol(cfg.knn_k, cfg.knn_temperature))


LINEAR_EPOCHS = Option("--linear-epochs", 100, "linear-probe epochs (default 100)", type=int, check=at_least(1))


@register_protocol(
    "linear",
    options=[LINEAR_EPOCHS],
    reuse_key=lambda cfg, opts: {"epochs": opts.linear_epochs, "seed": opts.seed, "train_augmentation": None},
    description="linear probe on frozen features (lr and weight decay chosen on a validation split)",
)
def linear(ctx: EvalContext, fraction: float | None) -> Score:
    from .linear import linear_probe, linear_protocol

    train, test = ctx.features()
    opts = ctx.opts
    metrics = linear_probe(train, ctx.train.labels, test, ctx.test.labels, epochs=opts.linear_epochs, seed=opts.seed, device=ctx.device)
    best_lr, best_wd = metrics.pop("linear_best_lr"), metrics.pop("linear_best_wd")
    return Score(metrics, linear_protocol(epochs=opts.linear_epochs, seed=opts.seed, best_lr=best_lr, best_wd=best_wd))


# ---------------------------------------------------------------------------------------------
# Fine-tuning, and distillation of the fine-tuned model

FINETUNE_OPTIONS = (
    Option("--finetune-epochs", 10, "fine-tuning epochs per label fraction (default 10)", type=int, check=at_least(1)),
    Option("--finetune-batch-size", 256, "fine-tuning batch size (default 256)", type=int, check=at_least(1)),
    Option("--finetune-lr", 0.2, "fine-tuning learning rate (default 0.2, cosine)", type=float, check=positive),
    Option("--finetune-min-steps", 200, "at least this many fine-tuning steps per fraction (default 200)", type=int, check=at_least(0)),
    Option("--from-projector-layer", 0, "fine-tune from the K-th hidden projector layer (SimCLR v2: 1); default 0: the encoder",
           type=int, metavar="K", check=at_least(0)),
    Option("--finetune-layer-decay", 1.0, "layer-wise lr decay for vision transformers, in (0, 1] (MAE: 0.75); default 1: none",
           type=float, check=lambda v: None if 0 < v <= 1 else "must be in (0, 1]"),
)
DISTILL_OPTIONS = (
    Option("--distill-epochs", 10, "distillation passes over all training images (default 10)", type=int, check=at_least(1)),
    Option("--distill-temperature", 1.0, "distillation softmax temperature (default 1)", type=float, check=positive),
    Option("--distill-label-weight", 0.0, "weight of the ground-truth loss on the labelled images, in [0, 1] (default 0: distillation only)",
           type=float, check=within(0, 1)),
    Option("--distill-student-init", "random", "student encoder: random (from scratch, as SimCLR v2) or pretrained (the run's encoder); default random",
           choices=("random", "pretrained")),
)


def _finetune_key(cfg: Any, opts: EvalOptions) -> dict[str, Any]:
    decay = opts.finetune_layer_decay
    return {"epochs": opts.finetune_epochs, "batch_size": opts.finetune_batch_size, "lr": opts.finetune_lr,
            "seed": opts.seed, "from_projector_layer": opts.from_projector_layer, "min_steps": opts.finetune_min_steps,
            # rows stored before the option existed were fine-tuned without a layer-wise decay
            "layer_decay": lambda v: v == decay or (v is None and decay == 1.0)}


def _distill_key(cfg: Any, opts: EvalOptions) -> dict[str, Any]:
    teacher = _finetune_key(cfg, opts)
    return {"epochs": opts.distill_epochs, "batch_size": opts.finetune_batch_size, "lr": opts.finetune_lr,
            "seed": opts.seed, "min_steps": opts.finetune_min_steps, "temperature": opts.distill_temperature,
            "label_weight": opts.distill_label_weight, "student_init": opts.distill_student_init,
            "teacher": lambda t: isinstance(t, dict) and all(t.get(k) == v for k, v in teacher.items())}


def _projector(ctx: EvalContext) -> Any:
    """The run's first ``--from-projector-layer`` projector layers (None for 0), loaded once; as a
    ``prepare`` hook it fails before any data is loaded."""
    if "projector" not in ctx.cache:
        from .finetune import projector_layers

        layers = ctx.opts.from_projector_layer
        ctx.cache["projector"] = projector_layers(ctx.run_dir, layers) if layers else None
    return ctx.cache["projector"]


def _prepare_finetune(ctx: EvalContext) -> Any:
    """Before any data is loaded: a layer-wise lr decay needs a transformer encoder, and the
    projector layers are loaded (:func:`_projector`)."""
    if ctx.opts.finetune_layer_decay != 1.0 and not hasattr(ctx.encoder, "blocks"):
        name = getattr(ctx.encoder, "pretrained_cfg", {}).get("architecture") or type(ctx.encoder).__name__
        raise UserError(f"--finetune-layer-decay {ctx.opts.finetune_layer_decay:g} needs a vision transformer encoder (timm blocks); {name} has none, use 1")
    return _projector(ctx)


def _teacher(ctx: EvalContext, fraction: float) -> tuple[Any, dict[str, float]]:
    """The encoder fine-tuned on ``fraction`` of the labels and its metrics, trained once for both
    the finetune row and the distillation teacher (kept only when a distillation will need it)."""
    from .finetune import finetune_model

    teachers = ctx.cache.setdefault("teachers", {})
    if fraction in teachers:
        cached: tuple[Any, dict[str, float]] = teachers[fraction]
        return cached
    opts = ctx.opts
    model_and_metrics = finetune_model(
        ctx.encoder, ctx.train, ctx.test, fraction=fraction, image_size=ctx.cfg.image_size, epochs=opts.finetune_epochs,
        batch_size=opts.finetune_batch_size, lr=opts.finetune_lr, seed=opts.seed, projector=_projector(ctx),
        device=ctx.device, precision=ctx.precision, min_steps=opts.finetune_min_steps, layer_decay=opts.finetune_layer_decay,
    )
    if "distill" in opts.protocols:
        teachers[fraction] = model_and_metrics
    return model_and_metrics


def _finetune_record(ctx: EvalContext, fraction: float) -> dict[str, Any]:
    from .finetune import finetune_protocol, label_subset

    opts = ctx.opts
    return finetune_protocol(
        fraction=fraction, n_labelled=len(label_subset(ctx.train, fraction, opts.seed)[0]), epochs=opts.finetune_epochs,
        batch_size=opts.finetune_batch_size, lr=opts.finetune_lr, seed=opts.seed,
        from_projector_layer=opts.from_projector_layer, min_steps=opts.finetune_min_steps, layer_decay=opts.finetune_layer_decay,
    )


@register_protocol(
    "finetune",
    options=FINETUNE_OPTIONS,
    reuse_key=_finetune_key,
    per_fraction=True,
    in_memory=True,
    prepare=_prepare_finetune,
    description="end-to-end fine-tuning on a class-balanced fraction of the labels",
)
def finetune(ctx: EvalContext, fraction: float | None) -> Score:
    assert fraction is not None
    return Score(_teacher(ctx, fraction)[1], _finetune_record(ctx, fraction))


@register_protocol(
    "distill",
    options=FINETUNE_OPTIONS + DISTILL_OPTIONS,
    reuse_key=_distill_key,
    per_fraction=True,
    in_memory=True,
    prepare=_prepare_finetune,
    description="SimCLR v2 distillation of the fine-tuned model into a student, on all unlabelled images",
)
def distill(ctx: EvalContext, fraction: float | None) -> Score:
    import torch

    from sslbench.backbones import create_backbone

    from .distill import distill as run_distill
    from .distill import distill_protocol
    from .finetune import label_subset

    assert fraction is not None
    opts, cfg = ctx.opts, ctx.cfg
    if opts.distill_student_init == "pretrained":
        student = ctx.encoder
    else:
        torch.manual_seed(opts.seed)
        student = create_backbone(cfg.backbone, cfg.image_size, **cfg.backbone_kwargs)
    model, _ = _teacher(ctx, fraction)
    metrics = run_distill(
        model, student, ctx.train, ctx.test, fraction=fraction, image_size=cfg.image_size, epochs=opts.distill_epochs,
        batch_size=opts.finetune_batch_size, lr=opts.finetune_lr, temperature=opts.distill_temperature,
        label_weight=opts.distill_label_weight, seed=opts.seed, device=ctx.device, precision=ctx.precision,
        min_steps=opts.finetune_min_steps,
    )
    return Score(metrics, distill_protocol(
        fraction=fraction, n_labelled=len(label_subset(ctx.train, fraction, opts.seed)[0]), n_images=len(ctx.train),
        student_init=opts.distill_student_init, epochs=opts.distill_epochs, batch_size=opts.finetune_batch_size,
        lr=opts.finetune_lr, temperature=opts.distill_temperature, label_weight=opts.distill_label_weight,
        min_steps=opts.finetune_min_steps, seed=opts.seed, teacher=_finetune_record(ctx, fraction),
    ))
