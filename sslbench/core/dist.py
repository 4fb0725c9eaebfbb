"""Process-group helpers: rank/world queries, gathers with gradients, and a portable SyncBatchNorm.

Everything here degrades to the single-process case when ``torch.distributed`` is unavailable,
not initialised, or has one process: ranks are 0, the world is 1, gathers are the identity and
:class:`SyncBatchNorm` is exactly ``nn.BatchNorm``. Methods may therefore call these helpers
unconditionally (see ``docs/ARCHITECTURE.md``).

Gradient convention (the one DDP uses): every process computes a loss ``L_r`` that is the mean
over its *local* samples and calls ``backward`` on it; DDP then *averages* parameter gradients
over the ``W`` processes. The objective actually optimised is therefore the global mean
``L = (1/W) sum_r L_r``. A collective whose output feeds other processes' losses must send back,
in its backward, the *sum* over processes of the gradients of their local losses: the ``1/W``
is supplied by DDP's averaging. :func:`gather_with_grad` and the all-reduce inside
:class:`SyncBatchNorm` both follow this rule.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = [
    "get_rank",
    "get_world_size",
    "is_distributed",
    "gather_with_grad",
    "gather_no_grad",
    "all_reduce_mean",
    "all_reduce_sum",
    "all_reduce_sum_with_grad",
    "SyncBatchNorm",
    "SyncBatchNormAct2d",
    "convert_sync_batchnorm",
]


def _initialised() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank(group: Any = None) -> int:
    """This process's rank in ``group`` (default: the world); 0 without a process group."""
    return dist.get_rank(group) if _initialised() else 0


def get_world_size(group: Any = None) -> int:
    """The number of processes in ``group`` (default: the world); 1 without a process group."""
    return dist.get_world_size(group) if _initialised() else 1


def is_distributed(group: Any = None) -> bool:
    """True when a process group is initialised and has more than one process.

    A one-process group counts as not distributed: every collective would be the identity.
    """
    return get_world_size(group) > 1


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward sums the incoming gradient over processes.

    Forward: local ``x`` (n, ...) on each of W ranks -> (W * n, ...), rank r's rows at
    ``[r * n, (r + 1) * n)``. Backward: the gradient (W * n, ...) of this rank's local loss is
    all-reduced with SUM and the rows belonging to this rank are returned, (n, ...).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: Any) -> Tensor:
        ctx.group = group
        ctx.rank = dist.get_rank(group)
        ctx.n = x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n], None


def gather_with_grad(x: Tensor, group: Any = None) -> Tensor:
    """All-gather ``x`` along dim 0 in rank order, keeping the autograd graph.

    Shapes: ``x`` (n, ...) on every rank (``n`` must be the same on all ranks) -> (W * n, ...).
    In one process this returns ``x`` itself.

    Why the backward is an all-reduce SUM: rank r's loss ``L_r`` is the mean over its local
    anchors but, through the gathered tensor, depends on every rank's ``z``. DDP averages
    parameter gradients, so the objective is ``L = (1/W) sum_r L_r`` and
    ``dL/dz_local = (1/W) sum_r dL_r/dz_local``. Returning ``sum_r dL_r/dz_local`` to this rank's
    graph and letting DDP divide by W gives exactly that; the single-process gradient of the
    global mean loss is reproduced (``tests/test_dist.py`` checks it with an NT-Xent loss).
    """
    if not is_distributed(group):
        return x
    out: Tensor = _GatherWithGrad.apply(x, group)
    return out


@torch.no_grad()
def gather_no_grad(x: Tensor, group: Any = None) -> Tensor:
    """All-gather ``x`` (n, ...) along dim 0 in rank order -> (W * n, ...), detached.

    For features, labels or logging; ``n`` must be the same on all ranks. One process: ``x``
    detached (no copy).
    """
    if not is_distributed(group):
        return x.detach()
    parts = [torch.empty_like(x) for _ in range(get_world_size(group))]
    dist.all_gather(parts, x.detach().contiguous(), group=group)
    return torch.cat(parts, dim=0)


@torch.no_grad()
def all_reduce_mean(x: Tensor, group: Any = None) -> Tensor:
    """The mean of ``x`` over processes (any shape; same shape on all ranks), detached.

    For logging: returns a new tensor and leaves ``x`` untouched. Integer tensors are averaged in
    float32. One process: a detached copy of ``x``.
    """
    out = x.detach().clone()
    if not out.is_floating_point() and not out.is_complex():
        out = out.float()
    if is_distributed(group):
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        out /= get_world_size(group)
    return out


@torch.no_grad()
def all_reduce_sum(x: Tensor, group: Any = None) -> Tensor:
    """The sum of ``x`` over processes (any shape; same shape on all ranks), detached: for global
    statistics that carry no gradient (DINO's centre, Sinkhorn's sums). Returns a new tensor;
    one process: a detached copy of ``x``."""
    out = x.detach().clone()
    if is_distributed(group):
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out


class _AllReduceSum(torch.autograd.Function):
    """Differentiable all-reduce SUM: forward sums over processes, backward sums the gradients.

    With ``y = sum_q x_q`` on every rank and the objective ``sum_r L_r(y)`` (DDP convention, see
    the module docstring), ``d/dx_q = sum_r dL_r/dy``: the backward is itself an all-reduce SUM.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: Any) -> Tensor:
        ctx.group = group
        out = x.contiguous().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def all_reduce_sum_with_grad(x: Tensor, group: Any = None) -> Tensor:
    """Differentiable sum over processes (statistics of the global batch that carry a gradient:
    cross-correlations, covariances); the identity in one process."""
    if not is_distributed(group):
        return x
    out: Tensor = _AllReduceSum.apply(x, group)
    return out


class SyncBatchNorm(_BatchNorm):
    """Batch normalisation with batch statistics over all processes; works on CPU (gloo) and CUDA.

    Ioffe & Szegedy, "Batch Normalization: Accelerating Deep Network Training by Reducing Internal
    Covariate Shift", ICML 2015. Synchronised BN is what SimCLR (Chen et al. 2020, Sec. B.9 "global
    BN") and BYOL (Grill et al. 2020) use so that a per-process batch cannot leak which samples
    are together through its statistics. ``torch.nn.SyncBatchNorm`` refuses CPU tensors, hence
    this module.

    Shapes: input (N, C) or (N, C, *) -> same shape. Statistics are per channel (dim 1).

    In training mode with more than one process the statistics are computed over the union of all
    processes' batches (local batch sizes may differ) with differentiable all-reduces:

    1. all-reduce ``[sum x, count]`` -> global mean ``mu`` (C,);
    2. all-reduce ``sum (x - mu)^2`` -> biased variance ``var`` (C,) (two passes: no catastrophic
       cancellation from ``E[x^2] - E[x]^2``);
    3. ``y = (x - mu) / sqrt(var + eps) * weight + bias``;
    4. running stats as torch's BatchNorm: ``running_mean <- (1 - f) running_mean + f mu`` and
       ``running_var <- (1 - f) running_var + f var * n / (n - 1)`` (unbiased), where ``f`` is
       ``momentum`` or ``1 / num_batches_tracked`` when ``momentum`` is None.

    Statistics are accumulated in float32 (float64 for float64 input) and the output is cast back
    to the input dtype. Gradients follow the DDP convention (module docstring of
    :mod:`sslbench.core.dist`): averaged over processes, input, weight and bias gradients equal those of
    ``nn.BatchNorm`` on the concatenated batch. In evaluation mode, or in one process, the module
    calls ``F.batch_norm`` exactly as ``nn.BatchNorm2d`` does (bit-identical outputs, gradients
    and running statistics); like ``nn.SyncBatchNorm`` it does not synchronise in eval mode.
    Every process must call ``forward`` the same number of times in training mode.

    The explicit formula keeps a few (N, C, *) intermediates for autograd, so it uses more memory
    than a fused kernel; BN layers are rarely the memory peak of SSL training.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Any = None,
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.process_group = process_group

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (N, C, *), got {x.dim()}D input")

    def _factor(self) -> float:
        """Advance ``num_batches_tracked`` (training) and return the running-stat update factor."""
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        return factor

    def forward(self, x: Tensor) -> Tensor:
        """``x``: (N, C, *) -> (N, C, *), normalised with (global) batch or running statistics."""
        self._check_input_dim(x)
        factor = self._factor()
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        if not (self.training and is_distributed(self.process_group)):
            # Same call as torch's _BatchNorm.forward: exact single-process / eval behaviour.
            track = not self.training or self.track_running_stats
            return F.batch_norm(
                x,
                self.running_mean if track else None,
                self.running_var if track else None,
                self.weight,
                self.bias,
                use_batch_stats,
                factor,
                self.eps,
            )
        return self._sync_forward(x, factor)

    def _sync_forward(self, x: Tensor, factor: float) -> Tensor:
        """Training-mode forward with statistics all-reduced over ``self.process_group``."""
        c = x.shape[1]
        dims = [0] + list(range(2, x.dim()))
        bshape = [1, c] + [1] * (x.dim() - 2)
        stat_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        xs = x.to(stat_dtype)

        # The count stays a tensor: no host synchronisation. With W >= 2 non-empty batches it is
        # >= 2, so the unbiased correction n / (n - 1) below is finite.
        local_count = torch.full((1,), x.numel() // c, dtype=stat_dtype, device=x.device)
        sum_count = all_reduce_sum_with_grad(torch.cat([xs.sum(dims), local_count]), self.process_group)
        count = sum_count[c].detach()  # () total values per channel over all processes
        mean = sum_count[:c] / count  # (C,)
        dev = xs - mean.view(bshape)
        var = all_reduce_sum_with_grad((dev * dev).sum(dims), self.process_group) / count  # (C,), biased
        y = dev * torch.rsqrt(var + self.eps).view(bshape)
        if self.weight is not None:
            y = y * self.weight.to(stat_dtype).view(bshape)
        if self.bias is not None:
            y = y + self.bias.to(stat_dtype).view(bshape)

        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                rm, rv = self.running_mean, self.running_var
                rm.copy_(rm * (1 - factor) + mean.detach().to(rm.dtype) * factor)
                unbiased = var.detach() * (count / (count - 1))
                rv.copy_(rv * (1 - factor) + unbiased.to(rv.dtype) * factor)
        return y.to(x.dtype)


class SyncBatchNormAct2d(SyncBatchNorm):
    """:class:`SyncBatchNorm` followed by timm's ``drop`` and ``act`` (for ``timm``'s ``BatchNormAct2d``).

    timm's ``BatchNormAct2d`` subclasses ``nn.BatchNorm2d`` and applies ``self.drop`` then
    ``self.act`` after normalising; :func:`convert_sync_batchnorm` turns it into this class,
    re-using the same ``drop`` and ``act`` modules, so state-dict keys are unchanged.

    Shapes: (N, C, H, W) -> (N, C, H, W).
    """

    def __init__(self, num_features: int, *args: Any, drop: nn.Module, act: nn.Module, **kwargs: Any) -> None:
        super().__init__(num_features, *args, **kwargs)
        self.drop = drop
        self.act = act

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4:
            raise ValueError(f"expected 4D input (N, C, H, W), got {x.dim()}D input")
        out: Tensor = self.act(self.drop(super().forward(x)))
        return out


def _is_timm_bn_act(module: nn.Module) -> bool:
    try:
        from timm.layers.norm_act import BatchNormAct2d
    except ImportError:  # pragma: no cover - timm is a dependency
        return False
    return isinstance(module, BatchNormAct2d)


def convert_sync_batchnorm(module: nn.Module, process_group: Any = None) -> nn.Module:
    """Replace every torch BatchNorm (any ``_BatchNorm``) in ``module`` by :class:`SyncBatchNorm`.

    Covers ``BatchNorm1d/2d/3d``, ``nn.SyncBatchNorm`` and timm's ``BatchNormAct2d``, which becomes
    a :class:`SyncBatchNormAct2d` keeping its activation and drop layers. Like
    ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` and ``timm.layers.convert_sync_batchnorm``,
    the new layers take over the *same* parameter and buffer tensors (weight, bias, running
    stats, ``num_batches_tracked``) and the training flag, so values are carried over exactly and
    an optimizer built on the old parameters still updates the converted model. Children are
    replaced in place; use the returned module (it is new when ``module`` itself is a BatchNorm).
    Deep-copy the model first if the original must be kept intact.
    """
    out = module
    if isinstance(module, _BatchNorm) and not isinstance(module, SyncBatchNormAct2d):
        if isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params():
            raise ValueError("convert_sync_batchnorm: run a forward pass to initialise lazy BatchNorm first")
        kwargs: dict[str, Any] = dict(
            eps=module.eps,
            momentum=module.momentum,
            affine=module.affine,
            track_running_stats=module.track_running_stats,
            process_group=process_group,
        )
        if _is_timm_bn_act(module):
            drop, act = module.get_submodule("drop"), module.get_submodule("act")
            out = SyncBatchNormAct2d(module.num_features, drop=drop, act=act, **kwargs)
        elif isinstance(module, SyncBatchNorm):
            out = module
            out.process_group = process_group
        else:
            out = SyncBatchNorm(module.num_features, **kwargs)
        if out is not module:
            # The new module allocated its own tensors; hand it the old ones (no copy).
            if module.affine:
                out.weight = module.weight
                out.bias = module.bias
            out.running_mean = module.running_mean
            out.running_var = module.running_var
            out.num_batches_tracked = module.num_batches_tracked
            out.train(module.training)
    for name, child in list(out.named_children()):
        out.add_module(name, convert_sync_batchnorm(child, process_group))
    return out
