"""SimMIM: masked image modelling with a mask token in the encoder and a linear pixel head.

Xie, Zhang, Cao, Lin, Bao, Yao, Dai, Hu. "SimMIM: A Simple Framework for Masked Image Modeling."
CVPR 2022 (official code: ``microsoft/SimMIM`` at commit ``d3e29bc``: ``models/simmim.py``,
``data/data_simmim.py``, ``configs/vit_base__800ep/simmim_pretrain__vit_base__img224__800ep.yaml``).
One view per image. The image is cut into square mask units of ``mask_patch_size`` px (several
ViT patches each); a random 60% of the units of each sample is masked. The ViT encoder sees every
patch, with the embedding of each masked patch replaced by one learned mask token before the
position embeddings are added; a one-layer linear head (the official 1x1 convolution to
``patch^2 * 3`` channels and pixel shuffle) predicts every patch's raw (normalised) pixels from
its encoded token. The loss is the L1 error on the masked pixels only, summed and divided by the
number of masked pixels (+1e-5) and by the 3 channels, as the official ``SimMIM.forward``.

The mask of a sample is the official ``MaskGenerator`` (a random permutation of the units, the
first ``ceil(units * mask_ratio)`` masked), drawn as the argsort of per-sample noise from
:meth:`Batch.uniform`: a pure function of (seed, epoch, sample), the same in every process and
after a resume. The head is thrown away after pretraining: evaluation uses the timm ViT.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor, nn

from sslbench.api import (
    EMBEDDING_LOG,
    AugmentConfig,
    Batch,
    Family,
    Method,
    MethodConfig,
    Recipe,
    Reconstruction,
    UserError,
    ViewSpec,
    encode_patches,
    patchify,
    random_masking,
    register_method,
    require_vit,
    unpatchify,
)

__all__ = ["SimMIM", "SimMIMConfig", "simmim_loss", "simmim_mask", "mask_unit"]

LOSS_EPS = 1e-5  # the official loss: (l1 * mask).sum() / (mask.sum() + 1e-5) / in_chans
OFFICIAL_MASK_FRACTION = 32 / 224  # the official ViT-B config: 32 px mask units on 224 px images (1/7 of the side)


@dataclass
class SimMIMConfig(MethodConfig):
    """SimMIM hyper-parameters (official ViT-B config ``simmim_pretrain__vit_base__img224__800ep``)."""

    mask_ratio: float = 0.6  # share of each sample's mask units masked (official MASK_RATIO: 0.6; paper Table 1)
    mask_patch_size: int | None = None  # mask unit side in px, a multiple of the ViT patch dividing the image side;
    # None: patch x 2^k closest to 1/7 of the image side (official: 32 px at 224 px, ViT-B/16; 32 px at 192 px, Swin)

    def validate(self) -> None:
        if not 0.0 < self.mask_ratio < 1.0:
            raise UserError(f"method_cfg.mask_ratio must be in (0, 1), got {self.mask_ratio}")
        if self.mask_patch_size is not None and self.mask_patch_size < 1:
            raise UserError(f"method_cfg.mask_patch_size must be >= 1 px (or None), got {self.mask_patch_size}")


def mask_unit(image_size: int, patch: int, given: int | None) -> int:
    """The mask unit side in px: ``given`` (checked), or of the sides ``patch x 2^k`` that divide
    ``image_size`` the one closest to ``image_size / 7``: the official units, 32 px = 2 x 16 px
    patches at 224 px (ViT-B) and 32 px = 8 x 4 px patches at 192 px (Swin), are both this."""
    if given is not None:
        if given % patch or image_size % given:
            raise UserError(
                f"method_cfg.mask_patch_size {given} px must be a multiple of the ViT's {patch} px patches and divide the "
                f"{image_size} px image; pick one of {[m for m in range(patch, image_size + 1, patch) if image_size % m == 0]}"
            )
        return given
    sizes = [patch * 2**k for k in range(image_size.bit_length()) if image_size % (patch * 2**k) == 0]
    return int(min(sizes, key=lambda m: (abs(m - image_size * OFFICIAL_MASK_FRACTION), m)))


def simmim_mask(noise: Tensor, units: tuple[int, int], scale: int, ratio: float) -> Tensor:
    """(B, U) noise over the mask units -> (B, N) patch mask, 1 masked: the ``ceil(U * ratio)`` units
    of largest noise masked (the official ``MaskGenerator``'s permutation), each unit repeated over
    its ``scale x scale`` patches, in row-major patch order."""
    count = math.ceil(units[0] * units[1] * ratio)
    _, mask, _ = random_masking(noise, units[0] * units[1] - count)
    grid = mask.view(-1, units[0], units[1]).repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    return grid.flatten(1)


def simmim_loss(pred: Tensor, target: Tensor, mask: Tensor, channels: int = 3) -> Tensor:
    """``sum(|pred - target| * mask) / (masked pixels + 1e-5) / channels``, the official loss.
    ``pred``, ``target``: (B, N, p * p * C) patches; ``mask``: (B, N), 1 masked. Scalar, float32."""
    pixels_per_patch = pred.shape[-1] // channels
    l1 = (pred.float() - target.float()).abs().sum(dim=-1)  # (B, N): summed over the patch's pixels and channels
    return (l1 * mask).sum() / (mask.sum() * pixels_per_patch + LOSS_EPS) / channels


@register_method("simmim")
class SimMIM(Method):
    """The timm ViT on all patches (masked ones as a mask token), a linear head to pixels; L1 on the masked ones."""

    Config = SimMIMConfig
    description = "Masked image modelling: a mask token replaces 60% of the patches, a linear head predicts their pixels (SimMIM)"
    paper = "Xie et al., SimMIM: A Simple Framework for Masked Image Modeling, CVPR 2022"
    supports_reconstruction = True

    def __init__(self, backbone: nn.Module, cfg: SimMIMConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or SimMIMConfig()
        self.encoder = require_vit(backbone, "simmim")
        embed = cast(nn.Module, backbone.patch_embed)
        self.patch = int(embed.patch_size[0])  # type: ignore[index]  # timm: a (p, p) tuple
        self.grid = (int(embed.grid_size[0]), int(embed.grid_size[1]))  # type: ignore[index]
        self.num_prefix = int(backbone.num_prefix_tokens)  # type: ignore[arg-type]
        size = self.grid[0] * self.patch
        if self.grid[0] != self.grid[1]:
            raise UserError(f"simmim needs a square patch grid, got {self.grid}; use a square --image-size")
        self.unit = mask_unit(size, self.patch, cfg.mask_patch_size)  # mask unit side in px
        self.scale = self.unit // self.patch  # ViT patches per mask unit side
        self.units = (self.grid[0] // self.scale, self.grid[1] // self.scale)
        if math.ceil(self.units[0] * self.units[1] * cfg.mask_ratio) >= self.units[0] * self.units[1]:
            raise UserError(f"method_cfg.mask_ratio {cfg.mask_ratio} masks all {self.units[0] * self.units[1]} mask units; lower it")
        width = int(backbone.embed_dim)  # type: ignore[arg-type]
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        nn.init.trunc_normal_(self.mask_token, std=0.02, a=-0.02, b=0.02)  # the official _trunc_normal_(std=.02), cut at +-std
        self.head = nn.Linear(width, self.patch * self.patch * 3)  # the official 1x1 conv + PixelShuffle(patch), per token

    @classmethod
    def recipe(cls, image_size: int, family: Family) -> Recipe:
        """AdamW, lr 1e-4 x B/512 (= 5e-5 x B/256), betas (0.9, 0.999), wd 0.05, gradient clip 5
        (official ViT-B config and ``config.py``; ``main_simmim.py`` scales the lr by B/512), and
        random resized crops with scale (0.67, 1) and flips only (``data_simmim.SimMIMTransform``)."""
        aug = {"crop_scale": (0.67, 1.0), "jitter_p": 0.0, "grayscale_p": 0.0, "blur_p": 0.0, "solarize_p": 0.0}
        return Recipe(optimizer="adamw", lr=5e-5, lr_scaling="linear", weight_decay=0.05, betas=(0.9, 0.999), grad_clip=5.0, aug=aug)

    def views(self, base: AugmentConfig, image_size: int) -> list[ViewSpec]:
        """One view per image."""
        return [ViewSpec(base, image_size)]

    def _forward(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The first view (B, 3, S, S) -> predicted pixels (B, N, p * p * 3) float32, the mask (B, N),
        the pixel targets (B, N, p * p * 3) and the encoded patch tokens (B, N, D)."""
        images = batch.views[0]
        mask = simmim_mask(batch.uniform(0, self.units[0] * self.units[1]), self.units, self.scale, self.cfg.mask_ratio)
        tokens = encode_patches(self.encoder, images, replace=mask, mask_token=self.mask_token)[:, self.num_prefix :]
        return self.head(tokens).float(), mask, patchify(images.float(), self.patch), tokens

    def training_step(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss, and as the health embedding the average of the encoded patch tokens."""
        pred, mask, target, tokens = self._forward(batch)
        loss = simmim_loss(pred, target, mask)
        return loss, {"loss": loss.detach(), EMBEDDING_LOG: tokens.detach().float().mean(dim=1)}

    @torch.no_grad()
    def reconstruct(self, batch: Batch) -> Reconstruction:
        """The predicted pixels of ``batch.views[0]`` (raw normalised pixels: no per-patch statistics) and its visible patches."""
        pred, mask, _, _ = self._forward(batch)
        visible = unpatchify((1 - mask).unsqueeze(-1).expand(-1, -1, self.patch * self.patch), self.patch, self.grid)
        return Reconstruction(unpatchify(pred, self.patch, self.grid), visible)
