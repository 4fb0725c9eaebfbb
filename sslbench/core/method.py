"""The method plugin contract: a small base class with do-nothing defaults.

A method is an :class:`Method` subclass registered with ``@register_method(name)``, built as
``Method(backbone, cfg)`` from a timm backbone (with ``num_features``) and its own ``Config``
dataclass. It implements :meth:`Method.training_step`; every other hook has a default that does
nothing (or the common thing), and the trainer calls every hook unconditionally: nothing is looked
up by name. A method never touches devices, process groups or optimizers: negatives from other
processes come through :mod:`sslbench.core.dist`, which is the identity in one process.

The step's input is a :class:`Batch`: the views (one tensor per :class:`ViewSpec` of
:meth:`Method.views`, views of several sizes allowed), the global indices of its samples and a
:class:`StepInfo` (step, epoch, progress, seed). Per-sample randomness inside a method (a mask)
comes from :meth:`Batch.uniform`, the counter-based generator augmentation uses, so it is a pure
function of (seed, epoch, sample, stream): N processes draw what one draws and a resumed run
draws what an unbroken one draws.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Literal, NamedTuple

import torch
from torch import Tensor, nn

from sslbench.core.augment import AugmentConfig, counter_uniform
from sslbench.core.momentum import ema_update_
from sslbench.core.schedules import cosine_between

__all__ = [
    "EMBEDDING_LOG",
    "ENTROPY_FRAC_LOG",
    "FAMILIES",
    "Batch",
    "Family",
    "Method",
    "MethodConfig",
    "Recipe",
    "Reconstruction",
    "Schedule",
    "StepInfo",
    "ViewSpec",
    "asymmetric",
    "cosine_schedule",
    "default_views",
    "linear_warmup",
]

# The two documented non-obvious keys of a training step's logs (the health figures, sslbench/core/health.py):
EMBEDDING_LOG = "embedding"  # detached (B, d) per-sample embedding the loss acts on; taken out, never logged
ENTROPY_FRAC_LOG = "teacher_entropy_frac"  # scalar: mean entropy of per-sample targets over K outputs / log K

# Streams of Batch.uniform sit above any view index, so they never repeat an augmentation's draws.
_METHOD_STREAM_BASE = 1 << 20


@dataclass(frozen=True)
class StepInfo:
    """Where a training step stands; a pure function of the step (and, under a time budget alone,
    of the elapsed time)."""

    step: int  # 0-based index of this optimizer step
    epoch: int  # 0-based epoch of this step
    steps_per_epoch: int  # optimizer steps in one epoch
    total_steps: int  # planned steps (a very large number under a time budget alone)
    progress: float  # in [0, 1]: step / total_steps, or elapsed / budget under a time budget
    seed: int  # the run's seed
    time_based: bool = False  # a time budget alone bounds the run: progress is elapsed / budget

    @property
    def epoch_float(self) -> float:
        """Epochs done before this step, fractional (step / steps_per_epoch)."""
        return self.step / self.steps_per_epoch


@dataclass(frozen=True)
class ViewSpec:
    """One view a method trains on: its augmentation and its output side in px."""

    aug: AugmentConfig  # augmentation of this view
    size: int  # output side S: the view is (B, 3, S, S)


@dataclass
class Batch:
    """One process's share of a step: ``views[v]`` is (B, 3, S_v, S_v) for ``ViewSpec`` v,
    ``index`` (B,) the global indices of the samples in the training set, ``info`` the step, and
    ``boxes[v]`` (B, 5) where view v came from in each source image (the trainer always fills it;
    ``None`` where a caller made views by other means): float32 rows (top, left, height, width,
    flip), the crop box as fractions of the source image's height and width and 1.0 where the crop
    was flipped horizontally (:func:`sslbench.core.augment.crop_box`). Like the views, a pure
    function of (seed, epoch, sample, view): VICRegL matches local features by location with it."""

    views: list[Tensor]
    index: Tensor
    info: StepInfo
    boxes: list[Tensor] | None = None

    def slice(self, start: int, stop: int) -> Batch:
        """Samples ``start:stop`` of every view and box (the gradient cache's chunks)."""
        boxes = None if self.boxes is None else [b[start:stop] for b in self.boxes]
        return Batch([v[start:stop] for v in self.views], self.index[start:stop], self.info, boxes)

    def view_boxes(self) -> list[Tensor]:
        """``boxes``, or where a caller gave none (views not cut by the augmentation: tests, the
        testing kit) each view counted as its whole source image, unflipped: rows (0, 0, 1, 1, 0)."""
        if self.boxes is not None:
            return self.boxes
        whole = torch.zeros(len(self.index), 5, device=self.views[0].device)
        whole[:, 2:4] = 1.0  # built on the device: no host-to-device copy
        return [whole for _ in self.views]

    def uniform(self, stream: int, n: int) -> Tensor:
        """(B, n) uniforms in [0, 1) for this batch's samples, a pure function of (seed, epoch,
        sample index, ``stream``); a method picks its own ``stream`` per use (0, 1, ...)."""
        u = counter_uniform(self.info.seed, self.info.epoch, self.index, _METHOD_STREAM_BASE + stream, n)
        return u.to(self.views[0].device)


# A backbone family, which decides a method's recipe (the references train ResNets and vision
# transformers differently): "vit" for vision transformers (timm models with a ``patch_embed``:
# ViT, DeiT, Eva, BEiT, Swin, ...), "convnet" for every other backbone (ResNets, ConvNeXt, ...).
Family = Literal["convnet", "vit"]
FAMILIES: tuple[Family, ...] = ("convnet", "vit")


@dataclass
class Recipe:
    """A method's defaults for one image size and backbone family: every optimizer setting,
    augmentation defaults and method-config defaults. Fields the user leaves unset (``None`` in
    :class:`sslbench.config.TrainConfig`) take these; the user's ``aug.*`` and method settings
    always win over ``aug`` and ``method``."""

    optimizer: str = "sgd"  # sgd | lars | adamw
    lr: float = 0.05  # base lr before batch scaling
    lr_scaling: str = "linear"  # linear | sqrt | none
    weight_decay: float = 5e-4  # weight decay at the start (never on norm and bias parameters)
    weight_decay_end: float | None = None  # cosine schedule of the weight decay to this value (None: constant)
    lars_eta: float = 0.001  # LARS trust coefficient (official Barlow Twins/VICReg/SwAV/MoCo v3 form: 0.001; solo-learn's: 0.02)
    lars_clip: bool = False  # LARS trust ratio clipped to min(trust / lr, 1) (solo-learn's clip_lr; the official codes: off)
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW betas
    grad_clip: float | None = None  # global gradient-norm clip (None: off)
    aug: dict[str, Any] = field(default_factory=dict)  # AugmentConfig fields the method changes by default
    method: dict[str, Any] = field(default_factory=dict)  # fields of the method's Config this recipe changes from their defaults


@dataclass
class MethodConfig:
    """Base of the methods' typed config dataclasses: :meth:`validate` is called after every
    resolution of a config (defaults, files, flags)."""

    def validate(self) -> None:
        """Range checks that types cannot express; raise :class:`sslbench.core.errors.UserError`."""


Schedule = Callable[[StepInfo], float]  # a parameter-group value as a pure function of the step


class Reconstruction(NamedTuple):
    """What :meth:`Method.reconstruct` returns for a batch of (B, 3, S, S) normalised images: the
    method's ``prediction`` of every pixel (B, 3, S, S), in the same normalised space as its input,
    and ``visible`` (B, 1, S, S), 1 where the model saw the input and 0 where it had to predict it."""

    prediction: Tensor
    visible: Tensor


class Method(nn.Module):
    """The base of every method plugin: an ``nn.Module`` with do-nothing defaults.

    Subclasses set ``Config``, ``description`` and ``paper``, build their heads in ``__init__``
    (keeping the backbone as ``self.encoder``: its output h is what evaluation uses) and implement
    :meth:`training_step`. The trainer calls every other hook unconditionally.
    """

    Config: ClassVar[type] = MethodConfig  # the method's typed config dataclass
    description: ClassVar[str] = ""  # one line, for `sslbench list methods`
    paper: ClassVar[str] = ""  # citation, for `sslbench list methods`
    min_batch_size: ClassVar[int] = 1  # the smallest global batch the loss is defined for (per process, too, with sync_bn=false)
    supports_grad_cache: ClassVar[bool] = False  # implements embed() and loss_from_embeddings()
    supports_reconstruction: ClassVar[bool] = False  # implements reconstruct() (`sslbench picture`)
    name: ClassVar[str] = ""  # set by @register_method

    encoder: nn.Module

    @classmethod
    def recipe(cls, image_size: int, family: Family) -> Recipe:
        """Optimizer, augmentation and method-config defaults for ``image_size`` px images on a
        backbone of ``family`` (:data:`Family`: "convnet" or "vit")."""
        return Recipe()

    def views(self, base: AugmentConfig, image_size: int) -> list[ViewSpec]:
        """The views of one sample, in order; default: two views of ``base`` at ``image_size``."""
        return [ViewSpec(base, image_size), ViewSpec(base, image_size)]

    def training_step(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        """The scalar loss to minimise and detached scalars to log (``"loss"`` among them).

        Two keys feed the collapse check (:mod:`sslbench.core.health`); a method that gives neither
        gets no health figures and no verdict, never an error:

        - :data:`EMBEDDING_LOG` (``"embedding"``): the detached (B, d) per-sample embedding of this
          process's batch that the loss acts on (e.g. the projection z of the first view), the one
          non-scalar entry. The trainer takes it out of the logs every step and measures it (std of
          the L2-normalised rows, effective rank) only in logging windows; it is never written.
        - :data:`ENTROPY_FRAC_LOG` (``"teacher_entropy_frac"``): for a method trained toward
          per-sample distributions over K outputs (DINO's teacher), their mean entropy over
          ``log K``; logged like any scalar, and compared with its value at step 0.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement training_step(batch)")

    def param_groups(self, groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Adjust the optimizer's parameter groups (e.g. SimSiam's fixed predictor lr)."""
        return groups

    def schedules(self) -> dict[str, Schedule]:
        """Extra per-step values for parameter-group keys, ``{key: f(info)}``, applied to every
        group without ``fixed_<key>`` and scaled by its ``<key>_scale``; default: none."""
        return {}

    def after_backward(self, info: StepInfo) -> None:
        """Between backward and the optimizer step (e.g. DINO zeroes its last layer's gradients)."""

    def after_optimizer_step(self, info: StepInfo) -> None:
        """After the optimizer step: by default the EMA of every :meth:`momentum_pairs` pair."""
        pairs = self.momentum_pairs()
        if pairs:
            m = self.momentum_at(info)
            for online, target in pairs:
                ema_update_(online, target, m)

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """(online, target) pairs: ``target <- m * target + (1 - m) * online`` after each step."""
        return []

    def momentum_at(self, info: StepInfo) -> float:
        """The EMA rate m at this step."""
        return 1.0

    def embed(self, batch: Batch, targets: bool = True) -> Tensor:
        """Per-sample embeddings (B, ...) the loss needs: the gradient cache's first half. With
        ``targets=False`` only the gradient-carrying columns (first along dim 1)."""
        raise NotImplementedError(f"{type(self).__name__} does not support the gradient cache")

    def loss_from_embeddings(self, emb: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss from :meth:`embed`'s output on the whole batch: the gradient cache's second half."""
        raise NotImplementedError(f"{type(self).__name__} does not support the gradient cache")

    def reconstruct(self, batch: Batch) -> Reconstruction:
        """For methods that predict pixels (``supports_reconstruction = True``, e.g. MAE): the
        prediction of ``batch.views[0]`` and what the model saw of it, with the method's own
        per-sample randomness (``batch.uniform``). Called without gradients on a trained method by
        the command layer, which draws the picture (:mod:`sslbench.commands.picture`); never writes files."""
        raise NotImplementedError(f"{type(self).__name__} does not reconstruct images")


def cosine_schedule(info: StepInfo, start: float, end: float) -> float:
    """Cosine from ``start`` (step 0) to ``end`` (the last step): BYOL's momentum and DINO's
    schedules, ``end - (end - start) * (cos(pi * k / K) + 1) / 2``
    (:func:`sslbench.core.schedules.cosine_between`). With a known step count ``k / K`` is step /
    total_steps exactly; under a time budget alone it is the progress."""
    if not info.time_based:
        return cosine_between(info.step, info.total_steps, start, end)
    return cosine_between(info.progress, 1.0, start, end)


def linear_warmup(info: StepInfo, start: float, end: float, epochs: float) -> float:
    """Linear from ``start`` to ``end`` over the first ``epochs`` epochs (fractional,
    ``info.epoch_float``), then constant at ``end``: DINO's, iBOT's and DINOv2's teacher
    temperature warm-up (the official codes step it once per epoch)."""
    t = min(info.epoch_float / epochs, 1.0) if epochs > 0 else 1.0
    return start + t * (end - start)


def asymmetric(base: AugmentConfig, image_size: int, first: dict[str, Any], second: dict[str, Any]) -> list[ViewSpec]:
    """Two views of ``base`` at ``image_size`` with ``first``/``second`` field changes (BYOL's blur/solarize)."""
    return [ViewSpec(replace(base, **first), image_size), ViewSpec(replace(base, **second), image_size)]


def default_views(method: Method, base: AugmentConfig, image_size: int) -> list[ViewSpec]:
    """``method.views(...)``, checked: at least one view, positive sizes."""
    specs = list(method.views(base, image_size))
    if not specs:
        raise ValueError(f"{type(method).__name__}.views() returned no view")
    bad = [s.size for s in specs if s.size < 1]
    if bad:
        raise ValueError(f"{type(method).__name__}.views() returned views of size {bad}; sizes must be >= 1 px")
    return specs
