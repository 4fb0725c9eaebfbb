"""Optimisation: parameter groups, LARS, learning-rate scaling and schedules, optimizer factory.

Conventions shared with the trainer and the methods:

- :func:`param_groups` splits a model into a decayed group and a group of biases and
  normalisation parameters (``weight_decay=0``, ``lars_exclude=True``), selected by module type
  and parameter rank, never by parameter name.
- A method may edit the groups (``Method.param_groups``, see ``docs/ARCHITECTURE.md``), e.g. give
  one its own ``'lr'``. Every scheduled key K (the lr; the weight decay with ``weight_decay_end``;
  a method's own ``schedules()``) is steered per group by two optional keys:

  * ``fixed_K`` (bool, default False): no schedule changes this group's K (``fixed_lr``:
    SimSiam's predictor, Chen & He 2021, Sec. 4.4; ``fixed_weight_decay``: the no-decay group);
  * ``K_scale`` (float, default 1.0): the group follows the schedule scaled by this factor.

  Every step the trainer (``sslbench.train.run_setup.apply_schedules``) sets
  ``group[K] = value(step) * group.get('K_scale', 1.0)`` for every group without ``fixed_K``
  (:func:`set_scheduled_value`, the one place this rule is written); for the lr, ``value`` is
  :func:`lr_at` (and :func:`set_lr` does the same for the lr alone).
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase

from sslbench.core.errors import UserError
from sslbench.core.schedules import cosine_between

__all__ = [
    "NORM_TYPES",
    "is_no_decay",
    "param_groups",
    "LARS",
    "LR_SCALING_RULES",
    "scale_lr",
    "lr_at",
    "set_scheduled_value",
    "set_lr",
    "OPTIMIZERS",
    "build_optimizer",
]


def _norm_types() -> tuple[type[nn.Module], ...]:
    """Normalisation module classes: torch's, plus every module class timm defines in its norm files.

    torch: ``_NormBase`` (BatchNorm*, SyncBatchNorm, InstanceNorm* and so
    :class:`sslbench.core.dist.SyncBatchNorm`), GroupNorm, LayerNorm, LocalResponseNorm, CrossMapLRN2d
    and RMSNorm (torch >= 2.4). timm: most of its norms subclass torch's (LayerNorm2d, GroupNorm1,
    BatchNormAct2d, ...), but RmsNorm*, SimpleNorm*, FrozenBatchNormAct2d, EvoNorm*,
    FilterResponseNorm* and GlobalResponseNorm do not, so the classes of those files are
    collected (files missing from an older timm are skipped).
    """
    types: list[type[nn.Module]] = [_NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm, nn.CrossMapLRN2d]
    if hasattr(nn, "RMSNorm"):
        types.append(nn.RMSNorm)
    for mod_name in ("norm", "norm_act", "evo_norm", "filter_response_norm", "grn"):
        try:
            mod = importlib.import_module(f"timm.layers.{mod_name}")
        except ImportError:
            continue
        for _, cls in inspect.getmembers(mod, inspect.isclass):
            if cls.__module__ == mod.__name__ and issubclass(cls, nn.Module) and not issubclass(cls, tuple(types)):
                types.append(cls)
    return tuple(types)


NORM_TYPES: tuple[type[nn.Module], ...] = _norm_types()


def is_no_decay(module: nn.Module, name: str, param: nn.Parameter) -> bool:
    """Whether ``param`` (registered as ``name`` directly on ``module``) is exempt from weight decay.

    True for every parameter of a normalisation module (:data:`NORM_TYPES`) and for every
    parameter with at most one dimension (biases, LayerScale gammas, 1-D norm scales of unknown
    modules). The decision is by type and shape only; ``name`` is part of the signature so that a
    method can wrap this predicate with name-based exceptions of its own.
    """
    del name  # the default rule never matches on names
    return isinstance(module, NORM_TYPES) or param.ndim <= 1


def param_groups(
    model: nn.Module,
    weight_decay: float,
    predicate: Callable[[nn.Module, str, nn.Parameter], bool] = is_no_decay,
) -> list[dict[str, Any]]:
    """Split the trainable parameters of ``model`` into optimizer groups.

    Returns up to two groups (empty ones are dropped), in this order:
    ``{'params': [...], 'weight_decay': weight_decay, 'lars_exclude': False}`` for conv/linear
    weights and other >= 2-D tensors, and ``{'params': [...], 'weight_decay': 0.0,
    'lars_exclude': True, 'fixed_weight_decay': True}`` for normalisation parameters and biases
    (``predicate``; a weight-decay schedule leaves them at 0). Frozen
    parameters (``requires_grad=False``) are left out; a parameter shared by several modules
    appears once.
    """
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen: set[int] = set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            (no_decay if predicate(module, name, p) else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": float(weight_decay), "lars_exclude": False},
        {"params": no_decay, "weight_decay": 0.0, "lars_exclude": True, "fixed_weight_decay": True},
    ]
    return [g for g in groups if g["params"]]


class LARS(torch.optim.Optimizer):
    """Layer-wise Adaptive Rate Scaling with SGD momentum.

    You, Gitman & Ginsburg, "Large Batch Training of Convolutional Networks", arXiv:1708.03888
    (2017), as used by SimCLR (Chen et al. 2020) and BYOL (Grill et al. 2020); this form (trust
    ratio on the decayed gradient, momentum after it, exclusion by group flag) is the one of the
    Barlow Twins reference implementation (Zbontar et al. 2021).

    For every parameter tensor ``w`` (a "layer") with gradient ``g`` in a group **without**
    ``lars_exclude``:

    - ``d = g + weight_decay * w``
    - ``trust = eta * ||w|| / ||d||`` (1 when ``||w||`` or ``||d||`` is 0); with ``clip``
      (solo-learn's ``clip_lr``, ``solo/utils/lars.py``), ``trust = min(trust / lr, 1)``, so the
      layer's step size ``lr * trust`` is ``min(eta * ||w|| / ||d||, lr)``: ``lr`` caps the
      layer-wise rate instead of multiplying it (1 when ``lr`` is 0)
    - ``buf = momentum * buf + trust * d`` (``buf = trust * d`` at the first step)
    - ``w = w - lr * buf`` (Nesterov: ``w = w - lr * (trust * d + momentum * buf)``)

    Groups **with** ``lars_exclude=True`` (biases and norms, see :func:`param_groups`) take a plain
    SGD-momentum step on ``g``: no weight decay (whatever their ``weight_decay``) and no trust
    ratio. Norms are computed in float32. Updates use ``torch._foreach_*`` kernels per
    (device, dtype) bucket.

    Group keys (defaults from the constructor): ``lr``, ``momentum``, ``weight_decay``, ``eta``,
    ``clip``, ``nesterov``, ``lars_exclude``.

    The two published forms: the official Barlow Twins, VICReg, SwAV, MoCo v3 and BYOL/SimCLR
    code uses eta 0.001 without clipping (a step moves a weight by about ``lr * 0.001`` of its
    norm); solo-learn's configs use eta 0.02 with ``clip`` (a step moves it by at most 0.02 of its
    norm, and by ``lr * ||d||`` where that is smaller). Their learning rates are not
    interchangeable.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        eta: float = 0.001,
        nesterov: bool = False,
        clip: bool = False,
    ) -> None:
        if lr < 0 or momentum < 0 or weight_decay < 0 or eta <= 0:
            raise ValueError(f"LARS: invalid lr={lr}, momentum={momentum}, weight_decay={weight_decay}, eta={eta}")
        if nesterov and momentum == 0:
            raise ValueError("LARS: nesterov needs momentum > 0")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, clip=clip, nesterov=nesterov, lars_exclude=False)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:  # type: ignore[override]
        """One update of every parameter that has a gradient. Returns ``closure()`` if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            buckets: dict[tuple[torch.device, torch.dtype], list[Tensor]] = defaultdict(list)
            for p in group["params"]:
                if p.grad is not None:
                    if p.grad.is_sparse:
                        raise RuntimeError("LARS does not support sparse gradients")
                    buckets[(p.device, p.dtype)].append(p)
            for params in buckets.values():
                self._update(params, group)
        return loss

    def _update(self, params: list[Tensor], group: dict[str, Any]) -> None:
        """Update ``params`` (same device and dtype, all with gradients) with ``group``'s settings."""
        grads = [p.grad for p in params if p.grad is not None]  # (the caller passes parameters with gradients only)
        d: list[Tensor] | tuple[Tensor, ...]
        if group["lars_exclude"]:
            d = grads
        else:
            wd = group["weight_decay"]
            d = torch._foreach_add(grads, params, alpha=wd) if wd != 0 else grads
            w_norm = torch.stack(torch._foreach_norm(params, 2, dtype=torch.float32))
            d_norm = torch.stack(torch._foreach_norm(d, 2, dtype=torch.float32))
            trust = torch.where((w_norm > 0) & (d_norm > 0), group["eta"] * w_norm / d_norm, torch.ones_like(w_norm))
            if group.get("clip", False) and group["lr"] > 0:
                trust = torch.clamp(trust / group["lr"], max=1.0)
            d = torch._foreach_mul(d, list(trust.to(params[0].dtype).unbind()))

        m = group["momentum"]
        if m != 0:
            bufs: list[Tensor] = []
            old_bufs, old_d = [], []
            for p, dp in zip(params, d):
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = dp.detach().clone()
                else:
                    old_bufs.append(state["momentum_buffer"])
                    old_d.append(dp)
                bufs.append(state["momentum_buffer"])
            if old_bufs:
                torch._foreach_mul_(old_bufs, m)
                torch._foreach_add_(old_bufs, old_d)
            d = torch._foreach_add(d, bufs, alpha=m) if group["nesterov"] else bufs
        torch._foreach_add_(params, d, alpha=-group["lr"])


LR_SCALING_RULES: tuple[str, ...] = ("linear", "sqrt", "none")


def scale_lr(base_lr: float, global_batch: int, rule: str) -> float:
    """The learning rate for a global batch size under a scaling rule.

    - ``'linear'``: ``base_lr * global_batch / 256`` (Goyal et al. 2017, "Accurate, Large
      Minibatch SGD"; SimCLR/BYOL with LARS);
    - ``'sqrt'``: ``base_lr * sqrt(global_batch)`` (SimCLR, Appendix B.1: 0.075 * sqrt(B));
    - ``'none'``: ``base_lr``.
    """
    if global_batch < 1:
        raise UserError(f"global batch size must be >= 1, got {global_batch}")
    if rule == "linear":
        return base_lr * global_batch / 256
    if rule == "sqrt":
        return base_lr * math.sqrt(global_batch)
    if rule == "none":
        return base_lr
    raise UserError(f"unknown lr scaling rule {rule!r}; valid rules: {', '.join(LR_SCALING_RULES)}")


def lr_at(step: int, total_steps: int, *, base_lr: float, warmup_steps: int, final_ratio: float = 0.0) -> float:
    """Learning rate at optimizer step ``step`` (0-based): linear warm-up, then cosine decay.

    - warm-up, ``step < warmup_steps``: ``base_lr * (step + 1) / warmup_steps``, so the first step
      already moves (``base_lr / warmup_steps``) and step ``warmup_steps - 1`` reaches ``base_lr``;
    - then the cosine from ``base_lr`` to ``final = base_lr * final_ratio``
      (:func:`sslbench.core.schedules.cosine_between` at ``p = (step - warmup_steps) / (total_steps -
      warmup_steps)``): exactly ``base_lr`` at ``step == warmup_steps``, exactly ``final`` at and
      after ``total_steps`` (Loshchilov & Hutter, "SGDR", 2017, without restarts).

    A pure function of its arguments (resumed runs get the same schedule).
    """
    if step < 0 or total_steps < 0 or warmup_steps < 0:
        raise UserError(f"lr_at: steps must be >= 0, got step={step}, total={total_steps}, warmup={warmup_steps}")
    if not 0.0 <= final_ratio <= 1.0:
        raise UserError(f"final lr ratio must be in [0, 1], got {final_ratio}")
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    final = base_lr * final_ratio
    if step >= total_steps:
        return final
    return cosine_between((step - warmup_steps) / (total_steps - warmup_steps), 1.0, base_lr, final)


def set_scheduled_value(optimizer: torch.optim.Optimizer, key: str, value: float) -> None:
    """The per-group rule of a scheduled key K, written once: ``group[K] = value *
    group.get('K_scale', 1.0)`` for every group whose ``fixed_K`` is not set; ``fixed_K`` groups
    keep their own K (see the module docstring)."""
    for group in optimizer.param_groups:
        if not group.get(f"fixed_{key}", False):
            group[key] = value * group.get(f"{key}_scale", 1.0)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Apply the scheduled ``lr`` (:func:`set_scheduled_value` for ``'lr'``): ``group['lr'] = lr *
    group.get('lr_scale', 1.0)`` for every group whose ``fixed_lr`` is not set."""
    set_scheduled_value(optimizer, "lr", lr)


OPTIMIZERS: tuple[str, ...] = ("sgd", "lars", "adamw")


def _as_list(params: Tensor | Iterable[Tensor]) -> list[Tensor]:
    """A group's ``params`` as a list (torch also accepts a single tensor or an iterator)."""
    return [params] if isinstance(params, Tensor) else list(params)


def build_optimizer(
    name: str,
    groups: list[dict[str, Any]],
    lr: float,
    *,
    momentum: float = 0.9,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.999),
    lars_eta: float = 0.001,
    lars_clip: bool = False,
) -> torch.optim.Optimizer:
    """Build optimizer ``name`` over ``groups`` (as from :func:`param_groups`).

    ``lr`` and ``weight_decay`` are defaults for groups without their own keys. Every group gets
    ``fixed_lr`` (default False) and ``lr_scale`` (default 1.0), see the module docstring.

    - ``'sgd'``: ``torch.optim.SGD`` with ``momentum``;
    - ``'lars'``: :class:`LARS` with ``momentum``, ``eta`` ``lars_eta`` and ``clip`` ``lars_clip``
      (foreach kernels);
    - ``'adamw'``: ``torch.optim.AdamW`` with ``betas``.

    SGD and AdamW are fused (one kernel per step) when every parameter is already on CUDA (build
    the optimizer after moving the model, as the trainer does) and torch has the fused kernel,
    foreach otherwise.
    """
    groups = [{"fixed_lr": False, "lr_scale": 1.0, **g, "params": _as_list(g["params"])} for g in groups]
    params = [p for g in groups for p in g["params"]]
    on_cuda = bool(params) and all(p.is_cuda for p in params)
    if name == "sgd":
        fused = on_cuda and "fused" in inspect.signature(torch.optim.SGD).parameters  # torch >= 2.4
        kernels = {"fused": True} if fused else {"foreach": True}
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay, **kernels)
    if name == "lars":
        return LARS(groups, lr=lr, momentum=momentum, weight_decay=weight_decay, eta=lars_eta, clip=lars_clip)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, weight_decay=weight_decay, fused=on_cuda, foreach=None if on_cuda else True)
    raise UserError(f"unknown optimizer {name!r}; valid optimizers: {', '.join(OPTIMIZERS)}")
