"""The method contract's checks, installed: run them on your own method class.

::

    from sslbench.testing import check_method

    check_method(MyMethod)  # or a registered name, or "my_pkg.my_method:MyMethod"

:func:`check_method` runs every check below and raises :class:`AssertionError` at the first that
fails, with a message that says what failed and what to fix; each check can also be called on its
own. sslbench's own tests run the same functions on every registered method
(tests/test_methods_contract.py, tests/test_vit_multisize.py, tests/test_multiprocess.py,
tests/test_no_collapse.py).

In one process, on a tiny backbone (seconds):

- :func:`check_builds`: class attributes, the config, the encoder, views, recipes, optimizer groups;
- :func:`check_training_step`: one step gives a finite scalar loss, detached logs, gradients on the
  backbone, none on the target networks, which the optimizer leaves alone;
- :func:`check_momentum`: ``momentum_pairs`` covers every frozen parameter, the EMA follows its formula;
- :func:`check_gradient_cache`: ``embed``/``loss_from_embeddings``, when present, give ``training_step``'s loss;
- :func:`check_loss_decreases`: a small step against the gradient lowers the loss of a batch;
- :func:`check_trains`: a few more steps on easy data stay finite and move every trained parameter;
- :func:`check_views_of_several_sizes`: a vision transformer trains on views of two sizes.

Through the command line, in new processes (tens of seconds each):

- :func:`check_resume_equals_unbroken`: a run stopped after step 3 and resumed ends with exactly the
  weights and losses of an unbroken run;
- :func:`check_two_processes_equal_one`: ``torchrun`` with 2 CPU processes (gloo) computes what one
  process computes (losses, weights, buffers), and both processes hold the same state
  (:func:`check_no_per_process_state` alone);
- :func:`check_no_collapse` (minutes; not part of :func:`check_method` by default): a short training
  on digits spreads the embeddings out and beats the untrained backbone's k-NN.

A method is given as its class, its registered name, or ``"module:Class"``. The checks that start
new processes import the class there from its module (``module:qualname``), so it must be defined
at the top level of an importable module (a plugin package, or a test helper module next to your
tests): a class defined inside a function, or in a script run as ``__main__``, can be checked in
one process only. A class that is not registered is registered in those processes under
``module.qualname``.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from sslbench.core.augment import AugmentConfig
from sslbench.core.errors import UserError
from sslbench.core.method import EMBEDDING_LOG, FAMILIES, Batch, Method, Recipe, StepInfo, ViewSpec, default_views
from sslbench.core.optim import LR_SCALING_RULES, OPTIMIZERS, build_optimizer, param_groups
from sslbench.core.registry import METHODS, get_method, register_method
from sslbench.train.callbacks import CALLBACKS_ENV, Callback, Control

if TYPE_CHECKING:
    from sslbench.train.run_setup import Run

__all__ = [
    "BATCH",
    "MIN_SCALE",
    "MULTISIZE_VIT",
    "SIZE",
    "TINY_RESNET",
    "TINY_VIT",
    "MethodLike",
    "MethodRef",
    "OneStep",
    "SaveRankState",
    "StopAfterStep",
    "TwoProcessRun",
    "TwoProcessRuns",
    "assert_ranks_agree",
    "assert_same_weights",
    "assert_tensors_close",
    "assert_two_processes_equal_one",
    "backbone_cli_args",
    "check_builds",
    "child_env",
    "check_gradient_cache",
    "check_loss_decreases",
    "check_method",
    "check_momentum",
    "check_no_collapse",
    "check_no_per_process_state",
    "check_resume_equals_unbroken",
    "check_training_step",
    "check_trains",
    "check_two_processes_equal_one",
    "check_views_of_several_sizes",
    "make_batch",
    "method_backbone",
    "one_step",
    "resolve_method",
    "run_group",
    "step_info",
    "tiny_backbone",
    "torchrun_command",
    "train_argv",
]

MethodLike = type[Method] | str  # a Method subclass, a registered name, or "package.module:Class"
Backbone = tuple[str, dict[str, Any]]  # (timm name, create_backbone keywords)

# The tiny backbones the checks train on: a narrow ResNet-18, or, for a method that refuses it (a
# method for vision transformers only, e.g. MAE), a two-block ViT with 4 px patches at 32 px.
TINY_RESNET: Backbone = ("resnet18", {"channels": (8, 16, 32, 64)})
TINY_VIT: Backbone = ("vit_tiny_patch16_224", {"depth": 2, "embed_dim": 32, "num_heads": 2})
# The ViT of check_views_of_several_sizes: ViT-Tiny's width, two blocks.
MULTISIZE_VIT: Backbone = ("vit_tiny_patch16_224", {"depth": 2})

BATCH, SIZE = 8, 32  # the in-process checks: samples per step, image side in px

# check_two_processes_equal_one: per tensor max|2 proc - 1 proc| <= RTOL * max(max|1 proc|, min_scale) + ATOL.
# The scale floor: fp32 rounding differs between the runs (convolutions on 8 vs 16 images,
# SyncBatchNorm's two-pass statistics) and after 3 steps leaves ~1e-7..2e-7 absolute in every
# tensor, while any real error moves a tensor by the size of an update (>= 1e-4); see
# tests/test_multiprocess.py for the measurements.
RTOL, ATOL = 1e-5, 1e-7
MIN_SCALE = 0.1
TWO_PROCESS_STEPS, TWO_PROCESS_BATCH, TWO_PROCESS_SEED = 3, 16, 3
RUN_TIMEOUT_S = 420  # one tiny training run, on a loaded 2-core machine

JOB_DONE = "SSLBENCH_TESTING_JOB"  # the line the driver prints after each job: JOB_DONE key rc
STOP_AFTER_ENV = "SSLBENCH_TESTING_STOP_AFTER"  # StopAfterStep: stop (as on SIGTERM) after this many steps
RANK_STATE_ENV = "SSLBENCH_TESTING_RANK_STATE"  # SaveRankState: write every process's state into this folder

FIX_DISTRIBUTED = (
    "Usual causes: a loss over the batch computed on each process's half alone (gather negatives and batch statistics "
    "from every process with sslbench.api.gather_with_grad / all_reduce_sum_with_grad); a buffer updated from the "
    "local batch (DDP does not synchronise buffers: reduce the update over processes, as sslbench.api.MemoryBank "
    "and DINO's centre do); per-sample randomness from torch.rand instead of batch.uniform(stream, n)."
)


def _require(condition: object, message: str) -> None:
    """``assert``, kept under ``python -O``: an :class:`AssertionError` with ``message``."""
    if not condition:
        raise AssertionError(message)


# ----------------------------------------------------------------------------------------------
# Which method


@dataclass(frozen=True)
class MethodRef:
    """A method class and how other processes find it."""

    cls: type[Method]
    name: str  # the name the command line trains it under (its registered name, else module.qualname)
    path: str | None  # "module:qualname" when a new process can import it, else None
    registered: bool  # METHODS holds ``cls`` under ``name`` in this process

    @property
    def label(self) -> str:
        """How messages name it: the registered name, else the class's name."""
        return self.name if self.registered else self.cls.__qualname__


def _import_object(path: str) -> Any:
    module, _, qualname = path.partition(":")
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _import_path(cls: type) -> str | None:
    """``module:qualname`` of ``cls`` when importing it gives ``cls`` back, else None."""
    if cls.__module__ == "__main__" or "<locals>" in cls.__qualname__:
        return None
    path = f"{cls.__module__}:{cls.__qualname__}"
    try:
        return path if _import_object(path) is cls else None
    except (ImportError, AttributeError):
        return None


def resolve_method(method: MethodLike | MethodRef) -> MethodRef:
    """The class, CLI name and import path of ``method``: a :class:`~sslbench.core.method.Method`
    subclass, a registered name (built-in or from the ``sslbench.methods`` entry points), or
    ``"module:Class"``."""
    if isinstance(method, MethodRef):
        return method
    if isinstance(method, str):
        if ":" in method:
            try:
                obj = _import_object(method)
            except (ImportError, AttributeError) as exc:
                raise ValueError(f"cannot import the method {method!r} ({exc}); give it as 'package.module:Class'") from exc
        else:
            obj = get_method(method)
    else:
        obj = method
    if not (isinstance(obj, type) and issubclass(obj, Method)):
        raise TypeError(f"{obj!r} is not a method class: a method subclasses sslbench.api.Method (docs/write-your-own-method.md)")
    cls: type[Method] = obj
    registered = bool(cls.name) and cls.name in METHODS and METHODS.get(cls.name) is cls
    name = cls.name if registered else f"{cls.__module__}.{cls.__qualname__}"
    return MethodRef(cls, name, _import_path(cls), registered)


def _ensure_registered(ref: MethodRef) -> None:
    """Register ``ref.cls`` under ``ref.name`` unless it is (in this process)."""
    if ref.name in METHODS and METHODS.get(ref.name) is ref.cls:
        return
    register_method(ref.name)(ref.cls)


def _require_importable(ref: MethodRef, check: str) -> str:
    if ref.path is None:
        raise ValueError(
            f"{check} trains {ref.cls.__qualname__} in new processes, which must import it: define the class at the top level of an "
            f"importable module (a plugin package, or a helper module next to your tests) and pass the class or 'module:Class'; "
            f"a class defined inside a function or in a script run as __main__ ({ref.cls.__module__}) can be checked in one process only"
        )
    return ref.path


# ----------------------------------------------------------------------------------------------
# Building blocks: backbones, steps, batches


def tiny_backbone(backbone: Backbone, image_size: int = SIZE) -> nn.Module:
    """The timm backbone ``(name, keywords)`` for ``image_size`` px images, as the trainer builds it."""
    from sslbench.backbones import create_backbone

    name, kwargs = backbone
    return create_backbone(name, image_size, **kwargs)


def backbone_cli_args(backbone: Backbone) -> list[str]:
    """``--backbone NAME --set backbone_kwargs.K=V ...``: the command line's way of naming ``backbone``."""
    name, kwargs = backbone
    args = ["--backbone", name]
    for k, v in kwargs.items():
        args += ["--set", f"backbone_kwargs.{k}={','.join(map(str, v)) if isinstance(v, tuple | list) else v}"]
    return args


def _build(cls: type[Method], backbone: Backbone | None, image_size: int = SIZE) -> tuple[Method, nn.Module, Backbone]:
    """``cls`` with its default config on ``backbone`` (default: :data:`TINY_RESNET`, or
    :data:`TINY_VIT` when the method refuses a ResNet with a UserError), seeded with 0."""
    cfg = cls.Config()
    try:
        cfg.validate()
    except UserError as exc:
        raise AssertionError(f"{cls.__name__}.Config() (the defaults) fails its own validate(): {exc}") from exc
    candidates = [backbone] if backbone is not None else [TINY_RESNET, TINY_VIT]
    errors = []
    for spec in candidates:
        torch.manual_seed(0)
        module = tiny_backbone(spec, image_size)
        try:
            return cls(module, cfg), module, spec
        except UserError as exc:
            errors.append(f"{spec[0]}: {exc}")
    raise AssertionError(f"{cls.__name__}(backbone, {cls.__name__}.Config()) refuses every tiny backbone tried ({'; '.join(errors)})")


def method_backbone(method: MethodLike) -> Backbone:
    """The tiny backbone the checks train ``method`` on: :data:`TINY_RESNET`, or :data:`TINY_VIT`
    for a method that refuses a ResNet."""
    return _build(resolve_method(method).cls, None)[2]


def step_info(step: int = 0, total: int = 100, *, steps_per_epoch: int = 10, seed: int = 0, progress: float | None = None) -> StepInfo:
    """The StepInfo of ``step`` of ``total`` (progress step/total unless given: a time budget)."""
    time_based = progress is not None
    p = step / total if progress is None else progress
    return StepInfo(step, step // steps_per_epoch, steps_per_epoch, total, min(max(p, 0.0), 1.0), seed, time_based)


def make_batch(views: Sequence[Tensor], *, step: int = 0, total: int = 100, index: Tensor | None = None, seed: int = 0) -> Batch:
    """A Batch of ``views`` (samples 0..B-1 unless ``index``) at ``step`` of ``total``."""
    views = list(views)
    idx = torch.arange(views[0].shape[0]) if index is None else index
    return Batch(views, idx, step_info(step, total, seed=seed))


@dataclass
class OneStep:
    """What :func:`one_step` did: the method after one SGD step and everything the checks read."""

    method: Method  # after the step
    initial: Method  # a copy taken before the step (check_loss_decreases starts from it)
    backbone: nn.Module
    backbone_spec: Backbone
    specs: list[ViewSpec]
    views: list[Tensor]  # the step's views (unchanged: the step got copies)
    rng: Tensor  # torch's RNG state right before training_step
    groups: list[dict[str, Any]]
    loss: Tensor
    logs: dict[str, Tensor]
    before: dict[str, Tensor]  # parameters before the step, by name
    grads: dict[str, Tensor | None]  # gradients of the step, by name

    @property
    def cls(self) -> type[Method]:
        return type(self.method)

    def batch(self) -> Batch:
        """The step's batch, on fresh copies of its views (step 3 of 10)."""
        return make_batch([v.clone() for v in self.views], step=3, total=10)


def one_step(method: MethodLike, *, backbone: Backbone | None = None) -> OneStep:
    """Build ``method`` (default config, on :func:`method_backbone`'s tiny backbone, seed 0), run
    one training step on random (8, 3, S, S) views and one SGD step (lr 0.1, weight decay 1e-4)."""
    cls = resolve_method(method).cls
    model, module, spec = _build(cls, backbone)
    model.train()
    initial = copy.deepcopy(model)
    specs = default_views(model, AugmentConfig(), SIZE)
    views = [torch.randn(BATCH, 3, s.size, s.size) for s in specs]
    groups = model.param_groups(param_groups(model, 1e-4))
    opt = build_optimizer("sgd", groups, 0.1, weight_decay=1e-4)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    rng = torch.get_rng_state()
    loss, logs = model.training_step(make_batch([v.clone() for v in views], step=3, total=10))
    _require(isinstance(loss, Tensor), f"{cls.__name__}.training_step must return (loss tensor, logs dict), got {type(loss).__name__} first")
    loss.backward()
    grads = {n: (None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()}
    opt.step()
    return OneStep(model, initial, module, spec, specs, views, rng, groups, loss, logs, before, grads)


def _stepped(target: MethodLike | OneStep) -> OneStep:
    return target if isinstance(target, OneStep) else one_step(target)


# ----------------------------------------------------------------------------------------------
# The checks in one process


def check_builds(target: MethodLike | OneStep) -> None:
    """The class attributes (``Config``, a dataclass; ``description``; ``paper``), the default
    config validates, ``self.encoder`` is the backbone, ``views()`` and ``recipe()`` return valid
    values at 32 and 224 px for both backbone families, and the optimizer groups hold every
    trainable parameter exactly once."""
    r = _stepped(target)
    method, cls = r.method, r.cls
    n = cls.__name__
    _require(isinstance(method, Method), f"{n} must subclass sslbench.api.Method")
    _require(isinstance(cls.description, str) and cls.description.strip(), f"{n}.description must be one line for `sslbench list methods`")
    _require(isinstance(cls.paper, str) and cls.paper.strip(), f"{n}.paper must cite the method's paper")
    _require(dataclasses.is_dataclass(cls.Config), f"{n}.Config must be a @dataclass (a subclass of sslbench.api.MethodConfig)")
    _require(
        method.encoder is r.backbone,
        f"{n}.encoder must be the backbone given to __init__ (self.encoder = backbone): it is what is saved and evaluated",
    )
    # optimizer groups hold every trainable parameter exactly once and no frozen one
    in_groups = [id(p) for g in r.groups for p in g["params"]]
    _require(len(in_groups) == len(set(in_groups)), f"{n}.param_groups() puts a parameter in two groups")
    trainable = {id(p) for p in method.parameters() if p.requires_grad}
    _require(
        set(in_groups) == trainable,
        f"{n}.param_groups() must hold exactly the trainable parameters (requires_grad=True): "
        f"{len(trainable - set(in_groups))} missing, {len(set(in_groups) - trainable)} frozen or foreign ones included",
    )
    specs = r.specs
    _require(
        specs and all(isinstance(s, ViewSpec) and isinstance(s.aug, AugmentConfig) and s.size > 0 for s in specs),
        f"{n}.views() must return ViewSpec(aug: AugmentConfig, size > 0) entries, got {specs!r}",
    )
    aug_fields = {f.name for f in dataclasses.fields(AugmentConfig)}
    cfg_fields = {f.name for f in dataclasses.fields(cls.Config)}
    for size in (32, 224):
        for family in FAMILIES:
            recipe = cls.recipe(size, family)
            where = f"{n}.recipe({size}, {family!r})"
            _require(isinstance(recipe, Recipe), f"{where} must return a sslbench.api.Recipe, got {type(recipe).__name__}")
            _require(recipe.optimizer in OPTIMIZERS, f"{where}.optimizer {recipe.optimizer!r} is not one of {OPTIMIZERS}")
            _require(
                recipe.lr > 0 and recipe.weight_decay >= 0, f"{where}: lr must be > 0 and weight_decay >= 0, got {recipe.lr}, {recipe.weight_decay}"
            )
            _require(recipe.lr_scaling in LR_SCALING_RULES, f"{where}.lr_scaling {recipe.lr_scaling!r} is not one of {LR_SCALING_RULES}")
            _require(set(recipe.aug) <= aug_fields, f"{where}.aug sets unknown AugmentConfig fields {sorted(set(recipe.aug) - aug_fields)}")
            _require(set(recipe.method) <= cfg_fields, f"{cls.__name__}.recipe sets unknown method fields {sorted(set(recipe.method) - cfg_fields)}")
    _require(cls.min_batch_size <= BATCH, f"{n}.min_batch_size {cls.min_batch_size} > {BATCH}: the checks train on batches of {BATCH}")


def check_training_step(target: MethodLike | OneStep) -> None:
    """One training step and one SGD step on a tiny backbone: the loss is a finite scalar with a
    gradient, the logs are detached finite scalars (and the optional ``"embedding"`` a detached
    (B, d) tensor), every backbone parameter gets a finite gradient (not all zero), frozen (target)
    parameters get none and the optimizer leaves them alone, and the backbone moves."""
    r = _stepped(target)
    method, backbone, loss, logs = r.method, r.backbone, r.loss, r.logs
    n = r.cls.__name__
    _require(loss.ndim == 0, f"{n}.training_step must return a scalar loss, got shape {tuple(loss.shape)}")
    _require(
        loss.requires_grad, f"{n}.training_step's loss has no gradient: compute it from the trained modules, without .detach() or torch.no_grad()"
    )
    _require(math.isfinite(loss.item()), f"{n}.training_step's loss is {loss.item()} on a tiny random batch: it must be finite")
    _require(isinstance(logs, dict), f"{n}.training_step must return (loss, logs dict), got {type(logs).__name__} as logs")
    scalars = {k: v for k, v in logs.items() if k != EMBEDDING_LOG}
    _require(scalars, f'{n}.training_step returns no logs: return at least {{"loss": loss.detach()}}')
    for k, v in scalars.items():
        _require(isinstance(v, Tensor) and v.ndim == 0, f"{n}.training_step's log {k!r} must be a scalar tensor (read every log_every steps)")
        _require(not v.requires_grad, f"{n}.training_step's log {k!r} carries a gradient: log v.detach() (else the step's graph is kept alive)")
        _require(torch.isfinite(v), f"{n}.training_step's log {k!r} is {v.item()}: it must be finite")
    if EMBEDDING_LOG in logs:  # the health embedding: detached, one finite row per sample of the batch
        emb = logs[EMBEDDING_LOG]
        _require(
            emb.ndim == 2 and emb.shape[0] == r.views[0].shape[0] and not emb.requires_grad and torch.isfinite(emb).all(),
            f'{n}\'s log "embedding" must be a detached, finite (B, d) tensor with one row per sample, got shape {tuple(emb.shape)}',
        )
    # gradients: every backbone parameter gets a finite one, not all zero
    names = {id(p): name for name, p in method.named_parameters()}
    bgrads = {names[id(p)]: r.grads[names[id(p)]] for p in backbone.parameters()}
    missing = [k for k, g in bgrads.items() if g is None]
    _require(not missing, f"backbone parameters of {n} get no gradient (e.g. {missing[:3]}): the loss must depend on self.encoder's output")
    bad = [k for k, g in bgrads.items() if g is not None and not torch.isfinite(g).all()]
    _require(not bad, f"backbone parameters of {n} get non-finite gradients (e.g. {bad[:3]})")
    _require(any(g is not None and g.abs().sum() > 0 for g in bgrads.values()), f"every backbone gradient of {n} is zero")
    # targets: no gradient, untouched by the optimizer step
    for name, p in method.named_parameters():
        if not p.requires_grad:
            _require(r.grads[name] is None, f"frozen parameter {name} got a gradient")
            _require(
                torch.equal(p, r.before[name]),
                f"frozen parameter {name} changed in the optimizer step: keep target networks out of param_groups()",
            )
    _require(
        any(not torch.equal(p, r.before[name]) for name, p in backbone.named_parameters(prefix="encoder")),
        f"one SGD step left {n}'s backbone unchanged",
    )


def check_momentum(target: MethodLike | OneStep | Method) -> None:
    """``momentum_pairs()`` covers exactly the frozen parameters, online modules train, the rate is
    in [0, 1] at every step, and one ``after_optimizer_step`` is exactly the EMA
    ``target <- m * target + (1 - m) * online``."""
    method = target if isinstance(target, Method) else _stepped(target).method
    n = type(method).__name__
    frozen = {id(p) for p in method.parameters() if not p.requires_grad}
    pairs = method.momentum_pairs()
    if not pairs:
        _require(
            not frozen,
            f"frozen parameters but no momentum_pairs() in {n}: return every (online, target) pair, or keep the parameters trainable",
        )
        return
    targets = {id(p) for _, t in pairs for p in t.parameters()}
    _require(targets == frozen, "momentum_pairs() must cover exactly the frozen (target) parameters")
    for online, _ in pairs:
        _require(all(p.requires_grad for p in online.parameters()), f"an online module of {n}.momentum_pairs() has frozen parameters")
    for total in (1, 10, 1000):
        for step in (0, total // 2, total - 1, total):
            m = method.momentum_at(step_info(step, total))
            _require(0.0 <= m <= 1.0, f"{n}.momentum_at(step {step} of {total}) = {m}: an EMA rate must be in [0, 1]")
    m = method.momentum_at(step_info(0, 100))
    olds = [[p.detach().clone() for p in target.parameters()] for _, target in pairs]
    method.after_optimizer_step(step_info(0, 100))  # the default hook: the EMA of every pair
    for (online, tgt), old in zip(pairs, olds):
        for (name, t), o, p in zip(tgt.named_parameters(), old, online.parameters()):
            _require(
                torch.equal(t, o * m + p.detach() * (1 - m)),
                f"{name}: after_optimizer_step is not the EMA target <- m * target + (1 - m) * online of momentum_pairs()",
            )


def check_gradient_cache(target: MethodLike | OneStep) -> str | None:
    """With ``supports_grad_cache``: ``loss_from_embeddings(embed(batch))`` is ``training_step``'s
    loss, ``embed`` gives one row per sample and ``embed(targets=False)`` at most as many columns.
    Without: ``embed`` raises NotImplementedError. Returns why the check does not apply, or None."""
    r = _stepped(target)
    method = r.method
    n = r.cls.__name__
    if not r.cls.supports_grad_cache:
        try:
            method.embed(make_batch(r.views))
        except NotImplementedError:
            return f"{n} does not support the gradient cache"
        raise AssertionError(f"{n}.embed works but supports_grad_cache is False: set supports_grad_cache = True to allow --grad-cache-chunk")
    b = make_batch(r.views, step=3, total=10)
    with torch.no_grad():
        emb = method.embed(b)
        online = method.embed(b, targets=False)
        loss, _ = method.loss_from_embeddings(emb)
        direct, _ = method.training_step(b)
    _require(
        emb.shape[0] == BATCH and online.shape[0] == BATCH and online.shape[1] <= emb.shape[1],
        f"{n}.embed must return (B, ...) per-sample rows, and embed(targets=False) the first columns only: got {tuple(emb.shape)}, {tuple(online.shape)}",
    )
    _require(
        torch.allclose(loss, direct, rtol=1e-5, atol=1e-6),
        f"{n}.loss_from_embeddings(embed(batch)) = {loss.item()} but training_step(batch) gives {direct.item()}: the gradient cache would train another loss",
    )
    return None


def check_loss_decreases(target: MethodLike | OneStep, *, steps: Sequence[float] = (1e-3, 1e-4, 1e-5)) -> None:
    """A small step against the gradient lowers the loss of the batch it was computed on, from the
    method's state before the step (queues, centres, target networks and the RNG as they were):
    ``loss(theta - s * g) < loss(theta)`` for a step of ``steps`` x the norm of the trained
    parameters (the first that lowers it passes). This is what "the loss decreases" can mean for
    every method, including those whose training loss rises at first by design (measured over 20
    steps on fresh easy batches with their recipes: MoCo's from 3.5 to 5.6 as its queue fills with
    real keys, DINO's from 7.8 to 8.4 as its teacher sharpens). It fails when the gradient the
    optimizer gets does not descend the returned loss: a custom autograd Function with a wrong
    backward (a hand-written all-gather), a loss that depends on parameters its gradient misses, a
    loss that is not a function of the batch and the parameters. It cannot tell a loss with the
    wrong sign (the optimizer then minimises it just as well): :func:`check_no_collapse` can."""
    r = _stepped(target)
    n = r.cls.__name__
    grads = {k: g for k, g in r.grads.items() if g is not None}
    _require(grads, f"{n}.training_step's loss gives no parameter a gradient")
    trained = dict(r.initial.named_parameters())
    p_norm = math.sqrt(sum(float(trained[k].detach().double().pow(2).sum()) for k in grads))
    g_norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads.values()))
    _require(g_norm > 0, f"every gradient of {n}'s loss is zero")

    def loss_at(scale: float) -> float:
        """The loss of the step's batch from the state before the step, parameters moved by ``-scale * grad``
        (computed as one_step computed it: with autograd on, from the same RNG state)."""
        model = copy.deepcopy(r.initial)
        with torch.no_grad():
            for k, p in model.named_parameters():
                if k in grads:
                    p.sub_(grads[k], alpha=scale)
        state = torch.get_rng_state()
        torch.set_rng_state(r.rng)
        try:
            loss, _ = model.training_step(r.batch())
        finally:
            torch.set_rng_state(state)
        return float(loss.detach())

    start = float(r.loss.detach())  # loss_at(0.0), computed by one_step
    tried = []
    for rel in steps:
        after = loss_at(rel * max(p_norm, 1e-12) / g_norm)
        tried.append(f"{after:.6g} at {rel:g}")
        if after < start - 1e-6 * abs(start):
            return
    raise AssertionError(
        f"a small step against the gradient does not lower {n}'s loss: {start:.6g} at the start, {', '.join(tried)} x |params|. "
        "The gradient the optimizer gets must descend the loss training_step returns: check the backward of custom autograd Functions "
        "(e.g. a hand-written all-gather), that the gradient reaches every parameter the loss depends on (no .detach() or torch.no_grad() "
        "on a path that is trained), and that the loss is a function of the batch and the parameters"
    )


def _easy_views(specs: Sequence[ViewSpec], batch: int, generator: torch.Generator) -> list[Tensor]:
    """Easy data: views of the same random images at each view's size, each with a little noise."""
    base = torch.randn(batch, 3, SIZE, SIZE, generator=generator)
    out = []
    for s in specs:
        x = base if s.size == SIZE else torch.nn.functional.interpolate(base, size=(s.size, s.size), mode="bilinear", antialias=True)
        out.append(x + 0.1 * torch.randn(x.shape, generator=generator))
    return out


def check_trains(target: MethodLike | OneStep, *, steps: int = 2, lr: float = 1e-3) -> None:
    """``steps`` more steps after :func:`one_step`'s, as the trainer runs them (training_step,
    backward, after_backward, an SGD step, after_optimizer_step), on easy data (the views of a
    sample are noisy copies of one image) and step info that moves on: the loss and the logs stay
    finite, every trainable parameter gets a gradient, and parameters and buffers stay finite.
    Works on a copy of the method."""
    r = _stepped(target)
    n = r.cls.__name__
    method = copy.deepcopy(r.method)
    method.train()
    opt = build_optimizer("sgd", method.param_groups(param_groups(method, 1e-4)), lr, weight_decay=1e-4)
    trainable = {k: p for k, p in method.named_parameters() if p.requires_grad}
    got_grad = {k for k, g in r.grads.items() if g is not None}
    g = torch.Generator().manual_seed(1)
    for k in range(steps):
        info = step_info(4 + k, 10)
        views = _easy_views(r.specs, BATCH, g)
        loss, logs = method.training_step(Batch(views, torch.arange(BATCH * (k + 1), BATCH * (k + 2)), info))
        _require(torch.isfinite(loss), f"{n}'s loss is {loss.item()} at training step {k + 2} (easy data, SGD lr {lr}): it must stay finite")
        for key, v in logs.items():
            _require(torch.isfinite(v).all(), f"{n}'s log {key!r} is not finite at training step {k + 2}")
        loss.backward()
        got_grad |= {key for key, p in trainable.items() if p.grad is not None}
        method.after_backward(info)
        opt.step()
        opt.zero_grad(set_to_none=True)
        method.after_optimizer_step(info)
    unused = sorted(set(trainable) - got_grad)
    _require(
        not unused,
        f"trainable parameters of {n} never get a gradient (e.g. {unused[:3]}): use them in the loss, freeze them (requires_grad=False, "
        "and return them from momentum_pairs()), or drop them",
    )
    bad = [k for k, t in method.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
    _require(not bad, f"parameters or buffers of {n} became non-finite in {steps + 1} steps: {bad[:3]}")


def check_views_of_several_sizes(method: MethodLike, *, backbone: Backbone = MULTISIZE_VIT) -> str | None:
    """On a 2-block ViT-Tiny (patch 4 at 32 px), ``method``'s own views, or, when they all have
    one size, the same views with the last at half the size (16 px, a 4x4 grid): one step gives a
    finite loss and gradients on the patch and position embeddings. Returns why it does not apply
    (a method that trains on one view, or refuses a vision transformer), or None."""
    ref = resolve_method(method)
    cls = ref.cls
    torch.manual_seed(0)
    module = tiny_backbone(backbone)
    try:
        model = cls(module, cls.Config())
    except UserError as exc:  # a method for convnets only
        return f"{ref.label} refuses the vision transformer {backbone[0]}: {exc}"
    model.train()
    sizes = [s.size for s in default_views(model, AugmentConfig(), 32)]
    if len(sizes) < 2:
        return f"{ref.label} trains on one view (nothing to encode at a second size)"
    if len(set(sizes)) == 1:
        sizes[-1] //= 2
    _require(len(set(sizes)) == 2, f"{cls.__name__}.views() gives {len(set(sizes))} sizes; this check trains two")
    loss, _ = model.training_step(make_batch([torch.randn(4, 3, s, s) for s in sizes], step=1, total=10))
    loss.backward()
    _require(torch.isfinite(loss), f"{cls.__name__}'s loss is {loss.item()} on views of sizes {sizes}")
    for name in ("pos_embed", "patch_embed.proj.weight"):
        p = module.get_parameter(name)
        _require(
            p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0,
            f"the ViT's {name} gets no finite, non-zero gradient from {cls.__name__} on views of sizes {sizes}: encode every view with "
            "sslbench.api.encode_views(self.encoder, batch.views) (one pass per size)",
        )
    return None


# ----------------------------------------------------------------------------------------------
# Running the command line in new processes


def run_group(cmd: list[str], env: Mapping[str, str], timeout_s: float, log: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` in its own process group; on timeout kill the whole group (torchrun's workers
    too) and fail with the tail of its stderr. ``log`` gets stdout + stderr either way."""
    proc = subprocess.Popen(cmd, env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    timed_out = False
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        timed_out = True
    if log is not None:
        log.write_text(out + err)
    if timed_out:
        raise AssertionError(f"{' '.join(cmd[:6])} ... did not finish in {timeout_s}s:\n{err[-4000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def train_argv(
    method: str,
    out: Path,
    *,
    backbone: Backbone,
    steps: int = TWO_PROCESS_STEPS,
    batch: int = TWO_PROCESS_BATCH,
    seed: int = TWO_PROCESS_SEED,
    knn: bool = False,
    sets: Sequence[str] = (),
    args: Sequence[str] = (),
) -> list[str]:
    """The ``sslbench train`` arguments of the multi-process check: ``steps`` steps of global batch
    ``batch`` at 32 px on ``backbone``, fp32, NCHW, a metrics record every step, no checkpoint
    before the end, the end-of-training k-NN only with ``knn``; then ``--set`` each of ``sets``, then ``args``."""
    argv = [
        "train",
        "--method",
        method,
        "--steps",
        str(steps),
        "--batch-size",
        str(batch),
        "--precision",
        "no",
        "--seed",
        str(seed),
        "--image-size",
        "32",
        "--quiet",
        "--output",
        str(out),
        *backbone_cli_args(backbone),
        "--set",
        "log_every=1",
        "--set",
        "checkpoint_every=0",
        # NCHW: torch's channels-last CPU BatchNorm uses a one-pass variance (~1e-2 relative gradient error)
        "--set",
        "channels_last=false",
    ]
    if not knn:
        argv += ["--set", "quick_knn=false"]
    for s in sets:
        argv += ["--set", s]
    return [*argv, *args]


def torchrun_command(argv: Sequence[str], nproc: int = 2) -> list[str]:
    """``python -m torch.distributed.run --standalone --nproc_per_node N -m sslbench.testing ARGV``:
    ``nproc`` CPU processes (gloo; Accelerate's multi-CPU mode) running the driver of this module."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "sslbench.testing", *argv]


def _module_root(cls: type) -> str | None:
    """The folder to put on the path for ``import cls.__module__``."""
    file = getattr(sys.modules.get(cls.__module__), "__file__", None)
    if not file:
        return None
    path = Path(file).resolve()
    depth = cls.__module__.count(".") + (1 if path.name == "__init__.py" else 0)
    return str(path.parents[depth])


def _sslbench_root() -> str:
    import sslbench

    return str(Path(sslbench.__file__).resolve().parents[1])


def child_env(refs: Sequence[MethodRef] = (), extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of the processes the checks start: this one's, one thread per process, the
    same sslbench and every method's module on the path, then ``extra`` (its ``PYTHONPATH`` and
    ``SSLBENCH_CALLBACKS`` are added to, not replaced)."""
    extra = dict(extra or {})
    roots = [_sslbench_root(), *(r for r in (_module_root(ref.cls) for ref in refs) if r)]
    path = [*roots, extra.pop("PYTHONPATH", ""), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **extra}
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(p for p in path if p))
    return env


def _with_callback(env: Mapping[str, str], spec: str) -> str:
    return ",".join(filter(None, [env.get(CALLBACKS_ENV, ""), spec]))


def _job(key: str, ref: MethodRef, argv: Sequence[str], env: Mapping[str, str] | None = None, expect: int = 0) -> dict[str, Any]:
    return {"key": key, "name": ref.name, "path": ref.path, "argv": list(argv), "env": dict(env or {}), "expect": expect}


def _driver_command(jobs: Sequence[dict[str, Any]]) -> list[str]:
    return [sys.executable, "-m", "sslbench.testing", json.dumps(list(jobs))]


def _finished_jobs(stdout: str) -> dict[str, int]:
    """{key: exit status} of the jobs the driver finished."""
    out: dict[str, int] = {}
    for line in stdout.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == JOB_DONE and out.get(parts[1], 0) == 0:
            out[parts[1]] = int(parts[2])  # several processes report a job: the first failure stands
    return out


def _run_jobs(jobs: Sequence[dict[str, Any]]) -> int:
    """The driver (``python -m sslbench.testing JOBS``): run each job's ``sslbench`` argv in this
    process, with its method registered and its environment set; 0 when each exited as expected."""
    from sslbench.commands.cli import main

    ok = True
    for job in jobs:
        saved = dict(os.environ)
        os.environ.update(job["env"])
        try:
            if job["path"]:  # the class, registered under the name the parent process gave it
                cls = resolve_method(job["path"]).cls
                if not (job["name"] in METHODS and METHODS.get(job["name"]) is cls):
                    register_method(job["name"])(cls)
            rc = main(job["argv"])
        except SystemExit as exc:
            rc = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            traceback.print_exc()
            rc = 1
        finally:
            os.environ.clear()
            os.environ.update(saved)
        print(f"{JOB_DONE} {job['key']} {rc}", flush=True)
        ok = ok and rc == job["expect"]
    return 0 if ok else 1


class SaveRankState(Callback):
    """Writes the method's state (parameters and buffers) of every process to
    ``$SSLBENCH_TESTING_RANK_STATE/rank{R}.safetensors`` when training ends, for
    :func:`assert_ranks_agree`; does nothing without that variable."""

    order = 100

    def on_train_end(self, run: Run, steps_done: int) -> None:
        folder = os.environ.get(RANK_STATE_ENV)
        if not folder:
            return
        from safetensors.torch import save_file

        Path(folder).mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().clone().contiguous() for k, v in run.method.state_dict().items()}
        buffers = [k for k, _ in run.method.named_buffers()]
        save_file(state, str(Path(folder) / f"rank{run.rank}.safetensors"), metadata={"buffers": json.dumps(buffers), "steps": str(steps_done)})


class StopAfterStep(Callback):
    """Stops the run after ``$SSLBENCH_TESTING_STOP_AFTER`` steps as a SIGTERM does: a checkpoint of
    that step, then exit 143 (the resume check's interrupted run)."""

    order = -5  # after StopControl (-10), which would clear the stop

    def __init__(self) -> None:
        self.at = int(os.environ.get(STOP_AFTER_ENV, "0") or 0)

    def on_step_end(self, run: Run, batch: Batch, control: Control) -> None:
        if self.at and control.done == self.at:
            control.stop_signal = signal.SIGTERM


# ----------------------------------------------------------------------------------------------
# Two processes equal one


def assert_tensors_close(name: str, a: Tensor, b: Tensor, min_scale: float = MIN_SCALE, *, what: str = "2 proc - 1 proc") -> None:
    """``max|a - b| <= RTOL * max(max|b|, min_scale) + ATOL`` (integer tensors: equal)."""
    _require(a.shape == b.shape and a.dtype == b.dtype, f"{name}: {a.shape} {a.dtype} vs {b.shape} {b.dtype}")
    if not a.is_floating_point():
        _require(torch.equal(a, b), f"{name}: {a} != {b}")
        return
    a64, b64 = a.double(), b.double()
    err = (a64 - b64).abs().max().item() if a.numel() else 0.0
    tol = RTOL * max(b64.abs().max().item() if b.numel() else 0.0, min_scale) + ATOL
    _require(err <= tol, f"{name}: max |{what}| = {err:.3g} > {tol:.3g} (max |{what.split(' - ')[-1]}| = {b64.abs().max().item():.3g})")


def _metrics(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def assert_ranks_agree(ranks: Path, min_scale: float = MIN_SCALE) -> None:
    """Every process of a run ended with the same parameters and buffers (the files
    :class:`SaveRankState` wrote into ``ranks``). DDP keeps parameters equal; buffers are each
    process's own (sslbench trains with ``broadcast_buffers=False``): one updated from the local
    batch silently diverges."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    files = sorted(ranks.glob("rank*.safetensors"))
    _require(len(files) >= 2, f"no per-process states in {ranks} (the SaveRankState callback did not run)")
    with safe_open(str(files[0]), framework="pt") as f:
        buffers = set(json.loads((f.metadata() or {}).get("buffers", "[]")))
    first = load_file(str(files[0]))
    for other in files[1:]:
        state = load_file(str(other))
        _require(state.keys() == first.keys(), f"{other.stem} and {files[0].stem} hold different tensors")
        for key in first:
            try:
                assert_tensors_close(key, state[key], first[key], min_scale, what=f"{other.stem} - {files[0].stem}")
            except AssertionError as exc:
                if key in buffers:
                    raise AssertionError(
                        f"buffer {key} differs between the processes of one run ({exc}): DDP does not synchronise buffers, so a buffer "
                        "updated from each process's own batch diverges; update it from values every process shares (gather the batch's "
                        "values with sslbench.api.gather_no_grad, or average the update with sslbench.api.all_reduce_mean), as MoCo's "
                        "queue (sslbench.api.MemoryBank) and DINO's centre do, or keep the state out of buffers"
                    ) from None
                raise AssertionError(
                    f"parameter {key} differs between the processes of one run ({exc}): DDP keeps parameters equal through the optimizer "
                    "step, so something else changes it per process (after_backward or after_optimizer_step acting on local values)"
                ) from None


def assert_two_processes_equal_one(
    one: Path, two: Path, *, steps: int = TWO_PROCESS_STEPS, batch: int = TWO_PROCESS_BATCH, min_scale: float = MIN_SCALE, knn: bool = False
) -> None:
    """The run directories ``one`` (1 process) and ``two`` (2 processes, same global batch) agree:
    one metrics record per step, the same lr, the loss (the mean over processes) within the
    tolerance, every tensor of ``encoder.safetensors`` and ``method.safetensors`` within
    :func:`assert_tensors_close`'s tolerance; and, with ``knn``, the end-of-training k-NN."""
    m1, m2 = _metrics(one), _metrics(two)
    # Only the main process writes: one record per step, not one per process.
    _require(
        [r["step"] for r in m1] == [r["step"] for r in m2] == list(range(1, steps + 1)),
        f"metrics.jsonl steps: {[r['step'] for r in m1]} (1 proc) vs {[r['step'] for r in m2]} (2 proc), expected 1..{steps}",
    )
    for r1, r2 in zip(m1, m2):
        _require(r1["lr"] == r2["lr"] and r1.keys() == r2.keys(), f"step {r1['step']}: lr or logged keys differ: {r1} vs {r2}")
        # The logged loss is the mean over processes of the local losses = the 1-process loss.
        # (Other logged scalars are averaged over processes too, but a per-process statistic such
        # as SimSiam's z_std, a std over the local batch, is not the global one: not compared.)
        _require(
            abs(r2["loss"] - r1["loss"]) <= RTOL * abs(r1["loss"]) + ATOL,
            f"step {r1['step']}: loss {r2['loss']!r} (2 proc) vs {r1['loss']!r} (1 proc). {FIX_DISTRIBUTED}",
        )

    from safetensors.torch import load_file

    for fname in ("encoder.safetensors", "method.safetensors"):
        t1, t2 = load_file(str(one / fname)), load_file(str(two / fname))
        _require(t1.keys() == t2.keys(), fname)
        for key in t1:
            try:
                assert_tensors_close(f"{fname}:{key}", t2[key], t1[key], min_scale)
            except AssertionError as exc:
                raise AssertionError(f"{exc} after {steps} steps. {FIX_DISTRIBUTED}") from None

    r1 = json.loads((one / "results.json").read_text())
    r2 = json.loads((two / "results.json").read_text())
    _require((r1["processes"], r2["processes"]) == (1, 2), f"processes: {r1['processes']}, {r2['processes']}")
    _require(r1["batch_size"] == r2["batch_size"] == batch, f"batch sizes {r1['batch_size']}, {r2['batch_size']}, expected {batch}")
    if knn:  # the k-NN ran once, on the main process, on equal encoders
        _require("knn_top1" in r2["metrics"] and "untrained_knn_top1" in r2["metrics"], f"no k-NN in {two / 'results.json'}")
        _require(r2["metrics"]["untrained_knn_top1"] == r1["metrics"]["untrained_knn_top1"], "the untrained k-NN differs")
        _require(abs(r2["metrics"]["knn_top1"] - r1["metrics"]["knn_top1"]) <= 100 / 450 + 1e-9, "the k-NN differs by more than one test image")


@dataclass(frozen=True)
class TwoProcessRun:
    """One method's pair of runs for :class:`TwoProcessRuns`: ``--set`` values ``sets`` and extra
    arguments ``args``; ``knn``: also the end-of-training k-NN; ``min_scale``: the tensor scale floor."""

    key: str
    method: MethodLike | MethodRef
    sets: tuple[str, ...] = ()
    args: tuple[str, ...] = ()
    backbone: Backbone | None = None  # None: method_backbone(method)
    knn: bool = False
    min_scale: float = MIN_SCALE


class TwoProcessRuns:
    """The training runs of :func:`check_two_processes_equal_one` for several methods, started in
    the background at once: the 1-process references one after the other in one Python process (the
    driver; imports dominate such tiny runs), and the 2-process runs split into ``parallel``
    ``torchrun`` launches, each training its share one after the other. :meth:`result` waits for
    one method's pair; :meth:`check` compares it."""

    def __init__(
        self,
        root: Path,
        runs: Sequence[TwoProcessRun],
        *,
        env: Mapping[str, str] | None = None,
        parallel: int = 2,
        reference: bool = True,
        timeout_s: float = RUN_TIMEOUT_S,
    ) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.runs = {r.key: r for r in runs}
        self.refs = {r.key: resolve_method(r.method) for r in runs}
        for key, ref in self.refs.items():
            _require_importable(ref, f"the 2-process run of {key}")
        self.backbones = {r.key: r.backbone or method_backbone(self.refs[r.key].cls) for r in runs}
        self.env = child_env(list(self.refs.values()), env)
        self.timeout_s = timeout_s
        keys = list(self.runs)
        groups = [keys[i::parallel] for i in range(min(parallel, len(keys)))]
        self.pool = ThreadPoolExecutor(max_workers=len(groups) + 1)
        self.reference: Future[subprocess.CompletedProcess[str]] | None = self.pool.submit(self._reference) if reference else None
        self.futures = {}
        for i, group in enumerate(groups):
            future = self.pool.submit(self._two_processes, group, self.root / f"2proc-{i}.log")
            self.futures.update({key: future for key in group})

    def out(self, key: str, world: int) -> Path:
        return self.root / f"{key}-{world}proc"

    def ranks(self, key: str) -> Path:
        """Where the 2-process run of ``key`` leaves each process's state (:class:`SaveRankState`)."""
        return self.root / f"{key}-2proc-ranks"

    def _argv(self, key: str, world: int) -> list[str]:
        r = self.runs[key]
        return train_argv(self.refs[key].name, self.out(key, world), backbone=self.backbones[key], knn=r.knn, sets=r.sets, args=r.args)

    def _reference(self) -> subprocess.CompletedProcess[str]:
        jobs = [_job(key, self.refs[key], self._argv(key, 1)) for key in self.runs]
        timeout = self.timeout_s * max(1, len(jobs)) // 2
        return run_group(_driver_command(jobs), self.env, timeout, self.root / "reference.log")

    def _two_processes(self, keys: Sequence[str], log: Path) -> subprocess.CompletedProcess[str]:
        """One ``torchrun`` whose two processes train the runs ``keys`` one after the other (each
        with its own ``RANK_STATE_ENV``): one launch and one import of torch per process instead of
        one per run, which dominate runs this small."""
        env = {**self.env, CALLBACKS_ENV: _with_callback(self.env, "sslbench.testing:SaveRankState")}
        jobs = [_job(key, self.refs[key], self._argv(key, 2), {RANK_STATE_ENV: str(self.ranks(key))}) for key in keys]
        return run_group(torchrun_command([json.dumps(jobs)]), env, self.timeout_s * len(keys), log)

    def result(self, key: str) -> tuple[Path, Path]:
        """The (1-process, 2-process) run directories of ``key``, once both finished."""
        wait = self.timeout_s * (len(self.runs) + 1)
        if self.reference is not None:
            ref = self.reference.result(timeout=wait)
            done = _finished_jobs(ref.stdout)
            _require(
                done.get(key) == 0,
                f"1-process run of {key} failed (rc={done.get(key, ref.returncode)}):\n{ref.stdout[-3000:]}\n{ref.stderr[-6000:]}",
            )
        proc = self.futures[key].result(timeout=wait)
        rc = _finished_jobs(proc.stdout).get(key)
        _require(
            rc == 0, f"{key} on 2 processes failed (rc={rc if rc is not None else proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )
        return self.out(key, 1), self.out(key, 2)

    def check(self, key: str) -> None:
        """Both processes of ``key``'s run hold the same state, and (with the reference runs) 2 processes equal 1."""
        one, two = self.result(key)
        r = self.runs[key]
        assert_ranks_agree(self.ranks(key), r.min_scale)
        if self.reference is not None:
            assert_two_processes_equal_one(one, two, min_scale=r.min_scale, knn=r.knn)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def _workdir(workdir: Path | None, prefix: str) -> tuple[Path, bool]:
    if workdir is not None:
        Path(workdir).mkdir(parents=True, exist_ok=True)
        return Path(workdir), False
    return Path(tempfile.mkdtemp(prefix=prefix)), True


def _in_processes(
    method: MethodLike,
    check: str,
    *,
    reference: bool,
    sets: Sequence[str],
    args: Sequence[str],
    backbone: Backbone | None,
    min_scale: float,
    workdir: Path | None,
    env: Mapping[str, str] | None,
) -> None:
    ref = resolve_method(method)
    root, temporary = _workdir(workdir, "sslbench-check-")
    runs = TwoProcessRuns(
        root, [TwoProcessRun(ref.cls.__name__, ref, tuple(sets), tuple(args), backbone, False, min_scale)], env=env, reference=reference
    )
    try:
        runs.check(ref.cls.__name__)
    except AssertionError as exc:
        raise AssertionError(f"{check}({ref.label}): {exc}\n(runs and logs kept in {root})") from None
    finally:
        runs.close()
    if temporary:
        shutil.rmtree(root, ignore_errors=True)


def check_two_processes_equal_one(
    method: MethodLike,
    *,
    sets: Sequence[str] = (),
    args: Sequence[str] = (),
    backbone: Backbone | None = None,
    min_scale: float = MIN_SCALE,
    workdir: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> None:
    """Trains 3 steps of global batch 16 on digits at 32 px through ``sslbench train``, in one
    process and with ``torchrun`` in two CPU processes (gloo, SyncBatchNorm, seed 3, fp32), and
    requires the same per-step losses and final tensors (relative 1e-5 of ``max(max|t|,
    min_scale)``) and the same state in both processes (:func:`assert_ranks_agree`). ``sets``:
    ``--set`` values (e.g. a queue small enough to be used within 3 steps); ``args``: other flags.
    The class must be importable in the new processes (see the module docstring). Runs stay in
    ``workdir`` (default: a temporary folder, removed when the check passes)."""
    _in_processes(
        method,
        "check_two_processes_equal_one",
        reference=True,
        sets=sets,
        args=args,
        backbone=backbone,
        min_scale=min_scale,
        workdir=workdir,
        env=env,
    )


def check_no_per_process_state(
    method: MethodLike,
    *,
    sets: Sequence[str] = (),
    args: Sequence[str] = (),
    backbone: Backbone | None = None,
    min_scale: float = MIN_SCALE,
    workdir: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> None:
    """The 2-process run of :func:`check_two_processes_equal_one` alone: both processes end with
    the same parameters and buffers (a buffer updated from the local batch diverges, as DDP does
    not synchronise buffers)."""
    _in_processes(
        method,
        "check_no_per_process_state",
        reference=False,
        sets=sets,
        args=args,
        backbone=backbone,
        min_scale=min_scale,
        workdir=workdir,
        env=env,
    )


# ----------------------------------------------------------------------------------------------
# Resume


def assert_same_weights(a: Path, b: Path) -> None:
    """``encoder.safetensors`` and ``method.safetensors`` of run dirs ``a`` and ``b`` hold exactly
    the same tensors (same keys, dtypes, shapes and bits)."""
    from safetensors.torch import load_file

    for name in ("encoder.safetensors", "method.safetensors"):
        ta, tb = load_file(str(a / name)), load_file(str(b / name))
        _require(ta.keys() == tb.keys(), name)
        different = [k for k in ta if ta[k].dtype != tb[k].dtype or not torch.equal(ta[k], tb[k])]
        _require(not different, f"{name}: {len(different)} of {len(ta)} tensors differ, e.g. {different[:3]}")


def check_resume_equals_unbroken(
    method: MethodLike,
    *,
    steps: int = 6,
    stop_after: int = 3,
    sets: Sequence[str] = (),
    args: Sequence[str] = (),
    backbone: Backbone | None = None,
    workdir: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> None:
    """Trains ``steps`` steps through ``sslbench train`` (32 class-balanced digits at 32 px, batch
    16: an epoch every 2 steps; deterministic algorithms), once unbroken and once stopped after
    ``stop_after`` steps as by a SIGTERM (a checkpoint of that step), then resumed in a new process
    with ``--resume``: every logged loss and lr and every final tensor must be bit for bit the
    unbroken run's. State a method keeps across steps must be in its parameters or registered
    buffers (checkpoints hold those, not Python attributes). The class must be importable in the
    new processes (see the module docstring)."""
    ref = resolve_method(method)
    _require_importable(ref, "check_resume_equals_unbroken")
    root, temporary = _workdir(workdir, "sslbench-check-")
    spec = backbone or method_backbone(ref.cls)
    full_env = child_env([ref], env)

    def argv(out: Path) -> list[str]:
        base = train_argv(ref.name, out, backbone=spec, steps=steps, batch=16, seed=0, sets=sets, args=args)
        return [*base, "--train-subset", "32", "--set", "deterministic=true"]

    try:
        unbroken, broken = root / "unbroken", root / "interrupted"
        stop_env = {STOP_AFTER_ENV: str(stop_after), CALLBACKS_ENV: _with_callback(full_env, "sslbench.testing:StopAfterStep")}
        where = f"check_resume_equals_unbroken({ref.label})"
        first = run_group(
            _driver_command([_job("unbroken", ref, argv(unbroken)), _job("interrupted", ref, argv(broken), stop_env, 128 + signal.SIGTERM)]),
            full_env,
            2 * RUN_TIMEOUT_S,
            root / "first.log",
        )
        done = _finished_jobs(first.stdout)
        _require(done.get("unbroken") == 0, f"{where}: the unbroken run failed (rc={done.get('unbroken')}):\n{first.stderr[-6000:]}")
        _require(
            done.get("interrupted") == 128 + signal.SIGTERM,
            f"{where}: the run to interrupt did not stop after step {stop_after} (rc={done.get('interrupted')}):\n{first.stderr[-6000:]}",
        )
        second = run_group(
            _driver_command([_job("resumed", ref, ["train", "--output", str(broken), "--resume", "--quiet"])]),
            full_env,
            RUN_TIMEOUT_S,
            root / "resume.log",
        )
        _require(
            _finished_jobs(second.stdout).get("resumed") == 0,
            f"{where}: `sslbench train --output {broken} --resume` failed (rc={second.returncode}):\n{second.stderr[-6000:]}",
        )
        fix = (
            "State a method keeps across steps must be in parameters or registered buffers (self.register_buffer, or "
            "sslbench.api.MemoryBank): checkpoints hold the state_dict, the optimizer and the RNG states, not Python attributes; "
            "decisions that must survive a resume are pure functions of batch.info (step, epoch, progress)"
        )
        m_unbroken, m_resumed = _metrics(unbroken), _metrics(broken)
        _require(
            [r["step"] for r in m_resumed] == list(range(1, steps + 1)),
            f"{where}: the resumed run logged steps {[r['step'] for r in m_resumed]}, expected 1..{steps} once each",
        )
        for a, b in zip(m_resumed, m_unbroken):
            _require(
                a["loss"] == b["loss"] and a["lr"] == b["lr"],
                f"{where}: step {a['step']} gives loss {a['loss']!r}, lr {a['lr']!r} after the stop and resume at step {stop_after} but "
                f"{b['loss']!r}, {b['lr']!r} unbroken. {fix}",
            )
        try:
            assert_same_weights(broken, unbroken)
        except AssertionError as exc:
            raise AssertionError(f"{where}: the resumed run's final weights differ from the unbroken run's: {exc}. {fix}") from None
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n(runs and logs kept in {root})") from None
    if temporary:
        shutil.rmtree(root, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# No collapse


def check_no_collapse(
    method: MethodLike,
    workdir: Path,
    *,
    epochs: int = 4,
    batch_size: int = 128,
    seed: int = 0,
    sets: Sequence[str] = ("backbone_kwargs.channels=16,32,64,128",),
) -> str | None:
    """A short training on digits (``epochs`` epochs of ``batch_size``, a ResNet-18 of widths
    16-128 at the data's 16 px, in this process; the test images' features taken at 32 px) leaves spread-out embeddings and a better k-NN than the
    untrained backbone: the trained k-NN top-1 beats the untrained one's, and the mean
    per-dimension std of the L2-normalised test features is above 1.5x the untrained backbone's (a
    collapsed encoder has 0). Minutes on a CPU. Returns why it does not apply (a method that
    reconstructs pixels, whose collapse shows in its reconstruction loss instead), or None. A class
    that is not registered is registered in this process (under ``module.qualname``)."""
    import torch.nn.functional as F

    from sslbench.backbones import create_backbone
    from sslbench.commands.pipeline import train_and_score
    from sslbench.config import build_config
    from sslbench.config.build import load_encoder
    from sslbench.data import ImageSplit, load_split
    from sslbench.evaluation.features import extract_features

    ref = resolve_method(method)
    if ref.cls.supports_reconstruction:
        return f"{ref.label} reconstructs pixels: held to its own no-collapse test (see tests/test_no_collapse.py)"
    _ensure_registered(ref)
    if _build(ref.cls, None)[2] != TINY_RESNET:
        return f"{ref.label} refuses a ResNet: this check trains the ResNet-18 recipe; a ViT-only method's short runs are in its own tests"
    out = Path(workdir) / "run"
    cfg = build_config(
        flags={"method": ref.name, "epochs": epochs, "batch_size": batch_size, "seed": seed, "output": str(out)},
        sets=[*sets, "checkpoint_every=0"],
    )
    train_and_score(cfg, quiet=True)
    metrics = json.loads((out / "results.json").read_text())["metrics"]
    where = f"check_no_collapse({ref.label})"
    _require(
        metrics["knn_top1"] > metrics["untrained_knn_top1"],
        f"{where}: after {epochs} epochs on digits the k-NN top-1 {metrics['knn_top1']} does not beat the untrained backbone's "
        f"{metrics['untrained_knn_top1']}: the method learns nothing useful (check the loss, the views and the recipe's lr)",
    )
    encoder = load_encoder(out)
    # the test images at 32 px (the training runs at the data's own 16 px): as tests/test_no_collapse.py always measured
    test = load_split("digits", "test", 32)
    assert isinstance(test, ImageSplit)

    def spread(enc: nn.Module) -> float:
        h = F.normalize(extract_features(enc, test.images, image_size=32), dim=1)
        return float(h.std(dim=0).mean())

    torch.manual_seed(cfg.seed)
    assert cfg.image_size is not None
    untrained = create_backbone(cfg.backbone, cfg.image_size, **cfg.backbone_kwargs)
    std, base = spread(encoder), spread(untrained)
    _require(
        std > 1.5 * base,
        f"{where}: the trained features' spread {std:.4g} is not above 1.5x the untrained backbone's {base:.4g}: the embeddings "
        "collapse (every image maps to nearly one point); the loss needs a term against it (negatives, a predictor with a "
        "stop-gradient, variance/covariance terms, centring)",
    )
    return None


# ----------------------------------------------------------------------------------------------
# Everything


def check_method(
    method: MethodLike,
    *,
    processes: bool = True,
    no_collapse: bool = False,
    backbone: Backbone | None = None,
    sets: Sequence[str] = (),
    args: Sequence[str] = (),
    min_scale: float = MIN_SCALE,
    workdir: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Every check on ``method`` (a class, a registered name or ``"module:Class"``): the checks in
    one process (seconds), then, with ``processes``, :func:`check_resume_equals_unbroken` and
    :func:`check_two_processes_equal_one` (which includes :func:`check_no_per_process_state`; a
    minute or two on a CPU), and with ``no_collapse`` :func:`check_no_collapse` (minutes). Raises
    AssertionError at the first failure, naming the check; returns ``{check: "ok" or "not
    applicable: why"}``. ``sets`` (``--set`` values), ``args`` (other ``sslbench train`` flags) and
    ``min_scale`` go to the runs in new processes: sslbench's own test of 2 processes passes some
    for three built-in methods (tests/test_multiprocess.py, ``METHOD_SETS``: a queue small enough to
    be used within 3 steps; Barlow Twins at width 128, whose 2048-wide cross-correlation amplifies
    fp32 rounding past the tolerance at batch 16; DINO with SGD instead of AdamW, which turns
    rounding-level gradients into lr-sized steps)."""
    ref = resolve_method(method)
    report: dict[str, str] = {}

    def run(name: str, fn: Any, *a: Any, **kw: Any) -> None:
        try:
            why = fn(*a, **kw)
        except AssertionError as exc:
            msg = str(exc)
            raise AssertionError(msg if msg.startswith(name) else f"{name}({ref.label}): {msg}") from None
        report[name] = f"not applicable: {why}" if isinstance(why, str) else "ok"

    stepped = one_step(ref.cls, backbone=backbone)
    run("check_builds", check_builds, stepped)
    run("check_training_step", check_training_step, stepped)
    run("check_momentum", check_momentum, stepped)
    run("check_gradient_cache", check_gradient_cache, stepped)
    run("check_loss_decreases", check_loss_decreases, stepped)
    run("check_trains", check_trains, stepped)
    run("check_views_of_several_sizes", check_views_of_several_sizes, ref)
    if processes:
        run(
            "check_resume_equals_unbroken",
            check_resume_equals_unbroken,
            ref,
            sets=sets,
            args=args,
            backbone=backbone,
            env=env,
            workdir=workdir and workdir / "resume",
        )
        run(
            "check_two_processes_equal_one",
            check_two_processes_equal_one,
            ref,
            sets=sets,
            args=args,
            backbone=backbone,
            min_scale=min_scale,
            env=env,
            workdir=workdir and workdir / "ddp",
        )
    if no_collapse:
        root, temporary = _workdir(workdir and workdir / "no_collapse", "sslbench-check-")
        run("check_no_collapse", check_no_collapse, ref, root)
        if temporary:
            shutil.rmtree(root, ignore_errors=True)
    return report


if __name__ == "__main__":  # the driver of the checks that start processes: python -m sslbench.testing JOBS_JSON
    sys.exit(_run_jobs(json.loads(sys.argv[1])))
