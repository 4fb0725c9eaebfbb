"""I-JEPA: predicting the representations of image blocks from one context block.

Assran, Duval, Misra, Bojanowski, Vincent, Rabbat, LeCun, Ballas. "Self-Supervised Learning from
Images with a Joint-Embedding Predictive Architecture." CVPR 2023 (official code:
``facebookresearch/ijepa`` at commit ``52c1ae9``: ``src/masks/multiblock.py``, ``src/train.py``,
``src/models/vision_transformer.py``, ``configs/in1k_vith14_ep300.yaml``). One view per image. Per
sample, 4 target blocks (scale 0.15-0.2 of the patches, aspect 0.75-1.5) and one large context
block (scale 0.85-1, aspect 1) with the target blocks removed from it are drawn on the patch grid.
The context encoder (the trained timm ViT) sees only the context patches; a narrow ViT predictor
takes the encoded context plus, per target block, one learned mask token with fixed sine-cosine
position embeddings at each target position, and predicts the target encoder's representation of
those patches: the layer-normed output of the EMA target encoder over the whole image. The loss
is the smooth-L1 distance (``F.smooth_l1_loss``, the official ``loss_fn``), averaged over the
target blocks. The target encoder gets no gradient; its EMA rate rises linearly 0.996 -> 1.

Masks follow the official ``MaskCollator`` (block size from one uniform for both scale and aspect,
corner from ``randint(0, side - h)``, up to 20 context positions per relaxation of the target
constraints, a context valid above ``min_keep`` patches), with two changes so that a sample's masks
are a pure function of (seed, epoch, sample) from :meth:`Batch.uniform`, the same in every process,
at any batch position and after a resume: block sizes are drawn per sample (the official code
draws them once per batch), and the context keeps all its patches (the official collator cuts every
context to the batch's smallest); samples' different counts are padded and hidden from attention.
The predictor and target encoder are thrown away after pretraining: evaluation uses the timm ViT.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from functools import partial
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sslbench.api import (
    EMBEDDING_LOG,
    AugmentConfig,
    Batch,
    Family,
    Method,
    MethodConfig,
    Recipe,
    StepInfo,
    UserError,
    ViewSpec,
    encode_patches,
    freeze_,
    register_method,
    require_vit,
    sincos_pos_embed_2d,
)

__all__ = ["IJEPA", "IJEPAConfig", "Predictor", "block_sizes", "ijepa_loss", "multiblock_masks"]

CONTEXT_TRIES = 20  # context positions tried per relaxation level (the official ``timeout = 20``)


@dataclass
class IJEPAConfig(MethodConfig):
    """I-JEPA hyper-parameters (official ``configs/in1k_vith14_ep300.yaml``)."""

    num_targets: int = 4  # target blocks per sample (official num_pred_masks: 4)
    target_scale: tuple[float, float] = (0.15, 0.2)  # target block area range, fraction of the patches (official pred_mask_scale)
    target_aspect: tuple[float, float] = (0.75, 1.5)  # target block height / width range (official aspect_ratio)
    context_scale: tuple[float, float] = (0.85, 1.0)  # context block area range, aspect 1 (official enc_mask_scale)
    min_keep: int = 10  # a context needs more patches than this after removing the targets (official min_keep: 10)
    predictor_depth: int | None = None  # predictor blocks; None: round(encoder depth x 12/32) (official ViT-H: 12 for 32 blocks)
    predictor_dim: int | None = None  # predictor width; None: encoder width x 384/1280 (official ViT-H: 384 for 1280), rounded
    # up to a multiple of 4 (sine-cosine embedding) and of the heads (the encoder's head count, as the official init_model)
    base_momentum: float = 0.996  # target EMA rate at step 0 (official ema: [0.996, 1.0])
    final_momentum: float = 1.0  # target EMA rate at the last step, reached linearly (official momentum_scheduler)

    def validate(self) -> None:
        if self.num_targets < 1 or self.min_keep < 0:
            raise UserError(f"method_cfg.num_targets must be >= 1 and min_keep >= 0, got {self.num_targets}, {self.min_keep}")
        for key in ("target_scale", "context_scale"):
            lo, hi = getattr(self, key)
            if not 0 < lo <= hi <= 1:
                raise UserError(f"method_cfg.{key} must satisfy 0 < min <= max <= 1, got {(lo, hi)}")
        if not 0 < self.target_aspect[0] <= self.target_aspect[1]:
            raise UserError(f"method_cfg.target_aspect must satisfy 0 < min <= max, got {self.target_aspect}")
        if (self.predictor_depth is not None and self.predictor_depth < 1) or (self.predictor_dim is not None and self.predictor_dim < 4):
            raise UserError("method_cfg.predictor_depth must be >= 1 and predictor_dim >= 4 (or None)")
        if not 0.0 <= self.base_momentum <= self.final_momentum <= 1.0:
            raise UserError(f"method_cfg needs 0 <= base_momentum <= final_momentum <= 1, got {self.base_momentum}, {self.final_momentum}")


def block_sizes(u: Tensor, grid: tuple[int, int], scale: tuple[float, float], aspect: tuple[float, float]) -> tuple[Tensor, Tensor]:
    """The official ``_sample_block_size`` per uniform ``u`` (any shape): area ``int(N * s)`` with one
    uniform for both the scale s and the aspect a, height ``round(sqrt(area * a))``, width
    ``round(sqrt(area / a))``, each below its grid side (and, here, at least 1). Long tensors."""
    u = u.double()
    area = torch.floor(grid[0] * grid[1] * (scale[0] + u * (scale[1] - scale[0])))
    ar = aspect[0] + u * (aspect[1] - aspect[0])
    h = torch.round(torch.sqrt(area * ar)).clamp(1, grid[0] - 1)  # round half to even, as Python's round
    w = torch.round(torch.sqrt(area / ar)).clamp(1, grid[1] - 1)
    return h.long(), w.long()


def _blocks(h: Tensor, w: Tensor, u_top: Tensor, u_left: Tensor, grid: tuple[int, int]) -> Tensor:
    """Boolean (..., H * W) masks of h x w blocks whose corner is ``randint(0, side - h)`` from the uniforms."""
    top = torch.floor(u_top.double() * (grid[0] - h)).long()
    left = torch.floor(u_left.double() * (grid[1] - w)).long()
    rows = torch.arange(grid[0], device=h.device).view(*([1] * h.dim()), -1, 1)
    cols = torch.arange(grid[1], device=h.device).view(*([1] * h.dim()), 1, -1)
    t, lft, hh, ww = (x[..., None, None] for x in (top, left, h, w))
    inside = (rows >= t) & (rows < t + hh) & (cols >= lft) & (cols < lft + ww)
    return inside.flatten(-2)


def multiblock_masks(batch: Batch, grid: tuple[int, int], cfg: IJEPAConfig) -> tuple[Tensor, Tensor]:
    """Per sample: the context (B, H * W) and the target blocks (B, K, H * W), boolean masks over the
    patch grid in row-major order, from :meth:`Batch.uniform` streams 0-2 (a pure function of
    (seed, epoch, sample)). The context is the first of ``CONTEXT_TRIES`` positions with more than
    ``min_keep`` patches outside the first ``K - level`` targets, at the lowest such level."""
    k = cfg.num_targets
    sizes = batch.uniform(0, 2)  # target size, context size
    th, tw = block_sizes(sizes[:, 0], grid, cfg.target_scale, cfg.target_aspect)
    ch, cw = block_sizes(sizes[:, 1], grid, cfg.context_scale, (1.0, 1.0))
    corners = batch.uniform(1, 2 * k).view(-1, k, 2)
    targets = _blocks(th[:, None].expand(-1, k), tw[:, None].expand(-1, k), corners[..., 0], corners[..., 1], grid)  # (B, K, N)
    levels = k + 1
    tries = batch.uniform(2, 2 * levels * CONTEXT_TRIES).view(-1, levels, CONTEXT_TRIES, 2)
    ctx = _blocks(
        ch[:, None, None].expand(-1, levels, CONTEXT_TRIES), cw[:, None, None].expand(-1, levels, CONTEXT_TRIES), tries[..., 0], tries[..., 1], grid
    )
    # Level l removes the first K - l targets (official constrain_mask with ``tries`` = l).
    first = torch.arange(k, device=targets.device)
    kept = torch.stack([~(targets & (first < k - lv).view(1, k, 1)).any(dim=1) for lv in range(levels)], dim=1)  # (B, L, N)
    ctx = ctx & kept[:, :, None, :]  # (B, L, T, N)
    ok = (ctx.sum(dim=-1) > cfg.min_keep).flatten(1)  # (B, L * T), in the official order of attempts
    ok[:, -1] = True  # the official collator would try forever; the last unconstrained attempt stands
    choice = ok.float().argmax(dim=1)  # the first valid attempt
    context = ctx.flatten(1, 2)[torch.arange(ctx.shape[0], device=ctx.device), choice]
    return context, targets


def max_block(grid: tuple[int, int], scale: tuple[float, float], aspect: tuple[float, float]) -> int:
    """An upper bound of :func:`block_sizes`' h x w over every uniform, known before any mask is
    drawn: height and width each at their largest (area and aspect at their ends), below the sides."""
    area = math.floor(grid[0] * grid[1] * (scale[0] + 1.0 * (scale[1] - scale[0])))  # block_sizes' arithmetic at u = 1
    h = min(max(round(math.sqrt(area * aspect[1])), 1), grid[0] - 1)
    w = min(max(round(math.sqrt(area / aspect[0])), 1), grid[1] - 1)
    return h * w


def _indices(mask: Tensor, length: int) -> tuple[Tensor, Tensor]:
    """(..., N) bool with at most ``length`` True entries -> their indices in order (..., length),
    padded with patches that are not in the mask, and which entries are real (..., length) bool. The
    length is a bound from the config (:func:`max_block`), not the batch's largest count: reading
    that would make the host wait for the device every step."""
    count = mask.sum(dim=-1)
    ids = torch.argsort((~mask).to(torch.uint8), dim=-1, stable=True)[..., :length]
    valid = torch.arange(length, device=mask.device) < count[..., None]
    return ids, valid


def ijepa_loss(pred: Tensor, target: Tensor, valid: Tensor) -> Tensor:
    """Smooth-L1 (beta 1) between predicted and target representations, averaged over each block's
    real patches and channels, then over blocks and samples (with equal block sizes: the official
    ``F.smooth_l1_loss(z, h)``). ``pred``, ``target``: (B, K, L, D); ``valid``: (B, K, L) bool."""
    per = F.smooth_l1_loss(pred.float(), target.float(), reduction="none").mean(dim=-1)  # (B, K, L)
    w = valid.to(per.dtype)
    return ((per * w).sum(dim=-1) / w.sum(dim=-1)).mean()


class Predictor(nn.Module):
    """The official ``VisionTransformerPredictor``: a narrow ViT over the context tokens and one mask
    token per target position, each with fixed 2D sine-cosine position embeddings."""

    pos: Tensor  # (N, dim): fixed, a non-persistent buffer

    def __init__(self, width: int, dim: int, depth: int, heads: int, grid: tuple[int, int]) -> None:
        super().__init__()
        from timm.models.vision_transformer import Block

        self.embed = nn.Linear(width, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos", sincos_pos_embed_2d(dim, grid), persistent=False)
        norm = cast("type[nn.Module]", partial(nn.LayerNorm, eps=1e-6))  # the official vit_predictor's norm_layer
        self.blocks = nn.ModuleList([Block(dim, heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=norm) for _ in range(depth)])
        self.norm = norm(dim)
        self.proj = nn.Linear(dim, width)
        for m in self.modules():  # the official _init_weights and fix_init_weight
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        with torch.no_grad():
            for i, blk in enumerate(self.blocks, start=1):
                blk.attn.proj.weight.div_(math.sqrt(2.0 * i))  # type: ignore[union-attr, operator]
                blk.mlp.fc2.weight.div_(math.sqrt(2.0 * i))  # type: ignore[union-attr, operator]

    def forward(self, ctx: Tensor, ctx_ids: Tensor, ctx_valid: Tensor, tgt_ids: Tensor, tgt_valid: Tensor) -> Tensor:
        """Context tokens (B, Lc, width) at patches ``ctx_ids`` (B, Lc), targets at ``tgt_ids`` (B, K, Lt)
        -> predictions (B, K, Lt, width); ``*_valid`` mark the real (non-padding) entries."""
        b, k, lt = tgt_ids.shape
        pos = self.pos.to(ctx.dtype)
        x = (self.embed(ctx) + pos[ctx_ids]).repeat_interleave(k, dim=0)  # (B * K, Lc, dim): one sequence per block
        m = self.mask_token.to(ctx.dtype) + pos[tgt_ids.flatten(0, 1)]  # (B * K, Lt, dim)
        x = torch.cat([x, m], dim=1)
        keys = torch.cat([ctx_valid.repeat_interleave(k, dim=0), tgt_valid.flatten(0, 1)], dim=1)[:, None, None, :]
        for blk in self.blocks:
            x = blk(x, attn_mask=keys)
        out = self.proj(self.norm(x[:, -lt:]))
        return cast(Tensor, out).view(b, k, lt, -1)


@register_method("ijepa")
class IJEPA(Method):
    """The timm ViT on the context block, a narrow predictor; smooth-L1 to the EMA encoder's target blocks."""

    Config = IJEPAConfig
    description = "Joint-embedding prediction: a ViT sees one context block and predicts an EMA encoder's features of 4 target blocks (I-JEPA)"
    paper = "Assran et al., Self-Supervised Learning from Images with a Joint-Embedding Predictive Architecture, CVPR 2023"

    def __init__(self, backbone: nn.Module, cfg: IJEPAConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or IJEPAConfig()
        self.encoder = require_vit(backbone, "ijepa")
        embed = cast(nn.Module, backbone.patch_embed)
        self.grid = (int(embed.grid_size[0]), int(embed.grid_size[1]))  # type: ignore[index]
        if min(self.grid) < 2:
            raise UserError(f"ijepa needs a patch grid of at least 2 x 2, got {self.grid}; use a larger --image-size or smaller patches")
        self.num_prefix = int(backbone.num_prefix_tokens)  # type: ignore[arg-type]
        # Static lengths the context and target indices are padded to (no host sync per step).
        self.context_len = max_block(self.grid, cfg.context_scale, (1.0, 1.0))
        self.target_len = max_block(self.grid, cfg.target_scale, cfg.target_aspect)
        width, heads = int(backbone.embed_dim), int(backbone.blocks[0].attn.num_heads)  # type: ignore[arg-type, index, union-attr]
        depth = cfg.predictor_depth or max(1, round(len(backbone.blocks) * 12 / 32))  # type: ignore[arg-type]
        step = 4 * heads // math.gcd(4, heads)
        dim = cfg.predictor_dim or step * math.ceil(width * 384 / 1280 / step)
        if dim % 4 or dim % heads:
            raise UserError(f"method_cfg.predictor_dim {dim} must be a multiple of 4 and of the encoder's {heads} heads")
        self.predictor = Predictor(width, dim, depth, heads, self.grid)
        self.target_encoder = freeze_(copy.deepcopy(self.encoder))

    @classmethod
    def recipe(cls, image_size: int, family: Family) -> Recipe:
        """AdamW, lr 1e-3 at batch 2048 (1.25e-4 x B/256), weight decay 0.04 cosine-raised to 0.4,
        torch's betas (official config and ``init_opt``); random resized crops with scale (0.3, 1)
        and nothing else: no flip, no colour, no blur (official ``data``: all off)."""
        aug = {"crop_scale": (0.3, 1.0), "flip_p": 0.0, "jitter_p": 0.0, "grayscale_p": 0.0, "blur_p": 0.0, "solarize_p": 0.0}
        return Recipe(optimizer="adamw", lr=1.25e-4, lr_scaling="linear", weight_decay=0.04, weight_decay_end=0.4, betas=(0.9, 0.999), aug=aug)

    def views(self, base: AugmentConfig, image_size: int) -> list[ViewSpec]:
        """One view per image."""
        return [ViewSpec(base, image_size)]

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.encoder, self.target_encoder)]

    def momentum_at(self, info: StepInfo) -> float:
        """Linear from base to final momentum over the run (the official ``momentum_scheduler``)."""
        return self.cfg.base_momentum + (self.cfg.final_momentum - self.cfg.base_momentum) * info.progress

    def forward_masked(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The first view (B, 3, S, S) -> predictions and targets (B, K, Lt, D), which target entries
        are real (B, K, Lt) and the context encoder's mean patch token (B, D)."""
        images = batch.views[0]
        context, targets = multiblock_masks(batch, self.grid, self.cfg)
        ctx_ids, ctx_valid = _indices(context, self.context_len)
        tgt_ids, tgt_valid = _indices(targets, self.target_len)
        with torch.no_grad():
            h = encode_patches(self.target_encoder, images)[:, self.num_prefix :]
            h = F.layer_norm(h.float(), (h.shape[-1],))  # (B, N, D), the official forward_target
            flat = tgt_ids.flatten(1)
            target = torch.gather(h, 1, flat.unsqueeze(-1).expand(-1, -1, h.shape[-1])).view(*tgt_ids.shape, -1)
        z = encode_patches(self.encoder, images, ids=ctx_ids, valid=ctx_valid)[:, self.num_prefix :]
        pred = self.predictor(z, ctx_ids, ctx_valid, tgt_ids, tgt_valid)
        w = ctx_valid.unsqueeze(-1).to(z.dtype)
        return pred, target, tgt_valid, ((z * w).sum(dim=1) / w.sum(dim=1)).detach().float()

    def training_step(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss, and as the health embedding the mean of the context encoder's patch tokens."""
        pred, target, valid, emb = self.forward_masked(batch)
        loss = ijepa_loss(pred, target, valid)
        return loss, {"loss": loss.detach(), EMBEDDING_LOG: emb}
