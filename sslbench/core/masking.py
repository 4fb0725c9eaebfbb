"""Patch dropping on timm vision transformers, shared by the masked methods (MAE, MSN).

A masked method keeps, per sample, a random subset of the patch tokens and runs the transformer
blocks on the prefix tokens (class token, register tokens) and the kept patches only. The keep
indices come from :func:`random_masking` on per-sample noise that the method draws from
``Batch.uniform``: a pure function of (seed, epoch, sample), so N processes and a resumed run
drop exactly the patches one unbroken process drops.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sslbench.core.errors import UserError

__all__ = ["random_masking", "require_vision_transformer", "visible_tokens"]


def require_vision_transformer(backbone: nn.Module, method: str) -> nn.Module:
    """``backbone`` when it is one of timm's plain vision transformers, else a one-line UserError
    naming ``method`` and the backbones that work."""
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(backbone, VisionTransformer):
        name = getattr(backbone, "pretrained_cfg", {}).get("architecture") or type(backbone).__name__
        raise UserError(
            f"{method} needs a vision transformer, got {name} ({type(backbone).__name__}); use a timm VisionTransformer: "
            "vit_* or deit_* (e.g. --backbone vit_tiny_patch16_224 --image-size 32)"
        )
    return backbone


def random_masking(noise: Tensor, keep: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample random masking by sorting noise (MAE's official ``random_masking``).

    ``noise`` (B, N) -> ``ids_keep`` (B, keep): the visible patches (the ``keep`` smallest noise
    values, in that order), ``mask`` (B, N): 0 visible, 1 removed, in patch order, and
    ``ids_restore`` (B, N): the inverse permutation of the shuffle (``ids_shuffle[ids_restore] ==
    arange(N)``), which puts the decoder's tokens back in patch order. Sorting is stable, so ties
    (vanishingly rare) break by patch index on every device.
    """
    ids_shuffle = torch.argsort(noise, dim=1, stable=True)  # ascending: small noise is kept
    ids_restore = torch.argsort(ids_shuffle, dim=1, stable=True)  # the rank of each patch in the shuffle
    mask = (ids_restore >= keep).to(noise.dtype)
    return ids_shuffle[:, :keep], mask, ids_restore


def visible_tokens(vit: nn.Module, images: Tensor, ids_keep: Tensor) -> Tensor:
    """(B, 3, S, S), (B, keep) -> (B, prefix + keep, D): timm's patch embedding and ``_pos_embed``
    (position embeddings, interpolated to the input's grid with ``dynamic_img_size``, and the prefix
    tokens), then the prefix tokens and the kept patches only, in the order of ``ids_keep``. What
    follows is the model's own ``norm_pre`` and ``blocks``."""
    tokens = vit._pos_embed(vit.patch_embed(images))  # type: ignore[operator]  # (B, prefix + N, D), positions added
    num_prefix = int(vit.num_prefix_tokens)  # type: ignore[arg-type]  # the class token (and register tokens)
    prefix, patches = tokens[:, :num_prefix], tokens[:, num_prefix:]
    visible = torch.gather(patches, 1, ids_keep.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))
    return torch.cat([prefix, visible], dim=1)
