"""Backbones: any timm model by name, adapted to small images, and rebuilt from run directories.

``create_backbone("resnet18", image_size=32, channels=(16, 32, 64, 128))`` calls
``timm.create_model(name, num_classes=0, **kwargs)``; the feature size is ``model.num_features``.
There is no hand-kept table of backbones: every timm architecture name works.

Small images (``image_size <= 64``):

* ResNet-family models (timm's ``ResNet`` class: resnet*, resnext*, seresnet*, wide_resnet*, ...)
  get the CIFAR stem of the SimCLR paper's CIFAR experiments: a 3x3 stride-1 first convolution and
  no max-pool (for deep stems, the first convolution's stride becomes 1).
* Vision transformers (models with a ``patch_embed``) are built with ``img_size=image_size`` and a
  patch size of ``image_size // 8`` (4 px patches at 32 px), unless given explicitly.

At every size, vision transformers whose timm class takes ``dynamic_img_size`` (VisionTransformer,
DeiT, Eva, Swin, ...) are built with it on (unless given explicitly): their position embeddings are
interpolated (bicubic) to the grid of each input, so one model encodes multi-crop views of several
sizes (DINO's local crops); at the model's own size the output is unchanged.

The CIFAR stem is also a timm architecture, ``sslbench_cifar_resnet`` (see
:mod:`sslbench.backbones.small_stem`), registered in timm when this package is imported:
:func:`timm_architecture` names what ``timm.create_model`` needs to rebuild any backbone, which is
what ``sslbench export`` writes into a timm ``config.json``.
"""

from __future__ import annotations

import functools
import inspect
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from sslbench.backbones.small_stem import ARCHITECTURE as SMALL_STEM_ARCHITECTURE
from sslbench.backbones.small_stem import cifar_stem_ as _cifar_stem_
from sslbench.core.errors import UserError
from sslbench.core.method import Family
from sslbench.core.registry import unknown_name_message
from sslbench.core.rundir import ENCODER, write_atomic

SMALL_IMAGE_MAX = 64  # images of this size or less get the small-image adaptations


def _check_name(name: str) -> None:
    if not timm.is_model(name):
        raise UserError(unknown_name_message("backbone", name, timm.list_models()) + " (see `sslbench list backbones`)")


def create_backbone(name: str, image_size: int = 224, **kwargs: Any) -> nn.Module:
    """A timm model with no classifier head (``num_classes=0``), adapted to ``image_size``.

    Extra ``kwargs`` go to ``timm.create_model`` (e.g. ``channels=(16, 32, 64, 128)`` for a narrow
    ResNet-18, ``drop_path_rate=0.1``). Unknown names raise a :class:`UserError` with close matches.
    """
    model, _ = _create(name, image_size, kwargs)
    if image_size <= SMALL_IMAGE_MAX:
        _cifar_stem_(model)
    if not hasattr(model, "num_features"):
        raise UserError(f"backbone {name!r} has no num_features; sslbench needs a timm feature model")
    return model


def _create(name: str, image_size: int, kwargs: dict[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
    """The timm model of :func:`create_backbone` before the CIFAR stem, and the keyword arguments
    ``timm.create_model(name, ...)`` finally built it with (vision transformers are rebuilt for
    ``image_size``)."""
    _check_name(name)
    given = sorted(k for k in kwargs if k not in ("pretrained", "num_classes"))  # pretrained is sslbench's own default
    kwargs = dict(kwargs)
    kwargs.pop("num_classes", None)
    kwargs.setdefault("pretrained", False)
    try:
        with _weights_access(name, bool(kwargs["pretrained"])):
            model = timm.create_model(name, num_classes=0, **kwargs)
            if is_vision_transformer(model):
                vit_kwargs: dict[str, Any] = {}
                if image_size != getattr(model.patch_embed, "img_size", (image_size,))[0]:
                    vit_kwargs["img_size"] = image_size
                    if image_size <= SMALL_IMAGE_MAX:
                        vit_kwargs["patch_size"] = max(1, image_size // 8)
                if "dynamic_img_size" in inspect.signature(type(model).__init__).parameters:
                    vit_kwargs["dynamic_img_size"] = True  # position embeddings interpolated to each input's grid
                if vit_kwargs:
                    kwargs = {**vit_kwargs, **kwargs}  # what the model is built with (recorded for the export)
                    model = timm.create_model(name, num_classes=0, **kwargs)
    except (TypeError, ValueError) as exc:
        words = {k: v for k, v in kwargs.items() if k in given and _holds_words(v)}
        if words:  # the usual cause: text where timm expects numbers (channels=a,b)
            key, value = next(iter(words.items()))
            shown = ",".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)
            raise UserError(
                f"backbone {name!r} rejected backbone_kwargs.{key}={shown}: its value is text, not numbers ({type(exc).__name__}: "
                f"{' '.join(str(exc).split())[:80]}); give numbers, e.g. --set backbone_kwargs.channels=16,32,64,128"
            ) from exc
        raise UserError(
            f"backbone {name!r} rejected backbone_kwargs {given} ({' '.join(str(exc).split())[:160]}); check their names and values"
        ) from exc
    return model, {**kwargs, "num_classes": 0}


def _holds_words(value: Any) -> bool:
    """Whether a backbone_kwargs value is a list holding text (``channels=a,b``)."""
    items = value if isinstance(value, (tuple, list)) else (value,)
    return isinstance(value, (tuple, list)) and any(isinstance(v, str) for v in items)


def is_vision_transformer(model: nn.Module) -> bool:
    """Whether ``model`` is a vision transformer: a timm model with a ``patch_embed`` (ViT, DeiT,
    Eva, BEiT, Swin, ...). These are built for the image size (:func:`create_backbone`) and
    fine-tuned with AdamW (:mod:`sslbench.evals.finetune`)."""
    return hasattr(model, "patch_embed")


def is_vision_transformer_backbone(name: str, image_size: int = 224, kwargs: dict[str, Any] | None = None) -> bool:
    """Whether ``create_backbone(name, image_size, **kwargs)`` is a vision transformer
    (:func:`is_vision_transformer`), told by building it on the meta device: no
    weights are allocated or downloaded. Cached per arguments."""
    return _is_vit(name, image_size, json.dumps(kwargs or {}, sort_keys=True, default=str))


def backbone_family(name: str, image_size: int = 224, kwargs: dict[str, Any] | None = None) -> Family:
    """The :data:`~sslbench.core.method.Family` of ``create_backbone(name, image_size, **kwargs)``, which
    picks a method's recipe: "vit" for a vision transformer (:func:`is_vision_transformer`), else
    "convnet". Told on the meta device, as :func:`is_vision_transformer_backbone`."""
    return "vit" if is_vision_transformer_backbone(name, image_size, kwargs) else "convnet"


@functools.lru_cache(maxsize=64)
def _is_vit(name: str, image_size: int, kwargs_json: str) -> bool:
    kwargs = {**json.loads(kwargs_json), "pretrained": False}
    with torch.device("meta"):
        model, _ = _create(name, image_size, kwargs)
    return is_vision_transformer(model)


def timm_architecture(name: str, image_size: int = 224, **kwargs: Any) -> tuple[str, dict[str, Any]]:
    """``(architecture, model_args)`` such that ``timm.create_model(architecture, **model_args)``
    builds the same network as ``create_backbone(name, image_size, **kwargs)`` (same modules and
    state-dict keys): ``name`` and the final keyword arguments, or for a small-image ResNet
    :data:`SMALL_STEM_ARCHITECTURE` with ``base=name``. ``pretrained`` is left out."""
    model, model_args = _create(name, image_size, kwargs)
    model_args.pop("pretrained", None)
    if image_size <= SMALL_IMAGE_MAX and _cifar_stem_(model):
        return SMALL_STEM_ARCHITECTURE, {"base": name, **model_args}
    return name, model_args


@contextmanager
def _weights_access(name: str, pretrained: bool) -> Iterator[None]:
    """Around ``timm.create_model``: pretrained weights that cannot be downloaded (no network, not
    in the cache) are one :class:`UserError` line saying what to do instead, at once (no retries)."""
    if not pretrained:
        yield
        return
    from sslbench.core.hub import cache_dir, hub_access, offline_reason

    with hub_access() as offline:
        try:
            yield
        except Exception as exc:
            reason = offline_reason(exc, offline)
            if reason is None and not isinstance(exc, (OSError, RuntimeError)):
                raise
            cause = reason or " ".join(str(exc).split())[:160]
            raise UserError(
                f"cannot get the pretrained weights of {name} ({cause}); download them where there is a network "
                f"(python -c \"import timm; timm.create_model('{name}', pretrained=True)\") and copy {cache_dir()} here, "
                "pass a local file with --set \"backbone_kwargs.pretrained_cfg_overlay={'file': 'PATH'}\", or leave out pretrained=true"
            ) from exc


def downsampling_factor(model: nn.Module) -> int | None:
    """Input pixels per cell of the backbone's last feature map: the patch size of a vision
    transformer, else measured with one forward of ``forward_features`` at 64 px (None when that
    does not give a spatial map, e.g. a model with a fixed input size)."""
    patch_embed = getattr(model, "patch_embed", None)
    if patch_embed is not None:
        patch = getattr(patch_embed, "patch_size", None)
        return int(patch[0]) if patch else None
    if not hasattr(model, "forward_features"):
        return None
    probe = 64
    try:
        with torch.no_grad():
            forward_features: Any = getattr(model, "forward_features")  # noqa: B009  (typed as Any, not as a Module attribute)
            feats = forward_features(torch.zeros(1, 3, probe, probe))
    except Exception:  # a model that only takes its own input size: nothing to measure
        return None
    if not isinstance(feats, torch.Tensor) or feats.dim() != 4 or feats.shape[-1] < 1:
        return None
    return max(1, probe // int(feats.shape[-1]))


def check_image_size(model: nn.Module, image_size: int) -> None:
    """Raise a :class:`UserError` when ``image_size`` is too small for ``model``: its forward fails
    (the feature map would vanish), or the image is smaller than the backbone's downsampling factor
    (every cell of the last feature map would be mostly padding, e.g. a ResNet at 1 px)."""
    was_training = model.training
    model.eval()
    name = getattr(model, "pretrained_cfg", {}).get("architecture") or type(model).__name__
    try:
        with torch.no_grad():
            out = model(torch.zeros(1, 3, image_size, image_size))
        if out.shape[-1] != model.num_features:
            raise RuntimeError(f"unexpected output shape {tuple(out.shape)}")
        factor = downsampling_factor(model)
    except (RuntimeError, ValueError, TypeError) as exc:
        cause = " ".join(str(exc).split())[:160]
        if _runs_at(model, max(224, 4 * image_size)):  # a larger image works: the size is the problem
            raise UserError(f"image size {image_size} is too small for this backbone ({cause}); use a larger --image-size") from exc
        raise UserError(
            f"the backbone's forward pass fails on (1, 3, {image_size}, {image_size}) images ({cause}); "
            "check backbone_kwargs (e.g. in_chans must be 3, global_pool must pool)"
        ) from exc
    finally:
        model.train(was_training)
    if factor is not None and image_size < factor:
        raise UserError(
            f"image size {image_size} is too small for {name}: it downsamples by {factor}, so its last feature map "
            f"would be made of padding; use --image-size {factor} or more"
        )


def _runs_at(model: nn.Module, image_size: int) -> bool:
    """Whether ``model`` maps a ``(1, 3, S, S)`` image to ``(1, num_features)``."""
    try:
        with torch.no_grad():
            out = model(torch.zeros(1, 3, image_size, image_size))
        return bool(out.shape[-1] == model.num_features and out.dim() == 2)
    except (RuntimeError, ValueError, TypeError):
        return False


ENCODER_FILE = ENCODER  # a run directory's encoder file (sslbench.core.rundir.RunDir.encoder)


def save_encoder(model: nn.Module, path: str | Path, *, meta: dict[str, Any], what: str = "free some space and try again") -> None:
    """Write the backbone's state dict (timm's own key names) as safetensors, atomically
    (:func:`sslbench.core.rundir.write_atomic`: a failure keeps the previous file and is a one-line
    UserError ending with ``what``)."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    write_atomic(path, lambda tmp: save_file(state, str(tmp), metadata={"sslbench": json.dumps(meta)}), what, errors=(OSError, SafetensorError))


def load_state_strict(model: nn.Module, state: dict[str, torch.Tensor], *, source: str) -> None:
    """Load ``state`` into ``model`` and fail loudly (UserError) on any missing, unexpected or
    mis-shaped key: never a silent partial load."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
        if shapes:
            k = shapes[0]
            parts.append(f"{len(shapes)} shape mismatches (e.g. {k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)})")
        raise UserError(f"{source} does not match the backbone: " + "; ".join(parts))
    model.load_state_dict(state, strict=True)
