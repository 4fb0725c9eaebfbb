"""Momentum (exponential moving average) targets and momentum schedules.

BYOL (Grill et al., "Bootstrap Your Own Latent", NeurIPS 2020) and MoCo (He et al., "Momentum
Contrast for Unsupervised Visual Representation Learning", CVPR 2020) keep a target network
whose parameters follow the online network's: ``target <- m * target + (1 - m) * online`` after
each optimizer step. The trainer calls :func:`ema_update_` for every pair a method returns from
``momentum_pairs()`` with ``m = method.momentum_at(step, total_steps)``; methods build their
``momentum_at`` from :func:`cosine_momentum` or :func:`constant_momentum`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sslbench.core.schedules import cosine_between

__all__ = ["ema_update_", "copy_params_", "freeze_", "cosine_momentum", "constant_momentum"]


def _paired(online: nn.Module, target: nn.Module) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
    """(online params, target params, online buffers, target buffers), checked to correspond.

    Raises ``ValueError`` naming the first difference when the two modules do not have the same
    parameter and buffer names (in registration order) and shapes.
    """
    if online is target:
        raise ValueError("online and target must be different modules")
    lists: list[list[Tensor]] = []
    for kind, on_items, tg_items in (
        ("parameter", online.named_parameters(), target.named_parameters()),
        ("buffer", online.named_buffers(), target.named_buffers()),
    ):
        on, tg = list(on_items), list(tg_items)
        on_names, tg_names = [n for n, _ in on], [n for n, _ in tg]
        if on_names != tg_names:
            missing = sorted(set(on_names) - set(tg_names))
            extra = sorted(set(tg_names) - set(on_names))
            raise ValueError(
                f"online and target {kind}s differ: missing in target {missing[:5]}, extra in target "
                f"{extra[:5]}" + ("" if missing or extra else " (same names, different order)")
            )
        for (name, a), (_, b) in zip(on, tg):
            if a.shape != b.shape:
                raise ValueError(f"{kind} {name!r}: online shape {tuple(a.shape)} != target {tuple(b.shape)}")
            if _layout(a) != _layout(b):
                raise ValueError(
                    f"{kind} {name!r}: online and target are sharded differently ({_layout(a)} vs {_layout(b)}); shard the target "
                    "exactly as its online module (the same fully_shard units, the same mesh), so the EMA runs shard by shard"
                )
        lists += [[t for _, t in on], [t for _, t in tg]]
    return lists[0], lists[1], lists[2], lists[3]


def _layout(t: Tensor) -> tuple[object, ...] | None:
    """How ``t`` is distributed: None for a plain tensor; (mesh, placements, local shape) for a
    DTensor (FSDP2's ``fully_shard`` parameters: Shard(0) over the data-parallel mesh)."""
    from torch.distributed.tensor import DTensor

    if not isinstance(t, DTensor):
        return None
    return (t.device_mesh, tuple(t.placements), tuple(t.to_local().shape))


@torch.no_grad()
def ema_update_(online: nn.Module, target: nn.Module, m: float) -> None:
    """In place: ``target_p <- m * target_p + (1 - m) * online_p`` for every parameter pair.

    Every parameter is averaged, biases and normalisation parameters included, whether or not it
    requires grad. Buffers (BatchNorm running statistics, ``num_batches_tracked``) are copied from
    ``online``. The modules must have identical structure (same parameter and buffer names and
    shapes, checked once per call before anything is written; ``ValueError`` otherwise). Uses
    ``torch._foreach_*`` kernels; the result is bit-identical to ``target * m + online * (1 - m)``
    in the parameters' dtype (at the cost of one temporary the size of the parameters).

    Under FSDP2 (``torch.distributed.fsdp.fully_shard``) the parameters are DTensors: the target must
    be sharded as its online module (same mesh, placements and local shapes; ``ValueError``
    otherwise), and the ``_foreach_*`` ops then act on each process's local shards only, with no
    communication, giving bit for bit the formula on the full tensors (tests/test_fsdp.py).
    """
    if not 0.0 <= m <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {m}")
    on_p, tg_p, on_b, tg_b = _paired(online, target)
    if tg_p:
        torch._foreach_mul_(tg_p, m)
        # A scaled copy rather than ``add_(..., alpha=1 - m)``: that kernel may fuse the multiply
        # and add (FMA), and the result would then differ from the formula in the last bit.
        torch._foreach_add_(tg_p, torch._foreach_mul(on_p, 1.0 - m))
    for a, b in zip(on_b, tg_b):
        b.copy_(a)


@torch.no_grad()
def copy_params_(online: nn.Module, target: nn.Module) -> None:
    """Initialise ``target`` as an exact copy of ``online``'s parameters and buffers (in place).

    Same structural check as :func:`ema_update_`; equivalent to ``ema_update_(online, target, 0)``.
    """
    on_p, tg_p, on_b, tg_b = _paired(online, target)
    for a, b in zip(on_p + on_b, tg_p + tg_b):
        b.copy_(a)


def freeze_(module: nn.Module) -> nn.Module:
    """Set ``requires_grad=False`` on every parameter of ``module`` (a target network); returns it."""
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def cosine_momentum(step: int, total_steps: int, base: float, final: float = 1.0) -> float:
    """BYOL's momentum schedule: ``final - (final - base) * (cos(pi * k / K) + 1) / 2``, the one
    cosine (:func:`sslbench.core.schedules.cosine_between`) from ``base`` to ``final``.

    With ``final = 1`` this is Grill et al. 2020, Sec. 3.2: ``tau = 1 - (1 - tau_base) *
    (cos(pi k / K) + 1) / 2``. Returns exactly ``base`` at ``k = 0`` and exactly ``final`` at
    ``k >= K``; monotone in between. ``k`` = ``step``, ``K`` = ``total_steps``.
    """
    return cosine_between(step, total_steps, base, final)


def constant_momentum(step: int, total_steps: int, base: float) -> float:
    """A constant momentum ``base`` (MoCo v1/v2: 0.999), with the same signature as
    :func:`cosine_momentum` so methods can switch schedules."""
    del step, total_steps  # constant in time
    return base
