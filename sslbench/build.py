"""Building a configured method: the backbone from timm, the method plugin around it.

Shared by the trainer and the evaluators (fine-tuning from a run's projector), which therefore
do not import each other.
"""

from __future__ import annotations

from torch import nn

from .config import TrainConfig
from .registry import get_method


def build_method(cfg: TrainConfig) -> nn.Module:
    """The configured method around a freshly initialised backbone (seeded by the caller)."""
    from sslbench.backbones import check_image_size, create_backbone

    method_cls = get_method(cfg.method)
    backbone = create_backbone(cfg.backbone, cfg.image_size, **cfg.backbone_kwargs)
    check_image_size(backbone, cfg.image_size)
    return method_cls(backbone, cfg.method_cfg)
