"""Encoders that sslbench did not train, for ``sslbench eval --encoder SPEC``.

Three forms of ``SPEC``, each giving a feature model (no classifier) and the identity its result
rows are keyed by, the encoder's name and the checksum of its weights:

- ``timm:NAME``: the backbone sslbench builds for ``--backbone NAME`` at the evaluation image size
  (:func:`sslbench.backbones.create_backbone`, small-image adaptations included), randomly
  initialised from ``torch.manual_seed(init_seed)`` (checksum ``random:SEED``), or with the state
  dict of ``--weights FILE`` (``.safetensors``, or ``.pth``/``.pt``/``.bin`` read with
  ``torch.load(weights_only=True)``), strictly checked (checksum: the file's sha256). A run's
  ``encoder.safetensors`` loads into ``timm:BACKBONE`` at the run's image size. The classifier of a
  timm checkpoint (the keys under the model's ``pretrained_cfg["classifier"]``, e.g. ``fc.``) is
  dropped, as timm itself does for ``num_classes=0``; every other key must match.
- ``local-dir:DIR``: timm's own folder form (``config.json`` + ``model.safetensors``, or one of the
  other weights files timm looks for), e.g. the output of ``sslbench export``; loaded with
  ``timm.create_model("local-dir:DIR", pretrained=True, num_classes=0)``.
- ``hf-hub:REPO``: a timm model repository of the Hugging Face hub, read from the local hub cache
  only (never downloaded here: fill the cache with ``hf download REPO`` where there is a network),
  then loaded as ``local-dir:`` of its cached snapshot.

Images are preprocessed as for every run (:func:`sslbench.core.augment.eval_batch`: resize and
ImageNet normalisation), so rows of runs and of external encoders compare like for like.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from sslbench.core.errors import UserError

KINDS = ("timm", "local-dir", "hf-hub")
STATE_DICT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
# timm's own choice of weights file in a local-dir folder (timm.models._hub.load_state_dict_from_path,
# timm 1.0): these names first, else the first file by extension.
PREFERRED_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "pytorch_model.pth", "model.pth")
WEIGHTS_EXTENSIONS = (".safetensors", ".pth", ".pth.tar", ".bin")


@dataclass
class ExternalEncoder:
    """A loaded external encoder and what its result rows record."""

    spec: str  # as given, e.g. "timm:resnet18", "local-dir:/abs/export", "hf-hub:owner/name"
    name: str  # the rows' ``encoder`` (and leaderboard ``method``): the spec, a folder named by its last part
    model: nn.Module  # eval mode, on the CPU
    backbone: str  # the timm architecture (an sslbench export: the run's backbone)
    backbone_kwargs: dict[str, Any]  # what rebuilds it with create_backbone (distillation's student)
    weights: str  # "sha256:<hex>" of the weights file, or "random:<seed>"
    weights_file: str | None  # the file the weights came from (None: random initialisation)
    image_size: int | None  # the folder's own input size (config.json's pretrained_cfg), None for timm:NAME
    record: dict[str, Any] = field(default_factory=dict)  # the rows' ``encoder_source``: where it came from


def parse_spec(spec: str) -> tuple[str, str]:
    """``"timm:resnet18"`` -> ``("timm", "resnet18")``; an unknown form is a :class:`UserError`."""
    kind, sep, arg = spec.partition(":")
    if not sep or kind not in KINDS or not arg.strip():
        raise UserError(
            f"--encoder {spec!r} is not an encoder spec; write timm:NAME (e.g. timm:resnet18), local-dir:DIR "
            "(config.json + model.safetensors, e.g. an `sslbench export`) or hf-hub:OWNER/NAME (from the local hub cache)"
        )
    return kind, arg.strip()


def sha256(path: Path) -> str:
    """``sha256:<hex>`` of the file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return f"sha256:{digest.hexdigest()}"


def load_external_encoder(spec: str, *, image_size: int | None, weights: str | None = None, init_seed: int = 0) -> ExternalEncoder:
    """The encoder named by ``spec`` (see the module docstring), in eval mode on the CPU.
    ``image_size`` is the evaluation resolution (``timm:NAME`` needs it; None otherwise means the
    folder's own); ``weights``, a state-dict file, and ``init_seed`` apply to ``timm:NAME`` only."""
    kind, arg = parse_spec(spec)
    if kind != "timm" and weights is not None:
        raise UserError(f"--weights applies to --encoder timm:NAME; {spec} brings its own weights (drop --weights)")
    if kind == "timm":
        return _timm(spec, arg, image_size, weights, init_seed)
    if kind == "local-dir":
        folder = Path(arg).expanduser()
        if not folder.is_dir():
            raise UserError(f"--encoder {spec}: {folder} is not a folder; pass a timm model folder (config.json + model.safetensors)")
        return _folder(spec, f"local-dir:{folder.resolve().name}", folder.resolve(), {"kind": "local-dir", "path": str(folder.resolve())})
    snapshot = _cached_snapshot(arg, spec)
    return _folder(spec, spec, snapshot, {"kind": "hf-hub", "repo": arg, "snapshot": str(snapshot)})


def _timm(spec: str, name: str, image_size: int | None, weights: str | None, init_seed: int) -> ExternalEncoder:
    import timm
    import torch

    from sslbench.backbones import create_backbone
    from sslbench.core.registry import unknown_name_message

    if not timm.is_model(name):
        raise UserError(unknown_name_message("timm model", name, timm.list_models()) + f" (in --encoder {spec})")
    assert image_size is not None, "the command resolves the image size of timm:NAME"
    torch.manual_seed(init_seed)
    model = create_backbone(name, image_size)
    record: dict[str, Any] = {"kind": "timm", "model": name}
    if weights is None:
        checksum, file = f"random:{init_seed}", None
        record["init_seed"] = init_seed
    else:
        path = Path(weights).expanduser()
        state = read_state_dict(path)
        dropped = _drop_classifier(model, state)
        _load_strict(model, state, path, name)
        checksum, file = sha256(path), str(path.resolve())
        record.update(weights=file, **({"dropped_classifier_keys": dropped} if dropped else {}))
    return ExternalEncoder(spec, spec, model.eval(), name, {}, checksum, file, None, record)


def read_state_dict(path: Path) -> dict[str, Any]:
    """A state dict from ``path`` (safetensors, or a torch file read with ``weights_only=True``;
    a checkpoint that wraps it under ``state_dict`` or ``model`` is unwrapped)."""
    import torch

    if not path.is_file():
        raise UserError(f"--weights {path}: no such file; pass a state dict saved as .safetensors or .pth")
    if path.suffix not in STATE_DICT_SUFFIXES:
        raise UserError(f"--weights {path}: expected a state dict file ({', '.join(STATE_DICT_SUFFIXES)}), got {path.suffix or 'no suffix'}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a corrupt file, or pickled objects that weights_only refuses
        raise UserError(f"--weights {path} is not a readable state dict ({type(exc).__name__}: {' '.join(str(exc).split())[:160]})") from exc
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"--weights {path} holds no state dict (a mapping of parameter names to tensors)")
    return state


def _drop_classifier(model: nn.Module, state: dict[str, Any]) -> list[str]:
    """Remove (and return) the keys of the model's classifier, which ``num_classes=0`` has none of."""
    classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
    heads = [classifier] if isinstance(classifier, str) else list(classifier or [])
    own = model.state_dict()
    dropped = sorted(k for k in state if k not in own and any(k.startswith(h + ".") for h in heads))
    for k in dropped:
        del state[k]
    return dropped


def _load_strict(model: nn.Module, state: dict[str, Any], path: Path, name: str) -> None:
    from sslbench.backbones import load_state_strict

    try:
        load_state_strict(model, state, source=f"--weights {path}")
    except UserError as exc:
        raise UserError(f"{exc} of timm:{name} at this --image-size; pass the weights of this architecture") from None


def _weights_file(folder: Path) -> Path | None:
    """The weights file timm's ``local-dir:`` loader reads in ``folder`` (see :data:`PREFERRED_WEIGHTS`)."""
    for name in PREFERRED_WEIGHTS:
        if (folder / name).is_file():
            return folder / name
    for ext in WEIGHTS_EXTENSIONS:
        files = sorted(folder.glob(f"*{ext}"))
        if files:
            return files[0]
    return None


def _folder(spec: str, name: str, folder: Path, record: dict[str, Any]) -> ExternalEncoder:
    """A timm model folder: ``config.json`` + weights, loaded by timm as ``local-dir:``."""
    import timm

    import sslbench.backbones  # noqa: F401  (registers sslbench_cifar_resnet, the architecture of small-image exports)

    config_path = folder / "config.json"
    weights = _weights_file(folder)
    if not config_path.is_file() or weights is None:
        lacks = "config.json" if not config_path.is_file() else "a weights file (model.safetensors)"
        raise UserError(f"--encoder {spec}: {folder} has no {lacks}; pass a timm model folder, e.g. one written by `sslbench export RUN DIR`")
    try:
        config = json.loads(config_path.read_text())
        architecture = str(config["architecture"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"--encoder {spec}: {config_path} is not a timm config ({type(exc).__name__}: {exc}); it needs an architecture") from exc
    if not timm.is_model(architecture):
        raise UserError(f"--encoder {spec}: {config_path} names the architecture {architecture!r}, which this timm {timm.__version__} does not know")
    try:
        model = timm.create_model(f"local-dir:{folder}", pretrained=True, num_classes=0)
    except Exception as exc:  # timm's own failures (mismatched weights, missing keys) in one line
        raise UserError(f"--encoder {spec}: timm cannot load {folder} ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})") from exc
    provenance = config.get("sslbench") if isinstance(config.get("sslbench"), dict) else None
    if provenance is not None:  # an sslbench export: the run's own backbone name and arguments
        backbone, kwargs = str(provenance["backbone"]), dict(provenance.get("backbone_kwargs") or {})
        record["sslbench"] = {k: provenance.get(k) for k in ("method", "data", "steps", "seed")}
    else:
        backbone, kwargs = architecture, dict(config.get("model_args") or {})
    size = (config.get("pretrained_cfg") or {}).get("input_size")
    image_size = int(size[-1]) if isinstance(size, list) and size else None
    record.update(architecture=architecture, weights=weights.name)
    return ExternalEncoder(spec, name, model.eval(), backbone, kwargs, sha256(weights), str(weights), image_size, record)


def _cached_snapshot(repo: str, spec: str) -> Path:
    """The folder of ``repo``'s newest cached snapshot in the local hub cache (never downloads)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    from sslbench.core.hub import cache_dir

    try:
        return Path(snapshot_download(repo_id=repo, repo_type="model", local_files_only=True))
    except HFValidationError as exc:
        raise UserError(f"--encoder {spec}: {repo!r} is not a hub repository id; write hf-hub:OWNER/NAME") from exc
    except Exception as exc:  # LocalEntryNotFoundError and kin: not in the cache
        raise UserError(
            f"--encoder {spec}: {repo} is not in the local Hugging Face cache ({cache_dir()}); sslbench reads the hub offline: "
            f"fill the cache with `hf download {repo}` where there is a network (and copy it here, or set HF_HUB_CACHE)"
        ) from exc
