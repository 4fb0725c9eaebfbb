"""Transfer: the linear probe trained and tested on other data sets than the run's own.

``sslbench eval --data SPEC`` already scores every protocol on one other data set (its train and
test splits, read at the run's image size). ``transfer`` does this for several target data sets in
one evaluation, next to the run's own protocols, and so in ``compare`` too: for each target of
``--transfer-data SPEC[,SPEC...]`` (any data spec: ``digits``, ``imagefolder:DIR``, ``hf:NAME``,
...), its splits are loaded with the same :func:`sslbench.api.load_split` at the run's image size
(stored at ``store_size(image_size)`` and resized by the evaluation transform), encoded by the
frozen encoder, and probed with :func:`sslbench.evals.linear.linear_probe` (the ``linear``
protocol's grid, validation split, ``--linear-epochs`` and ``--eval-seed``). The metrics of a
target are named by it: ``transfer_<name>_top1`` (and ``_top5`` with 5 or more classes).
"""

from __future__ import annotations

import re
from typing import Any

from sslbench.api import EvalContext, Option, Score, UserError, parse_data_spec, register_protocol
from sslbench.evals.protocols import LINEAR_EPOCHS


def parse_specs(text: str, flag: str) -> list[str]:
    """``'digits, imagefolder:/x'`` -> ``['digits', 'imagefolder:/x']`` (order kept, duplicates dropped)."""
    specs = list(dict.fromkeys(p.strip() for p in text.split(",") if p.strip()))
    if not specs:
        raise UserError(f"{flag} needs at least one data spec, e.g. {flag} digits,imagefolder:/data/pets")
    return specs


def spec_names(specs: list[str]) -> dict[str, str]:
    """A short metric-safe name per spec: the source's name alone (``digits``), or the last part of
    its argument (``imagefolder:/data/pets`` -> ``pets``, ``hf:org/set`` -> ``set``); a name taken
    twice gets ``_2``, ``_3``."""
    names: dict[str, str] = {}
    for spec in specs:
        head, _, arg = spec.partition(":")
        tail = re.split(r"[/\\:]", arg.rstrip("/\\"))[-1] if arg.strip() else head
        base = re.sub(r"[^a-z0-9]+", "_", tail.lower()).strip("_") or "data"
        name, n = base, 1
        while name in names.values():
            n += 1
            name = f"{base}_{n}"
        names[spec] = name
    return names


def _check_specs(text: str) -> str | None:
    try:
        for spec in parse_specs(text, "--transfer-data"):
            parse_data_spec(spec)
    except UserError as exc:
        return f"is not a list of data specs ({exc})"
    return None


TRANSFER_DATA = Option(
    "--transfer-data",
    "digits",
    "transfer: comma-separated data specs to train and test the linear probe on, at the run's image size (default digits)",
    metavar="SPEC[,SPEC...]",
    check=_check_specs,
)


def load_target(ctx: EvalContext, spec: str, split: str) -> Any:
    """The ``split`` of data ``spec`` at the run's image size, in memory up to the evaluation's
    memory limit, else read from disk (the features are computed batch by batch either way)."""
    from sslbench.api import load_split

    limit = ctx.cfg.max_memory_gb if ctx.opts.max_memory_gb is None else ctx.opts.max_memory_gb
    return load_split(spec, split, ctx.image_size, cache_dir=ctx.cfg.cache_dir, max_memory_gb=limit)


def target_features(ctx: EvalContext, spec: str, split: str) -> Any:
    """Frozen features ``(N, D)`` of ``spec``'s ``split`` and the split (cached per evaluation)."""
    from sslbench.api import split_features

    key = f"target:{spec}:{split}"
    if key not in ctx.cache:
        data = load_target(ctx, spec, split)
        feats = split_features(
            ctx.encoder, data, image_size=ctx.image_size, device=ctx.device, precision=ctx.precision, num_workers=ctx.cfg.num_workers
        )
        ctx.cache[key] = (feats, data)
    return ctx.cache[key]


def _prepare(ctx: EvalContext) -> None:
    for spec in parse_specs(ctx.opts.transfer_data, "--transfer-data"):
        parse_data_spec(spec)  # a bad spec fails before anything is scored


@register_protocol(
    "transfer",
    options=[LINEAR_EPOCHS, TRANSFER_DATA],
    reuse_key=lambda cfg, opts: {"targets": parse_specs(opts.transfer_data, "--transfer-data"), "epochs": opts.linear_epochs, "seed": opts.seed},
    prepare=_prepare,
    description="linear probe trained and tested on other data sets (--transfer-data), at the run's image size",
)
def transfer(ctx: EvalContext, fraction: float | None) -> Score:
    from sslbench.evals.linear import linear_probe

    opts = ctx.opts
    specs = parse_specs(opts.transfer_data, "--transfer-data")
    names = spec_names(specs)
    metrics: dict[str, float] = {}
    targets: dict[str, dict[str, Any]] = {}
    for spec in specs:
        train, train_split = target_features(ctx, spec, "train")
        test, test_split = target_features(ctx, spec, "test")
        if len(set(train_split.labels.tolist())) < 2:
            raise UserError(f"--transfer-data {spec}: its train split has a single class; a linear probe needs two or more")
        out = linear_probe(train, train_split.labels, test, test_split.labels, epochs=opts.linear_epochs, seed=opts.seed, device=ctx.device)
        name = names[spec]
        metrics[f"transfer_{name}_top1"] = out["linear_top1"]
        if "linear_top5" in out:
            metrics[f"transfer_{name}_top5"] = out["linear_top5"]
        targets[name] = {
            "spec": spec,
            "train_images": len(train_split),
            "test_images": len(test_split),
            "classes": len(train_split.classes),
            "best_lr": out["linear_best_lr"],
            "best_wd": out["linear_best_wd"],
        }
    record = {
        "targets": specs,
        "by_name": targets,
        "epochs": opts.linear_epochs,
        "seed": opts.seed,
        "probe": "linear (sslbench.evals.linear.linear_probe: lr/wd grid chosen on a validation split of the target's train)",
        "resolution": "the run's image size",
    }
    return Score(metrics, record)
