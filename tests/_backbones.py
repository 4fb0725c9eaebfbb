"""The tiny backbones the registry-wide tests train each method on: a narrow ResNet-18, or, for a
method that trains vision transformers only (MAE), a two-block ViT with 4 px patches at 32 px."""

from __future__ import annotations

from typing import Any

from torch import nn

from sslbench.backbones import create_backbone

VIT_ONLY = frozenset({"mae"})  # methods that refuse non-ViT backbones
RESNET, RESNET_KWARGS = "resnet18", {"channels": (8, 16, 32, 64)}
VIT, VIT_KWARGS = "vit_tiny_patch16_224", {"depth": 2, "embed_dim": 32, "num_heads": 2}


def tiny(method: str) -> tuple[str, dict[str, Any]]:
    """(timm name, backbone_kwargs) of the tiny backbone for ``method``."""
    return (VIT, dict(VIT_KWARGS)) if method in VIT_ONLY else (RESNET, dict(RESNET_KWARGS))


def tiny_backbone(method: str, size: int = 32) -> nn.Module:
    name, kwargs = tiny(method)
    return create_backbone(name, size, **kwargs)


def tiny_sets(method: str) -> list[str]:
    """The ``--set`` values (``backbone_kwargs.*``) of the tiny backbone for ``method``."""
    _, kwargs = tiny(method)
    return [f"backbone_kwargs.{k}={','.join(map(str, v)) if isinstance(v, tuple) else v}" for k, v in kwargs.items()]


def tiny_cli_args(method: str) -> list[str]:
    """``--backbone NAME --set backbone_kwargs.K=V ...`` for ``method``."""
    args = ["--backbone", tiny(method)[0]]
    for s in tiny_sets(method):
        args += ["--set", s]
    return args
