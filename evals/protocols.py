"""The built-in evaluation protocols of ``sslbench eval`` and ``compare``, one registration each
(:mod:`sslbench.protocols`): k-NN, linear probe, fine-tuning at label fractions, SimCLR v2's
distillation, and the label-free feature metrics (alignment, uniformity, RankMe, feature standard
deviation). See ``docs/evaluation.md``.

k-NN, the linear probe, fine-tuning and the label-free metrics are scored at every ``--features``
depth (``h``, ``projK``, ``z``; :func:`sslbench.evaluation.features.parse_depth`).

The evaluators are imported when a protocol runs, so that registering (and ``sslbench --help``)
stays cheap.
"""

from __future__ import annotations

from typing import Any

from sslbench.api import EvalContext, EvalOptions, Option, Score, UserError, at_least, positive, register_protocol, within


@register_protocol(
    "knn",
    reuse_key=lambda cfg, opts: {"k": cfg.knn_k, "temperature": cfg.knn_temperature, "weighting": "exp(sim/T)"},
    description="weighted k-NN (k and T from the run's config) on frozen features",
    per_features=True,
)
def knn(ctx: EvalContext, fraction: float | None) -> Score:
    from sslbench.evals.knn import knn_eval, knn_protocol

    train, test = ctx.features()
    dev, cfg = ctx.device, ctx.cfg
    metrics = knn_eval(
        train.to(dev), ctx.split("train").labels.to(dev), test.to(dev), ctx.split("test").labels.to(dev), k=cfg.knn_k, temperature=cfg.knn_temperature
    )
    return Score(metrics, knn_protocol(cfg.knn_k, cfg.knn_temperature, bank=train.shape[0]))


LINEAR_EPOCHS = Option("--linear-epochs", 100, "linear-probe epochs (default 100)", type=int, check=at_least(1))


@register_protocol(
    "linear",
    options=[LINEAR_EPOCHS],
    reuse_key=lambda cfg, opts: {"epochs": opts.linear_epochs, "seed": opts.seed, "train_augmentation": None},
    description="linear probe on frozen features (lr and weight decay chosen on a validation split)",
    per_features=True,
)
def linear(ctx: EvalContext, fraction: float | None) -> Score:
    from sslbench.evals.linear import linear_probe, linear_protocol

    train, test = ctx.features()
    opts = ctx.opts
    metrics = linear_probe(
        train, ctx.split("train").labels, test, ctx.split("test").labels, epochs=opts.linear_epochs, seed=opts.seed, device=ctx.device
    )
    best_lr, best_wd = metrics.pop("linear_best_lr"), metrics.pop("linear_best_wd")
    return Score(metrics, linear_protocol(epochs=opts.linear_epochs, seed=opts.seed, best_lr=best_lr, best_wd=best_wd))


# ---------------------------------------------------------------------------------------------
# Fine-tuning, and distillation of the fine-tuned model

FINETUNE_OPTIONS = (
    Option("--finetune-epochs", 10, "fine-tuning epochs per label fraction (default 10)", type=int, check=at_least(1)),
    Option("--finetune-batch-size", 256, "fine-tuning batch size (default 256)", type=int, check=at_least(1)),
    Option(
        "--finetune-optimizer",
        "auto",
        "fine-tuning optimizer: auto (default: adamw for vision transformers, as MAE; sgd otherwise, as SimCLR), sgd or adamw",
        choices=("auto", "sgd", "adamw"),
    ),
    Option("--finetune-lr", None, "fine-tuning learning rate (default 0.2 with sgd, 1e-3 with adamw; cosine)", type=float, check=positive),
    Option(
        "--finetune-lr-scaling",
        "curvature",
        "from a projector layer: curvature (default) lowers the lr by the ratio of the head's curvature at h to "
        "that at the start layer; none uses --finetune-lr as is",
        choices=("curvature", "none"),
    ),
    Option("--finetune-min-steps", 200, "at least this many fine-tuning steps per fraction (default 200)", type=int, check=at_least(0)),
    Option(
        "--from-projector-layer",
        0,
        "fine-tune from the K-th hidden projector layer (SimCLR v2: 1); default 0: the encoder",
        type=int,
        metavar="K",
        check=at_least(0),
    ),
    Option(
        "--finetune-layer-decay",
        1.0,
        "layer-wise lr decay for vision transformers, in (0, 1] (MAE: 0.75); default 1: none",
        type=float,
        check=lambda v: None if 0 < v <= 1 else "must be in (0, 1]",
    ),
)
DISTILL_OPTIONS = (
    Option("--distill-epochs", 10, "distillation passes over all training images (default 10)", type=int, check=at_least(1)),
    Option("--distill-temperature", 1.0, "distillation softmax temperature (default 1)", type=float, check=positive),
    Option(
        "--distill-label-weight",
        0.0,
        "weight of the ground-truth loss on the labelled images, in [0, 1] (default 0: distillation only)",
        type=float,
        check=within(0, 1),
    ),
    Option(
        "--distill-student-init",
        "random",
        "student encoder: random (from scratch, as SimCLR v2) or pretrained (the run's encoder); default random",
        choices=("random", "pretrained"),
    ),
)


def start_layer(opts: EvalOptions, depth: str) -> int | str:
    """Where fine-tuning at feature depth ``depth`` starts: 0 (h), K (projK: the first K hidden
    projector layers are fine-tuned with the encoder) or ``"z"`` (the whole projector).
    ``--from-projector-layer K`` is the older spelling of ``--features projK``: with ``h`` it means K."""
    legacy = opts.from_projector_layer
    if depth == "h":
        return int(legacy)
    if legacy:
        raise UserError(
            f"--from-projector-layer {legacy} and --features {depth} name two starting layers for finetune; "
            f"give one (--features proj{legacy} is --from-projector-layer {legacy})"
        )
    return "z" if depth == "z" else int(depth[4:])


def finetune_optimizer(opts: EvalOptions, cfg: Any) -> tuple[str, float]:
    """The fine-tuning optimizer (``sgd`` or ``adamw``) and base lr that ``opts`` give for the run
    of config ``cfg``: ``--finetune-optimizer auto`` is AdamW for a vision-transformer backbone
    (built on the meta device to tell, no weights), and ``--finetune-lr`` defaults by optimizer."""
    from sslbench.evals.finetune import DEFAULT_LRS

    name = opts.finetune_optimizer
    if name == "auto":
        from sslbench.api import is_vision_transformer_backbone

        name = "adamw" if is_vision_transformer_backbone(cfg.backbone, cfg.image_size, cfg.backbone_kwargs) else "sgd"
    return name, DEFAULT_LRS[name] if opts.finetune_lr is None else float(opts.finetune_lr)


def _finetune_key_at(opts: EvalOptions, layer: int | str, cfg: Any) -> dict[str, Any]:
    decay, scaling = opts.finetune_layer_decay, opts.finetune_lr_scaling
    from sslbench.evals.finetune import applied_lr_scaling

    optimizer, lr = finetune_optimizer(opts, cfg)
    scaling = applied_lr_scaling(scaling, optimizer)
    return {
        "epochs": opts.finetune_epochs,
        "batch_size": opts.finetune_batch_size,
        "optimizer": optimizer,
        "lr": lr,
        # from h every scaling is the same (factor 1); rows stored before the option used the lr as is
        "lr_scaling": lambda v: layer == 0 or v == scaling or (v is None and scaling == "none"),
        "seed": opts.seed,
        "from_projector_layer": layer,
        "min_steps": opts.finetune_min_steps,
        # rows stored before the option existed were fine-tuned without a layer-wise decay
        "layer_decay": lambda v: v == decay or (v is None and decay == 1.0),
    }


def _finetune_key(cfg: Any, opts: EvalOptions) -> dict[str, Any]:
    return _finetune_key_at(opts, start_layer(opts, opts.features[0]), cfg)  # one depth: see register_protocol


def _distill_key(cfg: Any, opts: EvalOptions) -> dict[str, Any]:
    teacher = _finetune_key_at(opts, opts.from_projector_layer, cfg)
    return {
        "epochs": opts.distill_epochs,
        "batch_size": opts.finetune_batch_size,
        "lr": _distill_lr(opts),
        "seed": opts.seed,
        "min_steps": opts.finetune_min_steps,
        "temperature": opts.distill_temperature,
        "label_weight": opts.distill_label_weight,
        "student_init": opts.distill_student_init,
        # each teacher field: a value, or a predicate on the stored value (the layer decay's)
        "teacher": lambda t: isinstance(t, dict) and all(v(t.get(k)) if callable(v) else t.get(k) == v for k, v in teacher.items()),
    }


def _distill_lr(opts: EvalOptions) -> float:
    """The student's lr (SGD, as SimCLR v2): ``--finetune-lr``, or SGD's default when none is given."""
    from sslbench.evals.finetune import DEFAULT_LR

    return DEFAULT_LR if opts.finetune_lr is None else float(opts.finetune_lr)


def _projector(ctx: EvalContext) -> Any:
    """The run's first ``--from-projector-layer`` projector layers (None for 0), loaded once; as a
    ``prepare`` hook it fails before any data is loaded."""
    if "projector" not in ctx.cache:
        from sslbench.evals.finetune import projector_layers

        layers = ctx.opts.from_projector_layer
        ctx.cache["projector"] = projector_layers(ctx.run_dir, layers) if layers else None
    return ctx.cache["projector"]


def _prepare_finetune(ctx: EvalContext) -> Any:
    """Before any data is loaded: a layer-wise lr decay needs a transformer encoder, and the
    projector layers are loaded (:func:`_projector`)."""
    if ctx.opts.finetune_layer_decay != 1.0 and not hasattr(ctx.encoder, "blocks"):
        name = getattr(ctx.encoder, "pretrained_cfg", {}).get("architecture") or type(ctx.encoder).__name__
        raise UserError(
            f"--finetune-layer-decay {ctx.opts.finetune_layer_decay:g} needs a vision transformer encoder (timm blocks); {name} has none, use 1"
        )
    return _projector(ctx)


def _start_head(ctx: EvalContext, layer: int | str) -> Any:
    """The projector part fine-tuned with the encoder when starting at ``layer`` (None for 0)."""
    if layer == ctx.opts.from_projector_layer:
        return _projector(ctx)
    return ctx.head("z" if layer == "z" else f"proj{layer}")


def _teacher(ctx: EvalContext, fraction: float, layer: int | str) -> tuple[Any, dict[str, float]]:
    """The encoder fine-tuned on ``fraction`` of the labels from projector ``layer`` and its
    metrics, trained once for both the finetune row and the distillation teacher (kept only when a
    distillation will need it)."""
    from sslbench.evals.finetune import finetune_model

    teachers = ctx.cache.setdefault("teachers", {})
    if (fraction, layer) in teachers:
        cached: tuple[Any, dict[str, float]] = teachers[fraction, layer]
        return cached
    opts = ctx.opts
    optimizer, lr = finetune_optimizer(opts, ctx.cfg)
    model_and_metrics = finetune_model(
        ctx.encoder,
        ctx.in_memory("train"),
        ctx.in_memory("test"),
        fraction=fraction,
        image_size=ctx.image_size,
        epochs=opts.finetune_epochs,
        batch_size=opts.finetune_batch_size,
        lr=lr,
        seed=opts.seed,
        projector=_start_head(ctx, layer),
        device=ctx.device,
        precision=ctx.precision,
        min_steps=opts.finetune_min_steps,
        layer_decay=opts.finetune_layer_decay,
        lr_scaling=opts.finetune_lr_scaling,
        optimizer=optimizer,
    )
    if "distill" in opts.protocols and layer == opts.from_projector_layer:
        teachers[fraction, layer] = model_and_metrics
    return model_and_metrics


def _finetune_record(ctx: EvalContext, fraction: float, layer: int | str, model: Any) -> dict[str, Any]:
    from sslbench.evals.finetune import applied_lr_scaling, finetune_protocol, label_subset

    opts = ctx.opts
    return finetune_protocol(
        fraction=fraction,
        n_labelled=len(label_subset(ctx.in_memory("train"), fraction, opts.seed)[0]),
        epochs=opts.finetune_epochs,
        batch_size=opts.finetune_batch_size,
        lr=model.lr,
        seed=opts.seed,
        from_projector_layer=layer,
        min_steps=opts.finetune_min_steps,
        layer_decay=opts.finetune_layer_decay,
        lr_scaling=applied_lr_scaling(opts.finetune_lr_scaling, model.optimizer),
        lr_factor=model.lr_factor,
        optimizer=model.optimizer,
    )


@register_protocol(
    "finetune",
    options=FINETUNE_OPTIONS,
    reuse_key=_finetune_key,
    per_fraction=True,
    in_memory=True,
    prepare=_prepare_finetune,
    description="end-to-end fine-tuning on a class-balanced fraction of the labels, from h or a projector layer (--features)",
    per_features=True,
)
def finetune(ctx: EvalContext, fraction: float | None) -> Score:
    assert fraction is not None
    layer = start_layer(ctx.opts, ctx.depth)
    model, metrics = _teacher(ctx, fraction, layer)
    return Score(metrics, _finetune_record(ctx, fraction, layer, model))


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

    from sslbench.api import create_backbone
    from sslbench.evals.distill import distill as run_distill
    from sslbench.evals.distill import distill_protocol
    from sslbench.evals.finetune import label_subset

    assert fraction is not None
    opts, cfg = ctx.opts, ctx.cfg
    if opts.distill_student_init == "pretrained":
        student = ctx.encoder
    else:
        torch.manual_seed(opts.seed)
        student = create_backbone(cfg.backbone, ctx.image_size, **cfg.backbone_kwargs)
    layer = opts.from_projector_layer
    model, _ = _teacher(ctx, fraction, layer)
    metrics = run_distill(
        model,
        student,
        ctx.in_memory("train"),
        ctx.in_memory("test"),
        fraction=fraction,
        image_size=ctx.image_size,
        epochs=opts.distill_epochs,
        batch_size=opts.finetune_batch_size,
        lr=_distill_lr(opts),
        temperature=opts.distill_temperature,
        label_weight=opts.distill_label_weight,
        seed=opts.seed,
        device=ctx.device,
        precision=ctx.precision,
        min_steps=opts.finetune_min_steps,
    )
    return Score(
        metrics,
        distill_protocol(
            fraction=fraction,
            n_labelled=len(label_subset(ctx.in_memory("train"), fraction, opts.seed)[0]),
            n_images=len(ctx.split("train")),
            student_init=opts.distill_student_init,
            epochs=opts.distill_epochs,
            batch_size=opts.finetune_batch_size,
            lr=_distill_lr(opts),
            temperature=opts.distill_temperature,
            label_weight=opts.distill_label_weight,
            min_steps=opts.finetune_min_steps,
            seed=opts.seed,
            teacher=_finetune_record(ctx, fraction, layer, model),
        ),
    )


# ---------------------------------------------------------------------------------------------
# Label-free feature metrics (evals/label_free.py): no label is read, so they score unlabelled data
# too (an image folder with one class folder). Each uses a seeded subset of the test split.

METRIC_SAMPLES = Option(
    "--metric-samples", 4096, "label-free metrics: test images used, a seeded subset (default 4096; all when fewer)", type=int, check=at_least(2)
)
ALIGNMENT_ALPHA = Option("--alignment-alpha", 2.0, "alignment exponent alpha (default 2, Wang & Isola)", type=float, check=positive)
UNIFORMITY_T = Option("--uniformity-t", 2.0, "uniformity temperature t (default 2, Wang & Isola)", type=float, check=positive)
LABEL_FREE_RECORD = {"labels": "not used", "split": "test", "normalisation": "L2 per sample"}


def _sample_index(ctx: EvalContext) -> Any:
    """The sorted indices of the test images the label-free metrics use: ``--metric-samples`` of
    them drawn by ``--eval-seed`` (all when the split is smaller); the same for every run."""
    import torch

    n = len(ctx.split("test"))
    if n < 2:
        raise UserError(f"the label-free metrics need at least 2 test images; {ctx.data} has {n}")
    if n <= ctx.opts.metric_samples:
        return torch.arange(n)
    gen = torch.Generator().manual_seed(ctx.opts.seed)
    return torch.randperm(n, generator=gen)[: ctx.opts.metric_samples].sort().values


def _test_embeddings(ctx: EvalContext) -> Any:
    return ctx.split_features("test")[_sample_index(ctx)]


def _record(ctx: EvalContext, **fields: Any) -> dict[str, Any]:
    return {**LABEL_FREE_RECORD, "samples": int(_sample_index(ctx).numel()), "seed": ctx.opts.seed, **fields}


@register_protocol(
    "alignment",
    options=[METRIC_SAMPLES, ALIGNMENT_ALPHA],
    reuse_key=lambda cfg, opts: {"seed": opts.seed, "alpha": opts.alignment_alpha, "max_samples": opts.metric_samples},
    in_memory=True,
    per_features=True,
    uses_labels=False,
    description="Wang & Isola alignment: E||f(x)-f(y)||^alpha over two augmented views of each test image (no labels)",
)
def alignment(ctx: EvalContext, fraction: float | None) -> Score:
    import torch

    from sslbench.api import BatchAugment, autocast, eval_mode
    from sslbench.evals.label_free import alignment as align

    idx = _sample_index(ctx)
    aug = BatchAugment(ctx.cfg.aug, ctx.image_size)  # the run's own training augmentation
    head = ctx.head()
    views: list[list[Any]] = [[], []]
    with eval_mode(ctx.encoder), torch.no_grad():
        for start in range(0, idx.numel(), 256):
            batch_idx = idx[start : start + 256]
            images = ctx.in_memory("test").images[batch_idx].to(ctx.device)
            for v in (0, 1):
                with autocast(ctx.device, ctx.precision):
                    h = ctx.encoder(aug(images, batch_idx, seed=ctx.opts.seed, epoch=0, view=v)).flatten(1).float()
                views[v].append((h if head is None else head(h)).float().cpu())
    metric = align(torch.cat(views[0]), torch.cat(views[1]), alpha=ctx.opts.alignment_alpha)
    return Score(
        {"alignment": metric},
        _record(
            ctx,
            alpha=ctx.opts.alignment_alpha,
            max_samples=ctx.opts.metric_samples,
            pairs="two views of each test image by the run's training augmentation (aug.*), seeded by --eval-seed",
            reference="Wang & Isola, ICML 2020",
        ),
    )


@register_protocol(
    "uniformity",
    options=[METRIC_SAMPLES, UNIFORMITY_T],
    reuse_key=lambda cfg, opts: {"seed": opts.seed, "t": opts.uniformity_t, "max_samples": opts.metric_samples},
    per_features=True,
    uses_labels=False,
    description="Wang & Isola uniformity: log E exp(-t||f(x)-f(y)||^2) over pairs of test images (no labels)",
)
def uniformity(ctx: EvalContext, fraction: float | None) -> Score:
    from sslbench.evals.label_free import uniformity as uniform

    metric = uniform(_test_embeddings(ctx), t=ctx.opts.uniformity_t)
    return Score(
        {"uniformity": metric},
        _record(
            ctx,
            t=ctx.opts.uniformity_t,
            max_samples=ctx.opts.metric_samples,
            pairs="all pairs of distinct test images, features without augmentation",
            reference="Wang & Isola, ICML 2020",
        ),
    )


@register_protocol(
    "rankme",
    options=[METRIC_SAMPLES],
    reuse_key=lambda cfg, opts: {"seed": opts.seed, "max_samples": opts.metric_samples},
    per_features=True,
    uses_labels=False,
    description="RankMe (Garrido et al.): effective rank of the test embedding matrix (no labels)",
)
def rankme(ctx: EvalContext, fraction: float | None) -> Score:
    from sslbench.evals.label_free import RANKME_EPS
    from sslbench.evals.label_free import rankme as effective_rank

    z = _test_embeddings(ctx)
    return Score(
        {"rankme": effective_rank(z)},
        {
            **_record(ctx, max_samples=ctx.opts.metric_samples, eps=RANKME_EPS, dim=int(z.shape[1]), reference="Garrido et al., ICML 2023"),
            "normalisation": "none (raw embeddings)",
        },
    )


@register_protocol(
    "feature_std",
    options=[METRIC_SAMPLES],
    reuse_key=lambda cfg, opts: {"seed": opts.seed, "max_samples": opts.metric_samples},
    per_features=True,
    uses_labels=False,
    description="collapse check: per-dimension std of L2-normalised test embeddings (1/sqrt(D) healthy, 0 collapsed; no labels)",
)
def feature_std(ctx: EvalContext, fraction: float | None) -> Score:
    import math

    from sslbench.evals.label_free import feature_std as std

    z = _test_embeddings(ctx)
    value = std(z)
    return Score(
        {"feature_std": value, "feature_std_sqrt_d": value * math.sqrt(z.shape[1])},
        _record(
            ctx,
            max_samples=ctx.opts.metric_samples,
            dim=int(z.shape[1]),
            std="population (1/N), averaged over dimensions",
            reference="Chen & He, SimSiam, CVPR 2021, Sec. 4.1",
        ),
    )
