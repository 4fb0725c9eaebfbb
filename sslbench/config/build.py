"""Build a configured method: the one place that turns a config into a model (the trainer and the
evaluators both use it, and neither imports the other)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from sslbench.config import TrainConfig
from sslbench.core.errors import UserError
from sslbench.core.method import Method
from sslbench.core.registry import get_method


def build_method(cfg: TrainConfig) -> Method:
    """The configured method around a freshly initialised backbone (seeded by the caller)."""
    from sslbench.backbones import check_image_size, create_backbone

    method_cls = get_method(cfg.method)
    assert cfg.image_size is not None
    backbone = create_backbone(cfg.backbone, cfg.image_size, **cfg.backbone_kwargs)
    check_image_size(backbone, cfg.image_size)
    method: Method = method_cls(backbone, cfg.method_cfg)
    return method


def load_trained_method(run_dir: str | Path) -> tuple[TrainConfig, Method]:
    """The config and the trained method of a finished run: built from ``config.yaml`` with the
    weights of ``method.safetensors`` (heads included), strictly checked, in eval mode."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from sslbench.backbones import load_state_strict
    from sslbench.config import load_run_config
    from sslbench.core.rundir import RunDir

    cfg = load_run_config(Path(run_dir))
    path = RunDir(run_dir).method
    if not path.is_file():
        raise UserError(f"{path} not found: is {run_dir} a finished sslbench run directory?")
    torch.manual_seed(0)  # the weights are overwritten; only keeps the global RNG stream predictable
    method = build_method(cfg)
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"{path} is not a readable safetensors file: {exc}") from exc
    load_state_strict(method, state, source=str(path))
    return cfg, method.eval()


def load_encoder(run_dir: str | Path, *, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the trained encoder of a run directory: its backbone (from ``config.yaml``) with the
    weights of ``encoder.safetensors``, strictly checked, in eval mode."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from sslbench.backbones import create_backbone, load_state_strict
    from sslbench.config import load_run_config
    from sslbench.core.rundir import RunDir

    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    path = RunDir(run_dir).encoder
    if not path.is_file():
        raise UserError(f"{path} not found: is {run_dir} a finished sslbench run directory?")
    assert cfg.image_size is not None  # resolved when the config is loaded
    kwargs = {**cfg.backbone_kwargs, "pretrained": False}  # the weights come from the run: nothing to download
    model = create_backbone(cfg.backbone, cfg.image_size, **kwargs)
    try:
        state = load_file(str(path), device=str(map_location))
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"{path} is not a readable safetensors file: {exc}") from exc
    load_state_strict(model, state, source=str(path))
    return model.eval()
