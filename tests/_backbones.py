"""The tiny backbones the registry-wide tests train each method on: a narrow ResNet-18, or, for a
method that trains vision transformers only (MAE), a two-block ViT with 4 px patches at 32 px
(:data:`sslbench.testing.TINY_RESNET` and :data:`~sslbench.testing.TINY_VIT`)."""

from __future__ import annotations

from typing import Any

from torch import nn

from sslbench.testing import TINY_RESNET, TINY_VIT, backbone_cli_args
from sslbench.testing import tiny_backbone as _create

VIT_ONLY = frozenset({"mae", "ijepa", "simmim", "msn", "ibot", "dinov2"})  # methods that refuse non-ViT backbones
(RESNET, RESNET_KWARGS), (VIT, VIT_KWARGS) = TINY_RESNET, TINY_VIT


def tiny(method: str) -> tuple[str, dict[str, Any]]:
    """(timm name, backbone_kwargs) of the tiny backbone for ``method``."""
    return (VIT, dict(VIT_KWARGS)) if method in VIT_ONLY else (RESNET, dict(RESNET_KWARGS))


def tiny_backbone(method: str, size: int = 32) -> nn.Module:
    return _create(tiny(method), size)


def tiny_sets(method: str) -> list[str]:
    """The ``--set`` values (``backbone_kwargs.*``) of the tiny backbone for ``method``."""
    return [a for a in backbone_cli_args(tiny(method)) if a.startswith("backbone_kwargs.")]


def tiny_cli_args(method: str) -> list[str]:
    """``--backbone NAME --set backbone_kwargs.K=V ...`` for ``method``."""
    return backbone_cli_args(tiny(method))
