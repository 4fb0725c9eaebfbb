"""The CIFAR stem of small-image ResNets, and the timm architecture that rebuilds it.

For images of at most 64 px, sslbench gives timm's ResNet-family models (timm's ``ResNet`` class:
resnet*, resnext*, seresnet*, wide_resnet*, ...) the stem of the SimCLR paper's CIFAR experiments:
a 3x3 stride-1 first convolution and no max-pool (:func:`cifar_stem_`). timm's own ``ResNet`` has
no argument for that stem, so this module registers one timm architecture,
``sslbench_cifar_resnet``, whose model argument ``base`` names the timm ResNet to adapt (all other
arguments go to that model, e.g. ``channels``)::

    import sslbench.backbones  # registers sslbench_cifar_resnet in timm's model registry
    model = timm.create_model("sslbench_cifar_resnet", base="resnet18", num_classes=10)

Importing :mod:`sslbench.backbones` registers it; an exported small-image ResNet
(``sslbench export``) names it in its ``config.json``, so ``timm.create_model("local-dir:DIR",
pretrained=True)`` needs that import first. The model's state-dict keys are those of ``base``.
"""

from __future__ import annotations

from typing import Any

import timm
from timm.models import build_model_with_cfg, register_model
from torch import nn

ARCHITECTURE = "sslbench_cifar_resnet"

#: timm's pretrained-config defaults of the registered architecture (looked up by ``register_model``).
default_cfgs: dict[str, dict[str, Any]] = {
    ARCHITECTURE: {
        "input_size": (3, 32, 32),
        "pool_size": (4, 4),
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "first_conv": "conv1",
        "classifier": "fc",
        "num_classes": 1000,
        "description": "a timm ResNet with the CIFAR stem (3x3 stride-1 first conv, no max-pool), as sslbench trains small images",
    }
}


def cifar_stem_(model: nn.Module) -> bool:
    """Give a timm ResNet the CIFAR stem in place; returns whether the model was changed (False:
    not a timm ``ResNet``)."""
    from timm.models.resnet import ResNet

    if not isinstance(model, ResNet):
        return False
    conv1 = model.conv1
    if isinstance(conv1, nn.Conv2d):
        setattr(model, "conv1", nn.Conv2d(conv1.in_channels, conv1.out_channels, 3, stride=1, padding=1, bias=False))  # noqa: B010
    else:  # deep stem: a Sequential whose first layer is a 3x3 stride-2 conv
        first = next(m for m in conv1.modules() if isinstance(m, nn.Conv2d))
        first.stride = (1, 1)
    setattr(model, "maxpool", nn.Identity())  # noqa: B010  (timm annotates these attributes with narrower types)
    return True


@register_model
def sslbench_cifar_resnet(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """timm entry point: the timm ResNet ``base`` (default ``resnet18``) with the CIFAR stem;
    the other keyword arguments go to ``base``. ``pretrained`` loads the weights named by the
    pretrained config (e.g. a ``local-dir:`` folder written by ``sslbench export``)."""
    base = str(kwargs.pop("base", "resnet18"))
    if not timm.is_model(base) or base == ARCHITECTURE:
        raise ValueError(f"{ARCHITECTURE}: base must name a timm ResNet-family model, got {base!r}")

    def build(**model_kwargs: Any) -> nn.Module:
        model = timm.create_model(base, pretrained=False, **model_kwargs)
        if not cifar_stem_(model):
            raise ValueError(f"{ARCHITECTURE}: base {base!r} is not a timm ResNet (no CIFAR stem to give it)")
        return model

    model: nn.Module = build_model_with_cfg(build, ARCHITECTURE, pretrained, **kwargs)
    return model
