"""MAE: masked autoencoders on timm vision transformers.

He, Chen, Xie, Li, Dollár, Girshick. "Masked Autoencoders Are Scalable Vision Learners." CVPR 2022
(official code: ``facebookresearch/mae``, ``models_mae.py``). One view per image, cut into patches;
a random 75% of the patches of each sample is removed, the ViT encoder runs on the class token and
the visible patches only, and a lightweight transformer decoder, given the encoded visible patches,
a shared learned mask token in place of each removed one and fixed 2D sine-cosine position
embeddings, predicts the pixels of every patch. The loss is the mean squared error on the removed
patches only, against each patch's pixels normalised by its own mean and variance (norm_pix_loss).
The decoder is thrown away after pretraining: evaluation uses the timm ViT (its pooled feature).

The mask of a sample is the argsort of per-sample noise (the official ``random_masking``), drawn
from :meth:`Batch.uniform`: a pure function of (seed, epoch, sample), so N processes and a resumed
run draw exactly the masks one unbroken process draws.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import cast

import torch
from einops import rearrange
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
    random_masking,
    register_method,
    require_vision_transformer,
    visible_tokens,
)

__all__ = ["MAE", "MAEConfig", "mae_loss", "norm_pix_targets", "patchify", "random_masking", "sincos_pos_embed_2d", "unpatchify"]

NORM_PIX_EPS = 1e-6  # the official forward_loss: (target - mean) / (var + 1e-6) ** 0.5


@dataclass
class MAEConfig(MethodConfig):
    """MAE hyper-parameters (defaults for small images and short runs; the paper's in the comments)."""

    mask_ratio: float = 0.75  # share of each sample's patches removed (paper: 0.75, Sec. 4 / Fig. 5)
    norm_pix_loss: bool = True  # targets: each patch's pixels normalised by its mean and variance (paper: on, Table 1d)
    decoder_dim: int = 128  # decoder width (paper: 512)
    decoder_depth: int = 2  # decoder transformer blocks (paper: 8)
    decoder_heads: int = 4  # decoder attention heads (paper: 16)

    def validate(self) -> None:
        if not 0.0 < self.mask_ratio < 1.0:
            raise UserError(f"method_cfg.mask_ratio must be in (0, 1), got {self.mask_ratio}")
        if self.decoder_depth < 1 or self.decoder_heads < 1:
            raise UserError("method_cfg.decoder_depth and decoder_heads must be >= 1")
        if self.decoder_dim < 4 or self.decoder_dim % 4 or self.decoder_dim % self.decoder_heads:
            raise UserError(f"method_cfg.decoder_dim must be a multiple of 4 (2D sine-cosine embedding) and of decoder_heads; got {self.decoder_dim}")


def patchify(images: Tensor, patch: int) -> Tensor:
    """(B, C, H, W) -> (B, N, p * p * C): patches in row-major order, each flattened in (row, column,
    channel) order as in the official ``patchify``."""
    return rearrange(images, "b c (h p) (w q) -> b (h w) (p q c)", p=patch, q=patch)


def unpatchify(patches: Tensor, patch: int, grid: tuple[int, int]) -> Tensor:
    """The inverse of :func:`patchify`: (B, N, p * p * C) -> (B, C, grid_h * p, grid_w * p)."""
    return rearrange(patches, "b (h w) (p q c) -> b c (h p) (w q)", h=grid[0], w=grid[1], p=patch, q=patch)


def norm_pix_targets(patches: Tensor, eps: float = NORM_PIX_EPS) -> Tensor:
    """(B, N, K) -> (B, N, K): each patch minus its mean, over sqrt(its unbiased variance + eps)
    (the official ``forward_loss`` with ``norm_pix_loss``)."""
    var, mean = torch.var_mean(patches, dim=-1, keepdim=True)  # unbiased, as torch's Tensor.var
    return (patches - mean) / (var + eps).sqrt()


def mae_loss(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """The MAE loss: per patch the mean squared error over its K values, averaged over the
    removed patches only. ``pred``, ``target``: (B, N, K); ``mask``: (B, N), 1 removed. Scalar."""
    per_patch = (pred - target).pow(2).mean(dim=-1)
    return (per_patch * mask).sum() / mask.sum()


def sincos_pos_embed_2d(dim: int, grid: tuple[int, int]) -> Tensor:
    """Fixed 2D sine-cosine position embeddings (the official ``get_2d_sincos_pos_embed``), (H * W, dim)
    in row-major patch order: the first half of the channels encodes the column, the second the row,
    each as [sin(pos * w_k), cos(pos * w_k)] with ``w_k = 10000^(-k / (dim / 4))``."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(torch.arange(grid[0], dtype=torch.float64), torch.arange(grid[1], dtype=torch.float64), indexing="ij")

    def embed(pos: Tensor) -> Tensor:
        out = pos.reshape(-1, 1) * omega  # (H * W, dim / 4)
        return torch.cat([out.sin(), out.cos()], dim=1)

    return torch.cat([embed(cols), embed(rows)], dim=1).float()


@register_method("mae")
class MAE(Method):
    """The encoder (the timm ViT) on the visible patches, the decoder on all of them; MSE on the removed ones."""

    Config = MAEConfig
    description = "Masked image modelling: a ViT encodes 25% of the patches, a small decoder predicts the pixels of the rest (MAE)"
    paper = "He et al., Masked Autoencoders Are Scalable Vision Learners, CVPR 2022"
    supports_reconstruction = True

    decoder_pos_embed: Tensor  # (1, N, decoder_dim): fixed, a non-persistent buffer (not in method.safetensors)

    def __init__(self, backbone: nn.Module, cfg: MAEConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or MAEConfig()
        self.encoder = require_vision_transformer(backbone, "mae")
        embed = cast(nn.Module, backbone.patch_embed)
        self.patch = int(embed.patch_size[0])  # type: ignore[index]  # timm: a (p, p) tuple
        self.grid = (int(embed.grid_size[0]), int(embed.grid_size[1]))  # type: ignore[index]
        self.num_prefix = int(backbone.num_prefix_tokens)  # type: ignore[arg-type]  # the class token (and register tokens)
        n = self.grid[0] * self.grid[1]
        self.keep = round(n * (1 - cfg.mask_ratio))  # visible patches per sample (the official code truncates: int())
        if not 1 <= self.keep < n:
            raise UserError(f"mask_ratio {cfg.mask_ratio} keeps {self.keep} of {n} patches; it must keep at least one and remove one")
        d = cfg.decoder_dim
        from timm.models.vision_transformer import Block

        self.decoder_embed = nn.Linear(int(backbone.embed_dim), d)  # type: ignore[arg-type]
        self.mask_token = nn.Parameter(torch.zeros(1, 1, d))
        self.register_buffer("decoder_pos_embed", sincos_pos_embed_2d(d, self.grid).unsqueeze(0), persistent=False)
        norm = cast("type[nn.Module]", partial(nn.LayerNorm, eps=1e-6))  # the official norm_layer (timm types it as a class)
        self.decoder_blocks = nn.Sequential(
            *[Block(d, cfg.decoder_heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=norm) for _ in range(cfg.decoder_depth)]
        )
        self.decoder_norm = norm(d)
        self.decoder_pred = nn.Linear(d, self.patch * self.patch * 3)
        # The official initialisation of the decoder: xavier-uniform linear layers, zero biases, mask token N(0, 0.02).
        for m in [self.decoder_embed, self.decoder_pred, *self.decoder_blocks.modules()]:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.mask_token, std=0.02)

    @classmethod
    def recipe(cls, image_size: int, family: Family) -> Recipe:
        """AdamW, lr 1.5e-4 x B/256, betas (0.9, 0.95), wd 0.05, at every size (He et al. 2022,
        Appendix A.1, Table 8; the trainer's linear warm-up and cosine decay), and only random
        resized crops (scale 0.2-1) and flips (Sec. A.1: "RandomResizedCrop" and flipping;
        the official ``main_pretrain.py`` crops with scale (0.2, 1.0))."""
        aug = {"crop_scale": (0.2, 1.0), "jitter_p": 0.0, "grayscale_p": 0.0, "blur_p": 0.0, "solarize_p": 0.0}
        return Recipe(optimizer="adamw", lr=1.5e-4, lr_scaling="linear", weight_decay=0.05, betas=(0.9, 0.95), aug=aug)

    def views(self, base: AugmentConfig, image_size: int) -> list[ViewSpec]:
        """One view per image."""
        return [ViewSpec(base, image_size)]

    def encode_visible(self, images: Tensor, ids_keep: Tensor) -> Tensor:
        """(B, 3, S, S), (B, keep) -> (B, prefix + keep, D): the timm ViT (patch embedding, position
        embedding and class token, blocks, norm) on the prefix tokens and the visible patches only."""
        vit = self.encoder
        x = vit.blocks(vit.norm_pre(visible_tokens(vit, images, ids_keep)))  # type: ignore[operator]
        # The final norm: timm's ``norm``, or with average pooling (``global_pool=avg``, where timm
        # moves it after the pooling as ``fc_norm``) that one, per token, as the official encoder's.
        norm = vit.norm if not isinstance(vit.norm, nn.Identity) else vit.fc_norm
        return cast(Tensor, norm(x))  # type: ignore[operator]

    def decode(self, latent: Tensor, ids_restore: Tensor) -> Tensor:
        """(B, prefix + keep, D), (B, N) -> (B, N, p * p * 3): the pixels predicted for every patch."""
        x = self.decoder_embed(latent)
        b, n, d = x.shape[0], ids_restore.shape[1], x.shape[-1]
        prefix, visible = x[:, : self.num_prefix], x[:, self.num_prefix :]
        shuffled = torch.cat([visible, self.mask_token.to(x.dtype).expand(b, n - visible.shape[1], d)], dim=1)
        patches = torch.gather(shuffled, 1, ids_restore.unsqueeze(-1).expand(-1, -1, d)) + self.decoder_pos_embed.to(x.dtype)
        x = self.decoder_norm(self.decoder_blocks(torch.cat([prefix, patches], dim=1)))
        return cast(Tensor, self.decoder_pred(x[:, self.num_prefix :]))

    def forward_masked(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
        """The first view (B, 3, S, S) -> the prediction (B, N, p * p * 3), the mask (B, N) and
        the pixel targets (B, N, p * p * 3), float32 (normalised per patch with norm_pix_loss)."""
        pred, mask, target, _ = self._forward_masked(batch)
        return pred, mask, target

    def _forward_masked(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """:meth:`forward_masked`, and the encoder's latent (B, prefix + keep, D)."""
        images = batch.views[0]
        noise = batch.uniform(0, self.grid[0] * self.grid[1])
        ids_keep, mask, ids_restore = random_masking(noise, self.keep)
        latent = self.encode_visible(images, ids_keep)
        pred = self.decode(latent, ids_restore).float()
        target = patchify(images.float(), self.patch)
        return pred, mask, norm_pix_targets(target) if self.cfg.norm_pix_loss else target, latent

    def training_step(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss, and as the health embedding the average of the visible patches' latent tokens."""
        pred, mask, target, latent = self._forward_masked(batch)
        loss = mae_loss(pred, target, mask)
        return loss, {"loss": loss.detach(), EMBEDDING_LOG: latent[:, self.num_prefix :].detach().mean(dim=1)}

    @torch.no_grad()
    def reconstruct(self, batch: Batch) -> Reconstruction:
        """The predicted pixels of ``batch.views[0]`` and its visible patches. With norm_pix_loss
        the model predicts each patch's content up to its mean and scale; every predicted patch is
        shown at the average mean and standard deviation of the sample's *visible* patches, so the
        picture holds nothing the model did not see (a removed patch's own statistics would paint
        in its brightness, which the model never predicted)."""
        pred, mask, _ = self.forward_masked(batch)
        if self.cfg.norm_pix_loss:
            var, mean = torch.var_mean(patchify(batch.views[0].float(), self.patch), dim=-1)  # (B, N) per patch
            seen = (1 - mask) / (1 - mask).sum(dim=1, keepdim=True)  # weights of the visible patches
            std_v = ((var + NORM_PIX_EPS).sqrt() * seen).sum(dim=1).view(-1, 1, 1)
            pred = pred * std_v + (mean * seen).sum(dim=1).view(-1, 1, 1)
        visible = unpatchify((1 - mask).unsqueeze(-1).expand(-1, -1, self.patch * self.patch), self.patch, self.grid)
        return Reconstruction(unpatchify(pred, self.patch, self.grid), visible)
