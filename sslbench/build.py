"""Build a configured method: the one place that turns a config into a model (the trainer and the
evaluators both use it, and neither imports the other)."""

from __future__ import annotations

from .config import TrainConfig
from .method import Method
from .registry import get_method


def build_method(cfg: TrainConfig) -> Method:
    """The configured method around a freshly initialised backbone (seeded by the caller)."""
    from sslbench.backbones import check_image_size, create_backbone

    method_cls = get_method(cfg.method)
    assert cfg.image_size is not None
    backbone = create_backbone(cfg.backbone, cfg.image_size, **cfg.backbone_kwargs)
    check_image_size(backbone, cfg.image_size)
    method: Method = method_cls(backbone, cfg.method_cfg)
    return method
