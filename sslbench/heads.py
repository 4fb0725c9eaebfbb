"""Heads the method plugins share, and the multi-crop encoder call.

- :func:`mlp`: the projector/predictor MLP of SimCLR, MoCo v2/v3, BYOL and SimSiam.
- :func:`encode_views`: runs views through an encoder, all views of one size in one forward pass
  (one BatchNorm group, as DINO's multi-crop wrapper does), and returns one feature per view.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["encode_views", "feature_dim", "mlp"]


def mlp(
    in_dim: int,
    hidden_dim: int,
    out_dim: int,
    num_layers: int = 2,
    *,
    last_bn: bool = False,
    last_bn_affine: bool = True,
    hidden_bn: bool = True,
    act: type[nn.Module] = nn.ReLU,
) -> nn.Sequential:
    """An MLP head: ``num_layers`` linear layers with BN + ``act`` (ReLU) between them.

    SimCLR v1's projector is ``mlp(d, d, 128, 2)``; SimCLR v2's is 3 layers; SimSiam's projector is
    3 layers with ``last_bn=True`` and its predictor a 2-layer bottleneck; BYOL's are 2 layers;
    DINO's is 3 layers with GELU and no BN (``hidden_bn=False, act=nn.GELU``).
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
        layers += [nn.ReLU(inplace=True) if act is nn.ReLU else act()]
        dim = hidden_dim
    layers.append(nn.Linear(dim, out_dim, bias=not last_bn))
    if last_bn:
        layers.append(nn.BatchNorm1d(out_dim, affine=last_bn_affine))
    return nn.Sequential(*layers)


def feature_dim(backbone: nn.Module) -> int:
    """The width D of the backbone's features h (timm's ``num_features``)."""
    return int(backbone.num_features)  # type: ignore[arg-type]  # timm models define it as an int attribute


def encode_views(encoder: nn.Module, views: Sequence[Tensor]) -> list[Tensor]:
    """Features of every view, one forward pass per distinct view size.

    Views of one size are concatenated along the batch (one BatchNorm group, one kernel launch
    per layer); consecutive views of the same size keep their order. (V x (B, 3, S_v, S_v)) ->
    V x (B, D), in the order of ``views``.
    """
    views = list(views)
    sizes: list[tuple[int, ...]] = []
    for v in views:
        if tuple(v.shape[-2:]) not in sizes:
            sizes.append(tuple(v.shape[-2:]))
    out: list[Tensor | None] = [None] * len(views)
    for size in sizes:
        members = [i for i, v in enumerate(views) if tuple(v.shape[-2:]) == size]
        h = encoder(torch.cat([views[i] for i in members], dim=0))
        for i, part in zip(members, h.chunk(len(members), dim=0)):
            out[i] = part
    return [h for h in out if h is not None]
