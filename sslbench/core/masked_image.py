"""Shared parts of the masked-image methods (MAE, SimMIM, I-JEPA) on timm vision transformers.

Patches in the official MAE order, masking by sorting per-sample noise, fixed 2D sine-cosine
position embeddings, and one encoder pass through timm's own modules (``patch_embed``,
``_pos_embed``, ``norm_pre``, ``blocks``, ``norm``) that can replace masked patch embeddings by a
mask token (SimMIM) and keep a subset of the patches, of a different count per sample (MAE's
visible patches, I-JEPA's context block), padded and hidden from attention by a key mask.
"""

from __future__ import annotations

from typing import cast

import torch
from einops import rearrange
from torch import Tensor, nn

from sslbench.core.errors import UserError

__all__ = ["encode_patches", "patchify", "random_masking", "require_vit", "sincos_pos_embed_2d", "unpatchify", "visible_tokens"]


def patchify(images: Tensor, patch: int) -> Tensor:
    """(B, C, H, W) -> (B, N, p * p * C): patches in row-major order, each flattened in (row, column,
    channel) order as in the official MAE ``patchify``."""
    return rearrange(images, "b c (h p) (w q) -> b (h w) (p q c)", p=patch, q=patch)


def unpatchify(patches: Tensor, patch: int, grid: tuple[int, int]) -> Tensor:
    """The inverse of :func:`patchify`: (B, N, p * p * C) -> (B, C, grid_h * p, grid_w * p)."""
    return rearrange(patches, "b (h w) (p q c) -> b c (h p) (w q)", h=grid[0], w=grid[1], p=patch, q=patch)


def random_masking(noise: Tensor, keep: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample random masking by sorting noise (the official MAE ``random_masking``).

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


def sincos_pos_embed_2d(dim: int, grid: tuple[int, int]) -> Tensor:
    """Fixed 2D sine-cosine position embeddings (the official MAE/I-JEPA ``get_2d_sincos_pos_embed``),
    (H * W, dim) in row-major patch order: the first half of the channels encodes the column, the
    second the row, each as [sin(pos * w_k), cos(pos * w_k)] with ``w_k = 10000^(-k / (dim / 4))``."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(torch.arange(grid[0], dtype=torch.float64), torch.arange(grid[1], dtype=torch.float64), indexing="ij")

    def embed(pos: Tensor) -> Tensor:
        out = pos.reshape(-1, 1) * omega  # (H * W, dim / 4)
        return torch.cat([out.sin(), out.cos()], dim=1)

    return torch.cat([embed(cols), embed(rows)], dim=1).float()


def require_vit(backbone: nn.Module, method: str) -> nn.Module:
    """``backbone`` when it is one of timm's plain vision transformers, else a one-line UserError
    naming ``method``."""
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(backbone, VisionTransformer):
        name = getattr(backbone, "pretrained_cfg", {}).get("architecture") or type(backbone).__name__
        raise UserError(
            f"{method} needs a vision transformer, got {name} ({type(backbone).__name__}); use a timm VisionTransformer: "
            "vit_* or deit_* (e.g. --backbone vit_tiny_patch16_224 --image-size 32)"
        )
    return backbone


def visible_tokens(
    vit: nn.Module, images: Tensor, ids: Tensor | None = None, *, replace: Tensor | None = None, mask_token: Tensor | None = None
) -> Tensor:
    """(B, 3, S, S) -> (B, prefix + n, D): timm's patch embedding and ``_pos_embed`` (position
    embeddings, interpolated to the input's grid with ``dynamic_img_size``, and the prefix tokens),
    the input of the ViT's ``norm_pre`` and ``blocks``. ``replace`` and ``mask_token``: masked patch
    embeddings replaced before the positions are added; ``ids`` (B, n): then only the prefix tokens
    and these patches, in that order (see :func:`encode_patches`)."""
    x = vit.patch_embed(images)  # type: ignore[operator]  # (B, N, D), or (B, H, W, D) with timm's dynamic_img_size
    if replace is not None and mask_token is not None:
        w = replace.reshape(x.shape[:-1]).unsqueeze(-1).to(x.dtype)  # row-major patch order either way
        x = x * (1 - w) + mask_token.to(x.dtype) * w
    tokens = vit._pos_embed(x)  # type: ignore[operator]  # (B, prefix + N, D), positions added
    if ids is not None:
        prefix_n = int(vit.num_prefix_tokens)  # type: ignore[arg-type]
        prefix, patches = tokens[:, :prefix_n], tokens[:, prefix_n:]
        kept = torch.gather(patches, 1, ids.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))
        tokens = torch.cat([prefix, kept], dim=1)
    return cast(Tensor, tokens)


def encode_patches(
    vit: nn.Module,
    images: Tensor,
    *,
    ids: Tensor | None = None,
    valid: Tensor | None = None,
    replace: Tensor | None = None,
    mask_token: Tensor | None = None,
) -> Tensor:
    """The timm ViT ``vit`` on (B, 3, S, S) ``images`` -> (B, prefix + n, D): the prefix tokens
    (class and register tokens) and n patch tokens, after the blocks and the final norm.

    - ``replace`` (B, N), 1 where a patch's embedding is replaced by ``mask_token`` (1, 1, D) before
      the position embeddings are added (SimMIM's encoder);
    - ``ids`` (B, n): only these patches enter the blocks (MAE's visible patches, I-JEPA's context),
      in that order; ``valid`` (B, n) bool, False for padding entries of ``ids`` (a different count
      per sample), which no token attends to (their outputs are meaningless).

    The final norm is timm's ``norm``, or with average pooling (``global_pool=avg``, where timm moves
    it after the pooling as ``fc_norm``) that one, per token, as the official encoders'.
    """
    x = vit.norm_pre(visible_tokens(vit, images, ids, replace=replace, mask_token=mask_token))  # type: ignore[operator]
    if valid is None:
        x = vit.blocks(x)  # type: ignore[operator]
    else:
        prefix_ok = valid.new_ones(valid.shape[0], x.shape[1] - valid.shape[1])
        keys = torch.cat([prefix_ok, valid], dim=1)[:, None, None, :]  # (B, 1, 1, L): True takes part
        for blk in vit.blocks:  # type: ignore[union-attr]
            x = blk(x, attn_mask=keys)
    norm = vit.norm if not isinstance(vit.norm, nn.Identity) else vit.fc_norm
    return cast(Tensor, norm(x))  # type: ignore[operator]
