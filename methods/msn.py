"""MSN: masked siamese networks on timm vision transformers, with PMSN's power-law prior as an option.

Assran, Caron, Misra, Bojanowski, Bordes, Vincent, Joulin, Rabbat, Ballas. "Masked Siamese Networks
for Label-Efficient Learning." ECCV 2022 (official code: ``facebookresearch/msn`` at commit
4388dc1, ``src/msn_train.py``, ``src/losses.py``, ``src/deit.py``, ``src/data_manager.py``,
``configs/pretrain/msn_vits16.yaml``). Per image, a target view goes unmasked through the EMA
target encoder (ViT + projector); the anchor views go through the student: one view of the same
size with a random share ``mask_ratio`` of its patch tokens dropped (only the kept tokens go through
the blocks) and ``focal_views`` small crops, unmasked (the official ``forward`` drops patches only in
its first size group). The [CLS] projections and K learned prototypes are L2-normalised;
``p = softmax(z . q / tau)``; the anchors' p learns the target's sharpened (and Sinkhorn-balanced)
p by cross-entropy, plus the mean-entropy-maximisation regulariser (me-max) on the anchors' mean p.

PMSN (Assran, Balestriero, Duval, Bordes, Misra, Bojanowski, Vincent, Rabbat, Ballas. "The Hidden
Uniform Cluster Prior in Self-Supervised Learning." ICLR 2023) replaces me-max, ``KL(mean p || U)``,
by ``KL(P || mean p)`` to a power-law prior ``P_k ~ k^-tau`` (lightly's ``PMSNLoss``, commit e8d317f):
``--set prior=power_law``. A flag, not a second method: the regulariser is the only difference, the
run's config records it, and the registry-wide tests need not train the same network twice.

Where sslbench differs from the official code: the mask is drawn per sample from ``Batch.uniform``
(official: one ``randperm`` per batch, shared by its samples), so it is a pure function of (seed,
epoch, sample); DDP averages the prototypes' gradients over processes as every other gradient, so
N processes train as one (official: summed with ``AllReduceSum``, W times the average); the
gradient-norm clip covers the prototypes too; the sharpening temperature is constant (the official
config's ``start_sharpen`` = ``final_sharpen`` = 0.25).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sslbench.api import (
    EMBEDDING_LOG,
    ENTROPY_FRAC_LOG,
    AugmentConfig,
    Batch,
    Family,
    Method,
    MethodConfig,
    Prototypes,
    Recipe,
    StepInfo,
    UserError,
    ViewSpec,
    all_reduce_sum,
    all_reduce_sum_with_grad,
    check_local_crops,
    encode_views,
    feature_dim,
    fit_to_patches,
    freeze_,
    mlp,
    patch_side,
    random_masking,
    register_method,
    require_vit,
    sinkhorn_knopp,
    visible_tokens,
)

__all__ = ["MSN", "MSNConfig", "MSNLoss", "power_law_prior"]

SCHEDULE_STRETCH = 1.25  # the official momentum (and lr, wd) schedules span 1.25 x the training steps


@dataclass
class MSNConfig(MethodConfig):
    """MSN hyper-parameters; defaults: the official ``configs/pretrain/msn_vits16.yaml`` (ViT-S/16)."""

    mask_ratio: float = 0.15  # share of the anchor view's patches dropped (official data.patch_drop, ViT-S/16: 0.15)
    focal_views: int = 10  # focal (small) anchor crops (official data.focal_views: 10)
    focal_size: int | None = None  # px; None: 96/224 of the image size (official focal_size 96 at rand_size 224), to whole patches
    focal_crop_scale: tuple[float, float] = (0.05, 0.3)  # focal crop area range (official make_transforms)
    num_prototypes: int = 1024  # K learned prototypes (official criterion.num_proto: 1024)
    hidden_dim: int = 2048  # projector hidden width (official meta.hidden_dim: 2048)
    output_dim: int = 256  # projector output width, the prototypes' dimension (official meta.output_dim: 256)
    use_bn: bool = True  # BatchNorm in the projector (official meta.use_bn: true)
    temperature: float = 0.1  # tau of the anchor and target softmax (official criterion.temperature: 0.1)
    sharpen: float = 0.25  # T: targets p^(1/T), renormalised (official start_sharpen = final_sharpen: 0.25)
    use_sinkhorn: bool = True  # Sinkhorn-balanced targets over the global batch (official criterion.use_sinkhorn: true)
    sinkhorn_iterations: int = 3  # (official distributed_sinkhorn num_itr: 3)
    memax_weight: float = 1.0  # lambda of the prior regulariser (official criterion.memax_weight: 1.0)
    ent_weight: float = 0.0  # weight of the anchors' mean per-sample entropy (official criterion.ent_weight: 0.0)
    prior: str = "uniform"  # "uniform": MSN's me-max; "power_law": PMSN's KL to a power law
    power_law_exponent: float = 0.25  # PMSN's tau: P_k ~ k^-tau (lightly PMSNLoss default: 0.25)
    base_momentum: float = 0.996  # target EMA rate at step 0 (official _start_m: 0.996)
    final_momentum: float = 1.0  # reached linearly at 1.25 x the last step (official _final_m: 1.0)

    def validate(self) -> None:
        checks = {
            "mask_ratio must be in [0, 1)": 0.0 <= self.mask_ratio < 1.0,
            "focal_views and sinkhorn_iterations must be >= 0": min(self.focal_views, self.sinkhorn_iterations) >= 0,
            "focal_size must be >= 1 px (or None)": self.focal_size is None or self.focal_size >= 1,
            "focal_crop_scale must satisfy 0 < min <= max <= 1": 0 < self.focal_crop_scale[0] <= self.focal_crop_scale[1] <= 1,
            "num_prototypes, hidden_dim and output_dim must be >= 1": min(self.num_prototypes, self.hidden_dim, self.output_dim) >= 1,
            "temperature and sharpen must be > 0": min(self.temperature, self.sharpen) > 0,
            "memax_weight, ent_weight and power_law_exponent must be >= 0": min(self.memax_weight, self.ent_weight, self.power_law_exponent) >= 0,
            "base_momentum and final_momentum need 0 <= base <= final <= 1": 0.0 <= self.base_momentum <= self.final_momentum <= 1.0,
        }
        for what, ok in checks.items():
            if not ok:
                raise UserError(f"method_cfg.{what}")
        if self.prior not in ("uniform", "power_law"):
            raise UserError(f"method_cfg.prior must be 'uniform' (MSN) or 'power_law' (PMSN), got {self.prior!r}")


def power_law_prior(k: int, exponent: float) -> Tensor:
    """(K,) float64: ``P_j = j^-exponent / sum_i i^-exponent`` for j = 1..K (lightly's ``_power_law_distribution``)."""
    p = torch.arange(1, k + 1, dtype=torch.float64) ** -exponent
    return p / p.sum()


class MSNLoss(nn.Module):
    """MSN's loss (Assran et al. 2022, Eq. 4; official ``init_msn_loss``), PMSN's with ``prior="power_law"``.

    ``p_a = softmax(a . q / tau)`` per anchor and, without gradient, the target's sharpened
    ``p_t = p^(1/T) / sum p^(1/T)``, i.e. ``softmax(t . q / (tau T))``, optionally balanced by
    Sinkhorn-Knopp over the global batch (official ``distributed_sinkhorn`` on p_t; here
    :func:`sslbench.api.sinkhorn_knopp` on ``log p_t`` with epsilon 1, the same iteration). Then

    ``L = mean_anchors H(p_t, p_a) + lambda R(pbar) + ent_weight mean_anchors H(p_a)``

    with ``pbar`` the mean of p_a over the anchors of every process and ``R(pbar) = log K - H(pbar)``
    (me-max, ``KL(pbar || U)``) or ``sum_k P_k log(P_k / pbar_k)`` (PMSN). Computed in float32 (float64
    inputs in float64; the Sinkhorn step is float32).

    Shapes: ``anchors`` (V * B, d), view-major (rows v * B .. v * B + B - 1 are view v);
    ``targets`` (B, d); ``prototypes`` (K, d). Returns the scalar loss, the targets p_t (B, K)
    and the parts ``{"ce", "reg"}`` (detached).
    """

    def __init__(self, cfg: MSNConfig) -> None:
        super().__init__()
        self.cfg = cfg

    def forward(self, anchors: Tensor, targets: Tensor, prototypes: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        cfg = self.cfg
        with torch.autocast(anchors.device.type, enabled=False):
            dtype = torch.promote_types(anchors.dtype, torch.float32)  # float32 under bf16; float64 stays
            q = F.normalize(prototypes.to(dtype), dim=1)
            log_p = F.log_softmax(F.normalize(anchors.to(dtype), dim=1) @ q.T / cfg.temperature, dim=1)
            with torch.no_grad():
                log_t = F.log_softmax(F.normalize(targets.to(dtype), dim=1) @ q.T / (cfg.temperature * cfg.sharpen), dim=1)
                p_t = sinkhorn_knopp(log_t, 1.0, cfg.sinkhorn_iterations).to(dtype) if cfg.use_sinkhorn else log_t.exp()
            views = anchors.shape[0] // targets.shape[0]
            ce = -(p_t.repeat(views, 1) * log_p).sum(dim=1).mean()
            p = log_p.exp()
            count = all_reduce_sum(torch.full((), float(p.shape[0]), device=p.device))
            mean_p = all_reduce_sum_with_grad(p.sum(dim=0)) / count  # (K,) over every process's anchors
            if cfg.prior == "uniform":
                reg = (mean_p * mean_p.log()).sum() + math.log(mean_p.shape[0])
            else:
                prior = power_law_prior(mean_p.shape[0], cfg.power_law_exponent).to(mean_p)
                reg = (prior * (prior.log() - mean_p.log())).sum()
            loss = ce + cfg.memax_weight * reg
            if cfg.ent_weight > 0:
                loss = loss - cfg.ent_weight * (p * log_p).sum(dim=1).mean()
        return loss, p_t, {"ce": ce.detach(), "reg": reg.detach()}


@register_method("msn")
class MSN(Method):
    """Student: ViT + projector on a masked view and focal crops; target: EMA copy on an unmasked view; learned prototypes."""

    Config = MSNConfig
    description = "Masked siamese networks: masked and focal anchor views match an EMA target's prototype assignment (MSN; PMSN prior)"
    paper = "Assran et al., Masked Siamese Networks for Label-Efficient Learning, ECCV 2022"
    min_batch_size = 2  # the projector's BatchNorm needs more than one sample

    def __init__(self, backbone: nn.Module, cfg: MSNConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or MSNConfig()
        self.encoder = require_vit(backbone, "msn")
        # The official projector (msn_train.init_model): Linear-BN-GELU-Linear-BN-GELU-Linear,
        # truncated-normal (std 0.02) weights and zero biases.
        self.head = mlp(feature_dim(backbone), cfg.hidden_dim, cfg.output_dim, 3, hidden_bn=cfg.use_bn, act=nn.GELU)
        for m in self.head.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self.prototypes = Prototypes(cfg.output_dim, cfg.num_prototypes)  # U(-1/sqrt(d), 1/sqrt(d)), as the official init
        self.target_encoder = freeze_(copy.deepcopy(self.encoder))
        self.target_head = freeze_(copy.deepcopy(self.head))
        self.criterion = MSNLoss(cfg)

    @classmethod
    def recipe(cls, image_size: int, family: Family) -> Recipe:
        """The official ViT-S/16 recipe (``msn_vits16.yaml``): AdamW, lr 1e-3 at batch 1024
        (64 x 16 GPUs; here 2.5e-4 x B/256), weight decay 0.04 -> 0.4 (cosine), gradient clip 3;
        random crops of scale 0.3-1 (``make_transforms``), colour jitter at strength 0.5, blur p 0.5,
        no solarisation. At every size and family (a convnet is refused by the constructor)."""
        aug = {"crop_scale": (0.3, 1.0), "jitter_strength": 0.5, "blur_p": 0.5, "solarize_p": 0.0}
        return Recipe(optimizer="adamw", lr=2.5e-4, weight_decay=0.04, weight_decay_end=0.4, grad_clip=3.0, aug=aug)

    def views(self, base: AugmentConfig, image_size: int) -> list[ViewSpec]:
        """The target view, the anchor view to mask (both ``base`` at ``image_size``, the official
        ``rand_transform``) and ``focal_views`` focal crops (scale ``focal_crop_scale``)."""
        given = self.cfg.focal_size is not None
        size = fit_to_patches(self.cfg.focal_size or max(1, round(image_size * 96 / 224)), self.encoder, given, "method_cfg.focal_size")
        check_local_crops(size, image_size, self.cfg.focal_views, "method_cfg.focal_size", "method_cfg.focal_views")
        focal = ViewSpec(replace(base, crop_scale=self.cfg.focal_crop_scale), size)
        return [ViewSpec(base, image_size), ViewSpec(base, image_size), *[focal] * self.cfg.focal_views]

    def param_groups(self, groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The prototypes get no weight decay (official ``init_opt``: ``WD_exclude``)."""
        protos = self.prototypes.weight
        out = [{**g, "params": [p for p in g["params"] if p is not protos]} for g in groups]
        return [g for g in out if g["params"]] + [{"params": [protos], "weight_decay": 0.0, "lars_exclude": True, "fixed_weight_decay": True}]

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.encoder, self.target_encoder), (self.head, self.target_head)]

    def momentum_at(self, info: StepInfo) -> float:
        """Linear from ``base_momentum`` at step 0 toward ``final_momentum`` at 1.25 x the last step (official)."""
        frac = info.progress if info.time_based else info.step / max(1, info.total_steps)
        return self.cfg.base_momentum + (self.cfg.final_momentum - self.cfg.base_momentum) * frac / SCHEDULE_STRETCH

    def masked_features(self, images: Tensor, ids_keep: Tensor) -> Tensor:
        """(B, 3, S, S), (B, keep) -> (B, D): timm's forward (norm_pre, blocks, norm, pooling: the
        [CLS] token) on the prefix tokens and the kept patches only."""
        vit = self.encoder
        x = vit.norm(vit.blocks(vit.norm_pre(visible_tokens(vit, images, ids_keep))))  # type: ignore[operator]
        return vit.forward_head(x, pre_logits=True)  # type: ignore[operator,no-any-return]

    def keep_ids(self, batch: Batch, images: Tensor) -> Tensor:
        """(B, keep): the kept patches of each sample, ``floor(N (1 - mask_ratio))`` of N (official
        ``T_H``), from the sample's own noise (stream 0 of :meth:`Batch.uniform`)."""
        n = (images.shape[-2] // patch_side(self.encoder)) * (images.shape[-1] // patch_side(self.encoder))
        keep = math.floor(n * (1 - self.cfg.mask_ratio))
        if keep < 1:
            raise UserError(f"method_cfg.mask_ratio {self.cfg.mask_ratio} keeps none of the {n} patches; lower it")
        return random_masking(batch.uniform(0, n), keep)[0]

    def training_step(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        """Views: target, anchor (B, 3, S, S) and focal crops (B, 3, s, s); each group of the
        student has its own pass (the official BatchNorm groups: the masked view, the focal crops)."""
        target, anchor, focal = batch.views[0], batch.views[1], batch.views[2:]
        with torch.no_grad():
            t = self.target_head(self.target_encoder(target))
        z = [self.head(self.masked_features(anchor, self.keep_ids(batch, anchor)))]
        if focal:
            z.append(self.head(torch.cat(encode_views(self.encoder, focal))))
        loss, p_t, parts = self.criterion(torch.cat(z), t, self.prototypes.weight)
        entropy = -(p_t * p_t.clamp_min(1e-12).log()).sum(dim=1).mean()  # mean per-sample H(p_t), nats
        frac = entropy / math.log(self.cfg.num_prototypes) if self.cfg.num_prototypes > 1 else torch.ones_like(entropy)
        logs = {"loss": loss.detach(), **parts, "target_entropy": entropy, ENTROPY_FRAC_LOG: frac, EMBEDDING_LOG: z[0].detach()}
        return loss, logs
