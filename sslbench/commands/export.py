"""``sslbench export RUN DIR``: a run's trained encoder as a folder in timm's own hub layout.

``DIR`` holds what ``timm.create_model("local-dir:DIR", pretrained=True)`` (or, once uploaded,
``"hf-hub:REPO"``) reads:

- ``config.json``: ``architecture`` and ``model_args`` (what ``timm.create_model`` needs to
  rebuild the backbone exactly as sslbench built it, see
  :func:`sslbench.backbones.timm_architecture`), ``num_classes`` 0 and ``num_features``, and a
  ``pretrained_cfg`` with the run's ``input_size``, ``interpolation``, ``mean``, ``std``,
  ``crop_pct`` and ``crop_mode`` (sslbench's evaluation view: antialiased bilinear resize of the
  shorter side to ``image_size / crop_pct``, centre crop), so that
  ``timm.data.resolve_data_config({}, model=model)`` gives the run's preprocessing. An
  ``sslbench`` entry records where the weights come from (method, data, steps, seed, k-NN).
- ``model.safetensors``: the encoder's weights under timm's own key names.
- ``README.md``: a model card with the one-line load.

Small-image ResNets (trained at 64 px or less) have sslbench's CIFAR stem; their architecture is
``sslbench_cifar_resnet``, which ``import sslbench.backbones`` registers in timm (see
:mod:`sslbench.backbones.small_stem`). Vision transformers at small sizes need only model
arguments (``img_size``, ``patch_size``), and every other backbone loads in plain timm.

The export checks itself: timm loads the folder and must give the run's features (to 1e-5 here;
the tests hold it to 1e-6). ``--push-to-hub REPO`` then uploads the same folder with
``huggingface_hub`` (``create_repo`` + ``upload_folder``; log in with ``hf auth login`` or set
``HF_TOKEN``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from sslbench.core.errors import UserError
from sslbench.core.registry import register_command
from sslbench.core.rundir import RunDir, write_atomic

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "README.md"
VERIFY_TOLERANCE = 1e-5

__all__ = ["CONFIG_FILE", "WEIGHTS_FILE", "export_encoder", "hub_config", "push_to_hub"]


def _jsonable(value: Any) -> Any:
    """Tuples as lists, recursively; anything JSON cannot hold is a :class:`UserError`."""
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise UserError(f"backbone argument value {value!r} cannot be written to config.json; use numbers, strings or lists")


def hub_config(cfg: Any, model: Any, summary: dict[str, Any] | None = None) -> dict[str, Any]:
    """The timm ``config.json`` of a run (``cfg``: its :class:`~sslbench.config.TrainConfig`;
    ``model``: its backbone; ``summary``: its ``results.json``, for the provenance entry)."""
    import torch

    from sslbench import __version__
    from sslbench.backbones import timm_architecture
    from sslbench.core.augment import IMAGENET_MEAN, IMAGENET_STD, eval_resize_size

    size = int(cfg.image_size)
    architecture, model_args = timm_architecture(cfg.backbone, size, **dict(cfg.backbone_kwargs))
    base_cfg = dict(getattr(model, "pretrained_cfg", {}) or {})
    pool_size = None
    if base_cfg.get("pool_size") is not None:  # the last feature map at this input size
        with torch.no_grad():
            was_training = model.training
            feats = model.eval().forward_features(torch.zeros(1, 3, size, size))
            model.train(was_training)
        pool_size = list(feats.shape[-2:]) if feats.dim() == 4 else None
    pretrained_cfg = {
        "input_size": [3, size, size],
        "fixed_input_size": bool(base_cfg.get("fixed_input_size", False)),
        "interpolation": "bilinear",
        "crop_pct": size / eval_resize_size(size),
        "crop_mode": "center",
        "mean": list(getattr(cfg, "mean", IMAGENET_MEAN)),
        "std": list(getattr(cfg, "std", IMAGENET_STD)),
        "num_classes": 0,
        "pool_size": pool_size,
        "first_conv": base_cfg.get("first_conv"),
        "classifier": base_cfg.get("classifier"),
        "description": f"{cfg.method} encoder trained with sslbench on {cfg.data} at {size} px",
    }
    summary = summary or {}
    provenance = {
        "method": cfg.method,
        "backbone": cfg.backbone,
        "backbone_kwargs": _jsonable(dict(cfg.backbone_kwargs)),
        "data": cfg.data,
        "image_size": size,
        "steps": summary.get("steps", cfg.steps),
        "epochs": summary.get("epochs", cfg.epochs),
        "batch_size": summary.get("batch_size", cfg.batch_size),
        "seed": cfg.seed,
        "metrics": summary.get("metrics") or {},
        "sslbench_version": __version__,
    }
    return {
        "architecture": architecture,
        "num_classes": 0,
        "num_features": int(model.num_features),
        "model_args": _jsonable(model_args),
        "pretrained_cfg": pretrained_cfg,
        "sslbench": provenance,
    }


def _model_card(config: dict[str, Any], repo: str | None) -> str:
    """README.md: Hugging Face model-card front matter and the one-line load."""
    source = f"hf-hub:{repo}" if repo else "local-dir:PATH/TO/THIS/FOLDER"
    prov = config["sslbench"]
    needs_import = config["architecture"].startswith("sslbench_")
    load = (
        f"import sslbench.backbones, timm  # registers {config['architecture']} (sslbench's small-image stem)\n" if needs_import else "import timm\n"
    )
    load += f'model = timm.create_model("{source}", pretrained=True).eval()  # features: model(images)'
    return (
        "---\ntags:\n- image-feature-extraction\n- timm\n- sslbench\nlibrary_name: timm\n---\n\n"
        f"# {prov['method']} {prov['backbone']} ({prov['data']}, {prov['image_size']} px)\n\n"
        f"A self-supervised {prov['method']} encoder trained with sslbench {prov['sslbench_version']} "
        f"({prov['steps']} steps, batch {prov['batch_size']}, seed {prov['seed']}). No classifier head: the model returns "
        f"{config['num_features']}-d features.\n\n```python\n{load}\n```\n\n"
        "Preprocessing (input size, mean, std, interpolation, crop) is in `config.json`'s `pretrained_cfg`: "
        "`timm.data.resolve_data_config({}, model=model)`.\n"
    )


def _write_atomic(path: Path, data: bytes) -> None:
    write_atomic(path, lambda tmp: tmp.write_bytes(data), f"pass a writable folder to export into (not {path.parent})")


def export_encoder(run_dir: str | Path, out_dir: str | Path, *, overwrite: bool = False, verify: bool = True, repo: str | None = None) -> Path:
    """Write the encoder of ``run_dir`` into ``out_dir`` in timm's hub layout (see the module
    docstring) and return ``out_dir``. An existing non-empty ``out_dir`` needs ``overwrite``.
    ``verify`` loads the folder with timm and compares its features with the run's encoder."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    from sslbench.config import load_run_config
    from sslbench.config.build import load_encoder

    run_dir, out_dir = Path(run_dir), Path(out_dir).expanduser()
    if not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} does not exist; pass a finished run (config.yaml + encoder.safetensors)")
    from sslbench.core.runlock import check_not_training

    check_not_training(run_dir, "export")  # its encoder is written when training ends
    cfg = load_run_config(run_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir} is a file; pass a folder to export into")
    if out_dir.resolve() == run_dir.resolve():
        raise UserError(f"export into a folder of its own, not the run directory {run_dir}")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise UserError(f"{out_dir} is not empty; choose a new folder or pass --overwrite")
    encoder = load_encoder(run_dir)  # strict key check
    summary_path = RunDir(run_dir).results
    try:
        summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    except (OSError, ValueError):
        summary = {}
    config = hub_config(cfg, encoder, summary if isinstance(summary, dict) else {})
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in encoder.state_dict().items()}
    write_atomic(
        out_dir / WEIGHTS_FILE,
        lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}),
        f"pass a writable folder to export into (not {out_dir})",
        errors=(OSError, SafetensorError),
    )
    _write_atomic(out_dir / CARD_FILE, _model_card(config, repo).encode())
    _write_atomic(out_dir / CONFIG_FILE, (json.dumps(config, indent=2) + "\n").encode())  # last: a complete folder has it
    if verify:
        _verify(out_dir, encoder, int(config["pretrained_cfg"]["input_size"][-1]))
    return out_dir


def _verify(out_dir: Path, encoder: Any, image_size: int) -> None:
    """timm loads ``out_dir`` and gives ``encoder``'s features (max difference at most
    :data:`VERIFY_TOLERANCE` on two random images)."""
    import timm
    import torch

    try:
        from timm.models._factory import parse_model_name

        parse_model_name("local-dir:x")
    except (ImportError, ValueError):
        print(f"note: timm {timm.__version__} cannot load local-dir: folders; {out_dir} is written but not checked (upgrade timm)")
        return
    try:
        loaded = timm.create_model(f"local-dir:{out_dir.resolve()}", pretrained=True).eval()
    except Exception as err:  # any failure here is a bug in the export, named in one line
        raise UserError(f"timm cannot load the export in {out_dir} ({type(err).__name__}: {' '.join(str(err).split())[:200]})") from err
    x = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = float((loaded(x) - encoder.eval()(x)).abs().max())
    if not diff <= VERIFY_TOLERANCE:
        raise UserError(f"the export in {out_dir} gives other features than the run's encoder (max difference {diff:.3g})")


def push_to_hub(folder: str | Path, repo_id: str, *, private: bool = False, token: str | None = None, api: Any = None) -> str:
    """Upload ``folder`` to the Hugging Face Hub model repository ``repo_id`` (created when
    missing) and return the commit URL. ``api``: an ``huggingface_hub.HfApi`` (default: a new one)."""
    from huggingface_hub import HfApi

    from sslbench import __version__

    if api is None:
        api = HfApi(token=token, library_name="sslbench", library_version=__version__)
    try:
        created = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        repo = str(getattr(created, "repo_id", "") or repo_id)
        info = api.upload_folder(
            repo_id=repo,
            folder_path=str(folder),
            repo_type="model",
            commit_message="sslbench export",
            allow_patterns=[CONFIG_FILE, WEIGHTS_FILE, CARD_FILE],
        )
    except Exception as err:  # network, login, permissions: the folder stays complete
        raise UserError(
            f"could not upload {folder} to the Hugging Face Hub as {repo_id} ({type(err).__name__}: {' '.join(str(err).split())[:200]}); "
            f"the folder is complete: log in (HF_TOKEN or `hf auth login`) and upload it with `hf upload {repo_id} {folder}`"
        ) from err
    return str(getattr(info, "commit_url", "") or f"https://huggingface.co/{repo}")


def _check_repo_id(repo_id: str) -> None:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id  # type: ignore[attr-defined]  # re-exported without __all__

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise UserError(
            f"--push-to-hub {repo_id!r} is not a Hub repository id; write NAME or OWNER/NAME ({' '.join(str(err).split())[:160]})"
        ) from err


def cmd_export(args: argparse.Namespace) -> int:
    """``sslbench export RUN DIR [--push-to-hub REPO]``."""
    if args.push_to_hub:
        _check_repo_id(args.push_to_hub)
    out = export_encoder(args.run_dir, args.out_dir, overwrite=args.overwrite, repo=args.push_to_hub)
    config = json.loads((out / CONFIG_FILE).read_text())
    print(f"wrote {out}/{{{CONFIG_FILE},{WEIGHTS_FILE},{CARD_FILE}}} ({config['architecture']}, {config['num_features']}-d features)")
    prefix = "import sslbench.backbones, timm; " if config["architecture"].startswith("sslbench_") else "import timm; "
    print(f'load it with: {prefix}model = timm.create_model("local-dir:{out.resolve()}", pretrained=True)')
    if args.push_to_hub:
        url = push_to_hub(out, args.push_to_hub, private=args.private)
        print(f'uploaded to {url}; load it with timm.create_model("hf-hub:{args.push_to_hub}", pretrained=True)')
    return 0


@register_command("export")
def register_export(sub: Any) -> None:
    """Add ``sslbench export`` to the CLI's sub-commands."""
    p = sub.add_parser("export", help="write a run's encoder as a timm model folder (config.json + model.safetensors)")
    p.add_argument("run_dir", metavar="RUN", help="a finished run directory (config.yaml + encoder.safetensors)")
    p.add_argument("out_dir", metavar="DIR", help="folder to write (new or empty; see --overwrite)")
    p.add_argument("--push-to-hub", metavar="REPO", help="also upload the folder to this Hugging Face Hub model repository")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create the repository private")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty DIR, replacing an earlier export")
    p.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_export)
