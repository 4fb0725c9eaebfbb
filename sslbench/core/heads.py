"""Heads the method plugins share, and the multi-crop encoder call.

- :func:`mlp`: the projector/predictor MLP of SimCLR, MoCo v2/v3, BYOL and SimSiam.
- :func:`encode_views`: runs views through an encoder, all views of one size in one forward pass
  (one BatchNorm group, as DINO's multi-crop wrapper does), and returns one feature per view.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import Tensor, nn

from sslbench.core.augment import AugmentConfig
from sslbench.core.errors import UserError
from sslbench.core.method import ViewSpec

__all__ = ["encode_views", "feature_dim", "fit_to_patches", "mlp", "patch_side"]


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


def patch_side(backbone: nn.Module) -> int:
    """The side in px of a vision transformer's patches (timm's ``patch_embed.patch_size``), 1 for
    any other backbone: the multiple a view's size must be for the backbone to tile it."""
    patch = getattr(getattr(backbone, "patch_embed", None), "patch_size", None)
    return int(patch[0]) if patch else 1


def check_local_crops(local: int, global_size: int, count: int, size_key: str, count_key: str) -> None:
    """Multi-crop's local views must be smaller than the global ones: they are the cheap, partial
    views the student matches to the teacher's global ones; as large or larger they cost
    ``(local / global)^2`` times a global view each and teach nothing a global view does not."""
    if count > 0 and local >= global_size:
        raise UserError(
            f"{size_key} {local} px is not smaller than the global views ({global_size} px, the image size): local crops must be "
            f"the small views of multi-crop; pass --set {size_key}={max(1, global_size // 2)} (or less), or --set {count_key}=0 for no local crops"
        )


def fit_to_patches(size: int, backbone: nn.Module, given: bool, what: str) -> int:
    """A multi-crop view side that the backbone can tile: ``size`` when it is a multiple of the
    patch side (always for a convolutional backbone); a default (``given=False``) is rounded to
    the nearest multiple (at least one patch); a size the user gave is refused with one line
    naming ``what`` (the config key)."""
    patch = patch_side(backbone)
    if size % patch == 0:
        return size
    if given:
        raise UserError(f"{what} {size} px must be a multiple of the backbone's {patch} px patches")
    return patch * max(1, round(size / patch))


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


# ---------------------------------------------------------------------------------------------
# The modern zoo (issue 17): SwAV's prototypes; the projector of Barlow Twins and VICReg.

__all__ += ["Prototypes", "expander"]


class Prototypes(nn.Linear):
    """SwAV's prototypes C (Caron et al. 2020, Sec. 3.1): K learnable vectors of dimension D, a
    bias-free linear layer whose output is the scores ``z C^T``. :meth:`normalize_` puts every
    prototype back on the unit sphere (the official code does it before every forward pass), so
    the scores of unit ``z`` are cosines. Shapes: (B, D) -> (B, K)."""

    def __init__(self, dim: int, num_prototypes: int) -> None:
        super().__init__(dim, num_prototypes, bias=False)

    @torch.no_grad()
    def normalize_(self) -> None:
        """Scale each prototype (row of ``weight``) to unit L2 norm, in place."""
        self.weight.copy_(torch.nn.functional.normalize(self.weight, dim=1))


def expander(in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 3) -> nn.Sequential:
    """Barlow Twins' projector and VICReg's expander: :func:`mlp` (Linear-BN-ReLU blocks) whose last
    Linear has no bias, as in both official codes: the losses centre or standardise its output, so
    a bias would get no gradient. Shapes: (B, in_dim) -> (B, out_dim)."""
    head = mlp(in_dim, hidden_dim, out_dim, num_layers)
    last = head[-1]
    assert isinstance(last, nn.Linear)
    head[-1] = nn.Linear(last.in_features, out_dim, bias=False)
    return head


# ---------------------------------------------------------------------------------------------
# Self-distillation (DINO, iBOT, DINOv2): the DINO head and the multi-crop views, shared.

__all__ += ["DINOHead", "WeightNormLinear", "local_crop_size", "multicrop_views"]


class WeightNormLinear(nn.Module):
    """A linear layer without bias, weight-normalised per output row (Salimans & Kingma 2016):
    ``W = g * V / ||V||``, the official head's ``nn.utils.weight_norm(nn.Linear(..., bias=False))``
    with g filled with 1. With ``fixed_g`` g is a buffer of ones (the official
    ``norm_last_layer``, which freezes the parameter ``weight_g``), else a trained parameter.
    V starts as ``nn.Linear``'s default. Shapes: (B, in_dim) -> (B, out_dim).
    """

    weight_g: Tensor

    def __init__(self, in_dim: int, out_dim: int, fixed_g: bool = True) -> None:
        super().__init__()
        self.weight_v = nn.Parameter(nn.Linear(in_dim, out_dim, bias=False).weight.detach())  # (out_dim, in_dim)
        g = torch.ones(out_dim, 1)
        if fixed_g:
            self.register_buffer("weight_g", g)
        else:
            self.weight_g = nn.Parameter(g)

    def forward(self, x: Tensor) -> Tensor:
        return torch.nn.functional.linear(x, self.weight_g * torch.nn.functional.normalize(self.weight_v, dim=1))


class DINOHead(nn.Module):
    """DINO's projection head (official ``vision_transformer.DINOHead``; iBOT's ``models/head.py``
    ``iBOTHead`` and DINOv2's ``dinov2/layers/dino_head.py`` are the same): an MLP of ``layers``
    (3) linear layers with GELU (hidden 2048, bottleneck 256, optional BN), L2 normalisation, then
    a weight-normalised linear layer to K prototypes (:class:`WeightNormLinear`). The MLP's Linear
    weights start from a truncated normal (std 0.02) with zero biases.
    Shapes: (..., in_dim) -> (..., K) (any leading dimensions without BN; (B, in_dim) with BN).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        layers: int = 3,
        use_bn: bool = False,
        norm_last_layer: bool = True,
    ) -> None:
        super().__init__()
        self.mlp = mlp(in_dim, hidden_dim, bottleneck_dim, layers, hidden_bn=use_bn, act=nn.GELU)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, fixed_g=norm_last_layer)

    def forward(self, h: Tensor) -> Tensor:
        return self.last_layer(torch.nn.functional.normalize(self.mlp(h), dim=-1))  # type: ignore[no-any-return]


def local_crop_size(image_size: int, patch: int = 1) -> int:
    """DINO's local/global side ratio 96/224 rounded to a multiple of 8 px (16 at 32 px, 8 at 16 px,
    96 at 224 px), or of a ViT's ``patch`` when 8 is not one (98 for 14 px patches, as DINOv2)."""
    raw = image_size * 96 / 224
    size = max(8, 8 * round(raw / 8))
    return size if size % patch == 0 else patch * max(1, round(raw / patch))


def multicrop_views(
    base: AugmentConfig,
    image_size: int,
    encoder: nn.Module,
    local_crops: int,
    local_size: int | None,
    local_scale: tuple[float, float],
) -> list[ViewSpec]:
    """DINO's multi-crop views (``DataAugmentationDINO``; iBOT's and DINOv2's are the same): 2 global
    views at ``image_size`` (blur p 1.0; blur 0.1 + solarize 0.2) and ``local_crops`` local views
    (crop scale ``local_scale``, blur 0.5) of side ``local_size`` (None: :func:`local_crop_size`),
    all other settings from ``base``. The config keys named in errors are ``method_cfg.local_crop_size``
    and ``method_cfg.local_crops``."""
    given = local_size is not None
    size = fit_to_patches(local_size or local_crop_size(image_size, patch_side(encoder)), encoder, given, "method_cfg.local_crop_size")
    check_local_crops(size, image_size, local_crops, "method_cfg.local_crop_size", "method_cfg.local_crops")
    local = ViewSpec(replace(base, crop_scale=local_scale, blur_p=0.5, solarize_p=0.0), size)
    return [
        ViewSpec(replace(base, blur_p=1.0, solarize_p=0.0), image_size),
        ViewSpec(replace(base, blur_p=0.1, solarize_p=0.2), image_size),
        *[local] * local_crops,
    ]
