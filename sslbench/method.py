"""The method plugin contract, and the small MLP heads the plugins share.

A method is an ``nn.Module`` registered with ``@register_method(name)``. It is built as
``Method(backbone, cfg)`` from a timm backbone (with ``num_features``) and its own ``Config``
dataclass, and implements ``training_step(views) -> (loss, logs)``. Everything else is optional;
the trainer looks the optional hooks up with ``getattr`` and never names a method. A method never
touches devices, process groups or optimizers: negatives from other processes come through
:func:`sslbench.dist.gather_with_grad`, which is the identity in one process.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Protocol, Sequence, runtime_checkable

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from .augment import AugmentConfig


@runtime_checkable
class SSLMethod(Protocol):
    """What the trainer, the evaluators and the CLI rely on."""

    Config: ClassVar[type]  # the method's typed config dataclass
    description: ClassVar[str]  # one line, for `sslbench list methods`
    paper: ClassVar[str]  # citation, for `sslbench list methods`
    encoder: nn.Module  # the backbone: its output h is what downstream evaluation uses

    def training_step(self, views: Sequence[Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """``views``: augmented, normalised (B, 3, S, S) batches, one per view. Returns the scalar
        loss to minimise and detached scalars to log."""
        ...


class OptionalHooks(Protocol):
    """Hooks a method may define; the trainer uses each only when present."""

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """(online, target) module pairs: target <- m * target + (1 - m) * online after each step."""
        ...

    def momentum_at(self, step: int, total_steps: int) -> float:
        """The momentum m at ``step`` (a pure function of the step)."""
        ...

    def param_groups(self, groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Adjust the optimizer's parameter groups (e.g. SimSiam's fixed predictor learning rate)."""
        ...

    def view_augmentations(self, base: AugmentConfig) -> list[AugmentConfig]:
        """One augmentation config per view (e.g. BYOL's asymmetric blur and solarize)."""
        ...

    def embed(self, views: Sequence[Tensor]) -> Tensor:
        """Per-sample embeddings (B, ...) the loss needs: the first half of the gradient cache."""
        ...

    def loss_from_embeddings(self, emb: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss from :meth:`embed`'s output on the whole batch: the second half of the gradient cache."""
        ...


def default_view_augmentations(method: nn.Module, base: AugmentConfig) -> list[AugmentConfig]:
    """The method's per-view configs, or two views of ``base``."""
    hook = getattr(method, "view_augmentations", None)
    return list(hook(base)) if hook is not None else [base, base]


def mlp(
    in_dim: int,
    hidden_dim: int,
    out_dim: int,
    num_layers: int = 2,
    *,
    last_bn: bool = False,
    last_bn_affine: bool = True,
    hidden_bn: bool = True,
) -> nn.Sequential:
    """An MLP head: ``num_layers`` linear layers with BN + ReLU between them.

    SimCLR v1's projector is ``mlp(d, d, 128, 2)``; SimCLR v2's is 3 layers; SimSiam's projector is
    3 layers with ``last_bn=True`` and its predictor a 2-layer bottleneck; BYOL's are 2 layers.
    Shapes: (B, in_dim) -> (B, out_dim).
    """
    if num_layers < 1:
        raise ValueError("an MLP needs at least one layer")
    layers: list[nn.Module] = []
    dim = in_dim
    for _ in range(num_layers - 1):
        layers += [nn.Linear(dim, hidden_dim, bias=not hidden_bn)]
        if hidden_bn:
            layers += [nn.BatchNorm1d(hidden_dim)]
        layers += [nn.ReLU(inplace=True)]
        dim = hidden_dim
    layers.append(nn.Linear(dim, out_dim, bias=not last_bn))
    if last_bn:
        layers.append(nn.BatchNorm1d(out_dim, affine=last_bn_affine))
    return nn.Sequential(*layers)


def encode_views(encoder: nn.Module, views: Sequence[Tensor]) -> list[Tensor]:
    """Run all views through ``encoder`` in one batch (one BatchNorm group, one kernel launch per
    layer) and split the features back per view. (V x (B, 3, S, S)) -> V x (B, D)."""
    h = encoder(torch.cat(list(views), dim=0))
    return list(h.chunk(len(views), dim=0))
