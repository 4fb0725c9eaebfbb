"""The one module a plugin imports: everything a method, an evaluation protocol, a data source, a
sub-command or a training callback needs from sslbench, typed and documented where it is defined.

A method plugin::

    from sslbench.api import Batch, Method, MethodConfig, NTXentLoss, encode_views, mlp, register_method

sslbench's own methods (``sslbench.methods``) and evaluators (``sslbench.evals``) import sslbench
through this module only (``tests/test_architecture.py`` checks it), so what they use is what a
third-party plugin gets. Names are added here, not removed or changed: a plugin written against
one release keeps importing. See docs/write-your-own-method.md.

What is here, by use:

- bad input: ``UserError`` (one line on stderr, exit code 2: name the key, the cause and the fix);
- the method contract: ``Method``, ``MethodConfig``, ``Batch``, ``StepInfo``, ``ViewSpec``,
  ``Recipe``, ``Family``/``FAMILIES``, ``Reconstruction``, ``asymmetric``, ``cosine_schedule`` and
  the log keys ``EMBEDDING_LOG``/``ENTROPY_FRAC_LOG`` of the collapse check; ``cosine_between``,
  the one cosine schedule;
- registration, one registry per kind of extension, each with its entry-point group:
  ``register_method``, ``register_protocol``, ``register_data_source`` (``DataSource``),
  ``register_command``, ``register_callback`` (``Callback``, ``Control``); ``get_method``,
  ``unknown_name_message``;
- shared parts of methods: heads (``mlp``, ``expander``, ``Prototypes``, ``encode_views``, ...),
  losses, the DINO head and multi-crop views (``DINOHead``, ``multicrop_views``), ``MemoryBank``,
  momentum helpers (``ema_update_``, ``copy_params_``, ``freeze_``, the momentum schedules); the
  masked-image parts (``patchify``/``unpatchify``, ``random_masking``, ``sincos_pos_embed_2d``,
  ``require_vit``, ``visible_tokens``, ``encode_patches``: a timm ViT on a subset of its patches or
  with masked patches replaced by a mask token) and iBOT's blockwise masks (``block_mask``,
  ``block_masks``, ``mask_weights``);
- collectives: ``gather_no_grad``/``all_reduce_sum``/``all_reduce_mean`` (no gradient) and
  ``gather_with_grad``/``all_reduce_sum_with_grad`` (gradients flow back to every process);
  ``get_rank``, ``get_world_size``, ``is_distributed``. With one process each is the identity;
- collapse figures: ``effective_rank``, ``normalised_std``, ``RANK_EPS``;
- evaluation protocols: ``EvalContext``, ``EvalOptions``, ``Option``, ``Score``, the option checks
  and ``check_fraction``; frozen features: ``extract_features``, ``split_features``, ``eval_mode``,
  ``autocast``, ``module_device``, the last blocks or stages (``intermediate_layers``,
  ``Intermediates``), the projector depths (``parse_depth``, ``depth_head``,
  ``load_projector``, ``apply_head``, ...);
- data and augmentation: ``ImageSplit``, ``FileSplit``, ``load_split``, ``balanced_subset``,
  ``store_size``, ``fit_image``, ``AugmentConfig``, ``BatchAugment``, ``eval_batch``;
  ``parse_data_spec`` (a data spec checked without loading it), ``counter_uniform`` (counter-based
  randomness of (seed, epoch, sample, stream)), ``gaussian_blur_batch`` (per-sample Gaussian blur);
- runs, encoders and optimisation, for evaluators: ``RunDir``, ``ENCODER``, ``write_atomic``,
  ``TrainConfig``, ``load_run_config``, ``build_method``, ``create_backbone``,
  ``load_state_strict``, ``is_vision_transformer[_backbone]``, ``build_optimizer``,
  ``param_groups``, ``is_no_decay``, ``lr_at``, ``set_lr``.
"""

from __future__ import annotations

from sslbench.backbones import create_backbone, is_vision_transformer, is_vision_transformer_backbone, load_state_strict
from sslbench.config import TrainConfig, load_run_config
from sslbench.config.build import build_method
from sslbench.core.augment import AugmentConfig, BatchAugment, eval_batch
from sslbench.core.augment import counter_uniform as counter_uniform
from sslbench.core.augment_kernels import _gaussian_blur as gaussian_blur_batch
from sslbench.core.dist import (
    all_reduce_mean,
    all_reduce_sum,
    all_reduce_sum_with_grad,
    gather_no_grad,
    gather_with_grad,
    get_rank,
    get_world_size,
    is_distributed,
)
from sslbench.core.errors import UserError
from sslbench.core.heads import (
    DINOHead,
    Prototypes,
    WeightNormLinear,
    check_local_crops,
    encode_views,
    expander,
    feature_dim,
    fit_to_patches,
    local_crop_size,
    mlp,
    multicrop_views,
    patch_side,
)
from sslbench.core.health import RANK_EPS, effective_rank, normalised_std
from sslbench.core.losses import (
    BarlowTwinsLoss,
    BYOLLoss,
    DCLLoss,
    DINOLoss,
    InfoNCELoss,
    MoCoV3Loss,
    NNCLRLoss,
    NTXentLoss,
    SimSiamLoss,
    SwAVLoss,
    VICRegLoss,
    byol_loss,
    koleo_loss,
    masked_patch_cross_entropy,
    multicrop_cross_entropy,
    negative_cosine,
    off_diagonal,
    sinkhorn_knopp,
)
from sslbench.core.masked_image import encode_patches, patchify, random_masking, require_vit, sincos_pos_embed_2d, unpatchify, visible_tokens
from sslbench.core.masking import BLOCK_DRAWS, block_draws, block_mask, block_masks, mask_weights, patch_grid
from sslbench.core.memory import MemoryBank
from sslbench.core.method import (
    EMBEDDING_LOG,
    ENTROPY_FRAC_LOG,
    FAMILIES,
    Batch,
    Family,
    Method,
    MethodConfig,
    Recipe,
    Reconstruction,
    StepInfo,
    ViewSpec,
    asymmetric,
    cosine_schedule,
    linear_warmup,
)
from sslbench.core.momentum import constant_momentum, copy_params_, cosine_momentum, ema_update_, freeze_
from sslbench.core.optim import build_optimizer, is_no_decay, lr_at, param_groups, set_lr
from sslbench.core.registry import get_method, register_command, register_method, unknown_name_message
from sslbench.core.rundir import ENCODER, RunDir, write_atomic
from sslbench.core.schedules import cosine_between
from sslbench.data import DataSource, FileSplit, ImageSplit, balanced_subset, load_split, register_data_source, store_size
from sslbench.data import _fit as fit_image
from sslbench.data import parse_spec as parse_data_spec
from sslbench.evaluation.features import (
    Intermediates,
    LayerTokens,
    Transform,
    apply_head,
    autocast,
    depth_head,
    eval_mode,
    extract_features,
    hidden_layer_ends,
    intermediate_layers,
    load_projector,
    module_device,
    parse_depth,
    projector_depths,
    split_features,
)
from sslbench.evaluation.protocols import EvalContext, EvalOptions, Option, Score, at_least, check_fraction, positive, register_protocol, within
from sslbench.train.callbacks import Callback, Control, register_callback

__all__ = [
    "Intermediates",
    "LayerTokens",
    "intermediate_layers",
    "counter_uniform",
    "gaussian_blur_batch",
    "parse_data_spec",
    "BLOCK_DRAWS",
    "DINOHead",
    "WeightNormLinear",
    "block_draws",
    "block_mask",
    "block_masks",
    "koleo_loss",
    "linear_warmup",
    "local_crop_size",
    "mask_weights",
    "masked_patch_cross_entropy",
    "multicrop_cross_entropy",
    "multicrop_views",
    "patch_grid",
    "check_fraction",
    "split_features",
    "projector_depths",
    "parse_depth",
    "module_device",
    "load_projector",
    "hidden_layer_ends",
    "extract_features",
    "eval_mode",
    "depth_head",
    "autocast",
    "apply_head",
    "Transform",
    "EMBEDDING_LOG",
    "ENCODER",
    "ENTROPY_FRAC_LOG",
    "FAMILIES",
    "RANK_EPS",
    "AugmentConfig",
    "BYOLLoss",
    "BarlowTwinsLoss",
    "DCLLoss",
    "Batch",
    "BatchAugment",
    "Callback",
    "Control",
    "DINOLoss",
    "DataSource",
    "EvalContext",
    "EvalOptions",
    "Family",
    "FileSplit",
    "ImageSplit",
    "InfoNCELoss",
    "MemoryBank",
    "Method",
    "MethodConfig",
    "MoCoV3Loss",
    "NNCLRLoss",
    "NTXentLoss",
    "Option",
    "Prototypes",
    "Recipe",
    "Reconstruction",
    "RunDir",
    "Score",
    "SimSiamLoss",
    "StepInfo",
    "SwAVLoss",
    "TrainConfig",
    "UserError",
    "VICRegLoss",
    "ViewSpec",
    "all_reduce_mean",
    "all_reduce_sum",
    "all_reduce_sum_with_grad",
    "asymmetric",
    "at_least",
    "balanced_subset",
    "build_method",
    "build_optimizer",
    "byol_loss",
    "check_local_crops",
    "constant_momentum",
    "copy_params_",
    "cosine_between",
    "cosine_momentum",
    "cosine_schedule",
    "create_backbone",
    "effective_rank",
    "ema_update_",
    "encode_views",
    "eval_batch",
    "expander",
    "feature_dim",
    "fit_image",
    "fit_to_patches",
    "freeze_",
    "gather_no_grad",
    "gather_with_grad",
    "get_method",
    "get_rank",
    "get_world_size",
    "is_distributed",
    "is_no_decay",
    "is_vision_transformer",
    "is_vision_transformer_backbone",
    "load_run_config",
    "load_split",
    "load_state_strict",
    "lr_at",
    "mlp",
    "negative_cosine",
    "normalised_std",
    "off_diagonal",
    "param_groups",
    "patch_side",
    "positive",
    "register_callback",
    "register_command",
    "register_data_source",
    "register_method",
    "register_protocol",
    "set_lr",
    "sinkhorn_knopp",
    "store_size",
    "unknown_name_message",
    "within",
    "write_atomic",
    "encode_patches",
    "patchify",
    "random_masking",
    "require_vit",
    "sincos_pos_embed_2d",
    "unpatchify",
    "visible_tokens",
]
