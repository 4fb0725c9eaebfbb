"""Frozen-feature extraction for the evaluators (the evaluation protocols, the quick k-NN at the end
of training, the online probe), and the projector heads that give features at other depths.

The k-NN and linear-probe protocols (Wu et al. 2018; Kolesnikov et al. 2019; Chen et al. 2020)
evaluate a *frozen* encoder: features are computed once, without augmentation and without
gradients, with every BatchNorm layer using its running statistics. :func:`extract_features` does
exactly that and leaves the encoder as it found it (parameters, buffers and train/eval flags).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sslbench.core.augment import eval_batch
from sslbench.core.errors import UserError
from sslbench.data import FileSplit, ImageSplit, _fit, store_size

PRECISIONS = ("auto", "no", "bf16", "fp16")

Transform = Callable[[Tensor], Tensor]


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Put ``module`` (and all submodules) in eval mode, restoring every submodule's own
    ``training`` flag on exit, so that a model with some parts deliberately frozen in eval mode
    comes back exactly as it was."""
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, was_training in flags:
            m.training = was_training


def module_device(module: nn.Module) -> torch.device:
    """The device of the module's first parameter (or buffer); CPU for a state-less module."""
    for p in module.parameters():
        return p.device
    for b in module.buffers():
        return b.device
    return torch.device("cpu")


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[object]:
    if precision not in PRECISIONS:
        raise UserError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "no"
    if precision == "no":
        return contextlib.nullcontext()
    if precision == "fp16" and device.type == "cpu":
        raise UserError("precision fp16 needs a GPU; use bf16 or no on the CPU")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def extract_features(
    encoder: nn.Module,
    images: Tensor,
    *,
    image_size: int,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    precision: str = "no",
    transform: Transform | None = None,
    flatten: bool = True,
) -> Tensor:
    """Encode ``images`` with a frozen ``encoder``.

    Args:
        encoder: maps a float batch ``(B, 3, S, S)`` to features ``(B, D)`` (a timm model built
            with ``num_classes=0``); an output with more dimensions is flattened to ``(B, -1)``.
            It is not moved: it must already live on ``device``.
        images: uint8 images ``(N, 3, H, W)`` on any device; batches are moved to ``device``.
        image_size: the evaluation resolution ``S`` passed to the default transform.
        batch_size: images per forward pass.
        device: where to run; ``None`` means the device the encoder's parameters are on.
        precision: ``no`` (float32), ``bf16`` or ``fp16`` autocast, or ``auto`` (bf16 on CUDA,
            no on CPU). Features are returned as float32 whatever the precision.
        transform: ``uint8 batch -> float batch`` applied on ``device``; by default
            :func:`sslbench.core.augment.eval_batch` (resize and ImageNet normalisation, no
            augmentation).
        flatten: flatten an output of more dimensions to ``(B, -1)`` (False: keep its shape,
            e.g. the ``(B, T, D)`` tokens of :class:`Intermediates`).

    Returns:
        float32 features ``(N, D)`` (``(N, ...)`` unflattened) on the CPU.

    The encoder runs in eval mode (BatchNorm uses its running statistics and updates nothing)
    under :func:`torch.no_grad`; every submodule's train/eval flag is restored afterwards.
    (``no_grad`` rather than ``inference_mode``: inference tensors could not be used to train
    the linear probe afterwards.)
    """
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise UserError(f"extract_features expects uint8 images (N, 3, H, W); got {images.dtype} {tuple(images.shape)}")
    if batch_size < 1:
        raise UserError(f"batch_size must be >= 1, got {batch_size}")
    if transform is None:

        def transform(batch: Tensor) -> Tensor:
            return eval_batch(batch, image_size)

    run_device = torch.device(device) if device is not None else module_device(encoder)
    enc_device = module_device(encoder)
    if enc_device.type != run_device.type or (run_device.index is not None and enc_device.index not in (None, run_device.index)):
        raise UserError(
            f"the encoder is on {enc_device} but features were requested on {run_device}; "
            "move the encoder first (encoder.to(device)) or pass device=None"
        )

    chunks: list[Tensor] = []
    with eval_mode(encoder), torch.no_grad(), autocast(run_device, precision):
        for start in range(0, images.shape[0], batch_size):
            batch = images[start : start + batch_size].to(run_device, non_blocking=True)
            out = encoder(transform(batch))
            if out.ndim != 2 and flatten:
                out = out.flatten(1)
            chunks.append(out.float().cpu())
    if not chunks:
        raise UserError("extract_features got no images (N = 0)")
    return torch.cat(chunks)


class _DecodedImages(torch.utils.data.Dataset[Tensor]):
    """The images of a file-backed split as uint8 ``(3, s, s)`` tensors at its storage size: the
    pixels an in-memory split holds."""

    def __init__(self, split: FileSplit, image_size: int) -> None:
        self.split = split
        self.size = split.size if split.size is not None else store_size(image_size)

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> Tensor:
        import numpy as np

        img = self.split.open(i)
        if img.size != (self.size, self.size):
            img = _fit(img, self.size)
        return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)


def split_features(
    encoder: nn.Module,
    split: ImageSplit | FileSplit,
    *,
    image_size: int,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    precision: str = "no",
    num_workers: int = 2,
    flatten: bool = True,
) -> Tensor:
    """:func:`extract_features` of every image of a split, in order: an in-memory split directly,
    a file-backed one (too large for memory) decoded batch by batch by ``num_workers`` DataLoader
    workers, with the same pixels and the same evaluation transform."""
    if isinstance(split, ImageSplit):
        return extract_features(
            encoder, split.images, image_size=image_size, batch_size=batch_size, device=device, precision=precision, flatten=flatten
        )
    loader = torch.utils.data.DataLoader(
        _DecodedImages(split, image_size),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        persistent_workers=False,
    )
    chunks = [
        extract_features(encoder, batch, image_size=image_size, batch_size=batch_size, device=device, precision=precision, flatten=flatten)
        for batch in loader
    ]
    if not chunks:
        raise UserError("split_features got no images (N = 0)")
    return torch.cat(chunks)


# ---------------------------------------------------------------------------------------------
# Feature depths: h, the projector's hidden layers, z

DEPTH_HELP = "h (the encoder's output), projK (the K-th hidden projector layer, after its activation) or z (the projector's output)"
_ACTIVATIONS = (nn.ReLU, nn.GELU, nn.SiLU, nn.LeakyReLU, nn.Tanh, nn.Sigmoid, nn.ELU, nn.Hardswish)


def parse_depth(text: str) -> str:
    """A feature depth name, normalised: ``h``, ``z`` or ``projK`` with K >= 1 (``proj01`` -> ``proj1``).

    - ``h``: the encoder's output (the backbone's pooled features), what SSL papers evaluate;
    - ``projK``: the output of the K-th *hidden* layer of the method's projector, i.e. of its K-th
      ``Linear -> [BatchNorm] -> activation`` block, taken **after** the activation (SimCLR v2
      fine-tunes from ``proj1`` of its 3-layer projector);
    - ``z``: the output of the whole projector, as the loss sees it before any normalisation (with
      a final BatchNorm where the projector has one, e.g. SimSiam's).
    """
    name = text.strip().lower()
    if name in ("h", "z"):
        return name
    if name.startswith("proj") and name[4:].isdigit() and int(name[4:]) >= 1:
        return f"proj{int(name[4:])}"
    raise UserError(f"--features: {text!r} is not a feature depth; use {DEPTH_HELP}, e.g. h,proj1,z")


def hidden_layer_ends(projector: nn.Module) -> list[int]:
    """Positions in a sequential projector of the activations that end its hidden layers."""
    if not isinstance(projector, nn.Sequential):
        return []
    return [i for i, m in enumerate(projector) if isinstance(m, _ACTIVATIONS)]


def projector_depths(projector: nn.Module | None) -> list[str]:
    """The depths a projector offers: ``h``, ``proj1``..``projL`` (its hidden layers) and ``z``."""
    if projector is None:
        return ["h"]
    return ["h", *(f"proj{k}" for k in range(1, len(hidden_layer_ends(projector)) + 1)), "z"]


def depth_head(projector: nn.Module | None, depth: str, *, method: str = "this method") -> nn.Module:
    """A copy of the part of ``projector`` that maps ``h`` to the features at ``depth`` (see
    :func:`parse_depth`): ``projector[: end of hidden layer K]`` for ``projK``, all of it for
    ``z``; activations are made out-of-place. Raises :class:`UserError` naming the depths the
    projector offers when it has no such depth."""
    import copy

    depth = parse_depth(depth)
    if depth == "h":
        raise ValueError("depth h has no head: it is the encoder's output")
    valid = projector_depths(projector)
    if projector is None or depth not in valid:
        what = "has no projector" if projector is None else f"has a projector with the depths {', '.join(valid)}"
        raise UserError(f"--features {depth}: {method} {what}; use one of {', '.join(valid)}")
    if depth == "z":
        head = copy.deepcopy(projector)
    else:
        assert isinstance(projector, nn.Sequential)  # projector_depths offers projK only for sequential projectors
        head = copy.deepcopy(projector[: hidden_layer_ends(projector)[int(depth[4:]) - 1] + 1])
    for m in head.modules():
        if isinstance(m, _ACTIVATIONS) and hasattr(m, "inplace"):
            setattr(m, "inplace", False)  # noqa: B010  (an activation's flag, not an attribute of every Module)
    return head.eval()


def load_projector(run_dir: str | Path) -> nn.Module | None:
    """The trained ``projector`` of the run's method, rebuilt from ``config.yaml`` and loaded
    strictly from ``RUN_DIR/method.safetensors`` (``None`` when the method has none)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from sslbench.backbones import load_state_strict
    from sslbench.config import load_run_config
    from sslbench.config.build import build_method
    from sslbench.core.rundir import RunDir

    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    path = RunDir(run_dir).method
    if not path.is_file():
        raise UserError(f"{path} not found: features past h (and fine-tuning from the projector) need a finished run's method.safetensors")
    rng = torch.get_rng_state()
    torch.manual_seed(0)  # the weights are overwritten; the caller's random stream is left as it was
    try:
        method = build_method(cfg)
    finally:
        torch.set_rng_state(rng)
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"{path} is not a readable safetensors file: {exc}") from exc
    load_state_strict(method, state, source=str(path))
    projector = getattr(method, "projector", None)
    return projector if isinstance(projector, nn.Module) else None


def apply_head(head: nn.Module | None, h: Tensor, *, device: torch.device | str | None = None, batch_size: int = 1024) -> Tensor:
    """``head(h)`` in eval mode without gradients, in float32, batch by batch on ``device`` (the
    head's own by default): features ``(N, D)`` -> ``(N, D')`` on the CPU. ``None``: ``h`` itself."""
    if head is None:
        return h
    dev = torch.device(device) if device is not None else module_device(head)
    chunks = []
    with eval_mode(head), torch.no_grad():
        for start in range(0, h.shape[0], batch_size):
            chunks.append(head(h[start : start + batch_size].to(dev, torch.float32)).float().cpu())
    return torch.cat(chunks) if chunks else h.new_zeros((0, 0))


# ---------------------------------------------------------------------------------------------
# Intermediate layers: the last blocks of a vision transformer, the last stages of a convnet

#: One layer's output: (its class token ``(B, D)``, or None, and its other tokens ``(B, T, D)``).
LayerTokens = tuple[Tensor | None, Tensor]


def intermediate_layers(encoder: nn.Module, x: Tensor, n_last: int) -> list[LayerTokens]:
    """The outputs of the last ``n_last`` blocks (vision transformer) or stages (convnet) of a timm
    ``encoder`` on the float batch ``x``, in depth order, through timm's own
    ``forward_intermediates``:

    - vision transformer: each block's output through the encoder's final norm (``norm=True``, as
      DINOv2's ``get_intermediate_layers``), split into the class token ``(B, D)`` (None for a
      model without one) and the patch tokens ``(B, T, D)`` (prefix tokens such as registers
      dropped);
    - convnet: each stage's feature map ``(B, C, H, W)`` as ``H * W`` tokens ``(B, H*W, C)`` (no
      class token, no head norm).

    A model without ``forward_intermediates``, or with fewer than ``n_last`` layers, is a UserError.
    """
    name = getattr(encoder, "pretrained_cfg", {}).get("architecture") or type(encoder).__name__
    forward_intermediates: Callable[..., Any] | None = getattr(encoder, "forward_intermediates", None)
    if forward_intermediates is None:
        raise UserError(f"{name} has no forward_intermediates (timm's intermediate-layer API); use a timm ViT or convnet encoder")
    available = len(getattr(encoder, "feature_info", ()))
    if not 1 <= n_last <= available:
        what = "blocks" if hasattr(encoder, "patch_embed") else "stages (the stem counts as one)"
        raise UserError(f"{name} has {available} {what}; asked for the last {n_last}: use a number from 1 to {available}")
    if hasattr(encoder, "patch_embed"):
        outs = forward_intermediates(x, indices=n_last, return_prefix_tokens=True, norm=True, output_fmt="NLC", intermediates_only=True)
        has_cls = getattr(encoder, "cls_token", None) is not None
        return [(prefix[:, 0] if has_cls else None, tokens) for tokens, prefix in outs]
    maps = forward_intermediates(x, indices=n_last, intermediates_only=True)
    return [(None, m.flatten(2).transpose(1, 2)) for m in maps]


class Intermediates(nn.Module):
    """``encoder`` seen through :func:`intermediate_layers`: ``forward(x)`` is
    ``reduce(intermediate_layers(encoder, x, n_last))``, so :func:`extract_features` and
    :func:`split_features` (``flatten=False`` for token tensors) cache whatever ``reduce`` keeps
    of the last layers, in one forward per batch."""

    n_last: int
    reduce: Callable[[list[LayerTokens]], Tensor]

    def __init__(self, encoder: nn.Module, n_last: int, reduce: Callable[[list[LayerTokens]], Tensor]) -> None:
        super().__init__()
        self.encoder, self.n_last, self.reduce = encoder, n_last, reduce

    def forward(self, x: Tensor) -> Tensor:
        return self.reduce(intermediate_layers(self.encoder, x, self.n_last))
