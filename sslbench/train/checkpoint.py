"""Atomic, verifiable checkpoints on top of Accelerate's ``save_state``/``load_state``.

A checkpoint is the directory ``checkpoints/step-00001234/`` written by ``save_state`` (model as
safetensors, optimizer, every process's RNG states) plus ``meta.json`` (step, epoch) and
``manifest.json`` (size and sha256 of every file). It is written under a temporary name and
renamed into place only when complete, so a crash mid-write never leaves a checkpoint that looks
valid. On resume, a checkpoint whose manifest does not match its files (truncated, corrupt) is
skipped with a warning and the one before it is used.

Loading is safe: the model comes from safetensors, and every other file (optimizer, RNG states) is
first read here with ``torch.load(weights_only=True)`` (Accelerate's loader, with its allow-list of
numpy types). A file that passes its manifest but is not a weights-only pickle (a pickle crafted to
run code) is refused with a one-line :class:`~sslbench.core.errors.UserError` naming it: no fallback,
since a tampered checkpoint is something to look at, not to train around. A checkpoint made for
another model (other backbone or widths) is also a one-line error. See ``docs/reliability.md``.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sslbench.core.errors import UserError
from sslbench.core.rundir import share_mode, write_failure

PREFIX = "step-"
TMP_PREFIX = ".tmp-"
OLD_PREFIX = ".old-"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(path: Path) -> None:
    files = {}
    for f in sorted(p for p in path.rglob("*") if p.is_file() and p.name != "manifest.json"):
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
        files[str(f.relative_to(path))] = {"size": f.stat().st_size, "sha256": _sha256(f)}
    (path / "manifest.json").write_text(json.dumps({"files": files}, indent=1))


def verify(path: Path) -> str | None:
    """None when the checkpoint at ``path`` is complete and intact, else what is wrong."""
    manifest = path / "manifest.json"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (OSError, ValueError, KeyError):
        return "no readable manifest.json"
    for rel, info in files.items():
        f = path / rel
        if not f.is_file():
            return f"{rel} is missing"
        size = f.stat().st_size
        if size < info["size"]:
            return f"{rel} is truncated ({size} of {info['size']} bytes)"
        if size != info["size"]:
            return f"{rel} is corrupt ({size} bytes, the manifest says {info['size']})"
        if _sha256(f) != info["sha256"]:
            return f"{rel} is corrupt (checksum mismatch)"
    return None


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Finished checkpoints, newest first."""
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX) :].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]), reverse=True)


def latest_valid(ckpt_dir: Path, *, warn: bool = True) -> Path | None:
    """The newest intact checkpoint; broken newer ones are reported and skipped."""
    for path in list_checkpoints(ckpt_dir):
        problem = verify(path)
        if problem is None:
            return path
        if warn:
            print(f"warning: checkpoint {path} is unusable ({problem}); trying the one before it", file=sys.stderr)
    return None


def read_meta(path: Path) -> dict[str, Any]:
    meta: dict[str, Any] = json.loads((path / "meta.json").read_text())
    return meta


def save(
    accelerator: Any,
    ckpt_dir: Path,
    step: int,
    *,
    keep: int,
    meta: dict[str, Any],
    on_written: Callable[[Path], None] | None = None,
    again: str | None = None,
) -> Path:
    """Save the full training state at ``step`` atomically; keep the newest ``keep`` checkpoints.

    Everything is written into ``.tmp-step-N/`` and renamed to ``step-N/`` only once complete
    (manifest included). A checkpoint of the same step that already exists is moved aside first and
    deleted after the rename. ``on_written(tmp)`` runs once Accelerate's files are in the temporary
    directory, before the manifest and the rename (tests crash a run there). An ``OSError`` (disk full, permissions) removes the partial directory
    and becomes a :class:`UserError` that tells to run ``again`` (default: ``sslbench train --output
    RUN_DIR --resume``); earlier checkpoints are untouched.
    """
    final = ckpt_dir / f"{PREFIX}{step:08d}"
    tmp = ckpt_dir / f"{TMP_PREFIX}{PREFIX}{step:08d}"
    old = ckpt_dir / f"{OLD_PREFIX}{PREFIX}{step:08d}"
    try:
        if accelerator.is_main_process:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if on_written is not None:
            on_written(tmp)
        if accelerator.is_main_process:
            (tmp / "meta.json").write_text(json.dumps(meta))
            write_manifest(tmp)
            share_mode(tmp)  # Accelerate's safetensors files are created 0600: the umask's mode, as every run file
            if final.exists():
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
            os.replace(tmp, final)
            _fsync_dir(ckpt_dir)
            for stale in list_checkpoints(ckpt_dir)[keep:]:
                shutil.rmtree(stale, ignore_errors=True)
            for stale in [*ckpt_dir.glob(f"{TMP_PREFIX}*"), *ckpt_dir.glob(f"{OLD_PREFIX}*")]:
                shutil.rmtree(stale, ignore_errors=True)
    except Exception as exc:
        reason = write_failure(exc, tmp)
        if reason is None:
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        where = getattr(exc, "filename", None) or tmp
        earlier = list_checkpoints(ckpt_dir)
        kept = f"the last good checkpoint is {earlier[0].name}" if earlier else "no earlier checkpoint exists"
        raise UserError(
            f"cannot write checkpoint {final} ({reason}: {where}); {kept}: free some space and continue with "
            f"`{again or f'sslbench train --output {ckpt_dir.parent} --resume'}`"
        ) from exc
    accelerator.wait_for_everyone()
    return final


def _load_pickle(path: Path) -> Any:
    """``torch.load(weights_only=True)`` with Accelerate's allow-list (numpy RNG state types), so
    exactly what ``load_state`` itself accepts; a non-weights-only pickle is a UserError."""
    from accelerate.utils import load as accelerate_load

    try:
        with warnings.catch_warnings():  # (torch warns about pickle protocols before refusing a file)
            warnings.simplefilter("ignore")
            return accelerate_load(str(path), map_location="cpu")
    except pickle.UnpicklingError as exc:
        text = str(exc)
        reason = next(
            (line.strip().rstrip(".") for line in text.splitlines() if "global" in line.lower() or "unsupported" in line.lower()),
            "torch.load(weights_only=True) refused it",
        )
        raise UserError(
            f"refusing to load {path}: it is not a weights-only checkpoint file ({reason}) and may have been tampered with; "
            f"nothing from it was run. Delete {path.parent} to resume from the checkpoint before it"
        ) from exc
    except (OSError, EOFError, RuntimeError, ValueError) as exc:
        raise UserError(
            f"cannot read {path} ({type(exc).__name__}: {' '.join(str(exc).split())[:160]}); delete {path.parent} to resume from the checkpoint before it"
        ) from exc


def _check_model_file(path: Path, model: Any) -> None:
    """UserError when the checkpoint's model file holds other keys or shapes than ``model``
    (a checkpoint of another backbone or other widths), read from the safetensors header only."""
    from safetensors import SafetensorError, safe_open

    file = path / "model.safetensors"
    if not file.is_file():
        return
    try:
        with safe_open(str(file), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError) as exc:
        raise UserError(f"cannot read {file} ({' '.join(str(exc).split())[:160]}); delete {path} to resume from the checkpoint before it") from exc

    def strip(key: str) -> str:  # DDP's wrapper prefix
        return key[len("module.") :] if key.startswith("module.") else key

    shapes = {strip(k): v for k, v in shapes.items()}
    own = {strip(k): tuple(v.shape) for k, v in model.state_dict().items()}
    unexpected = sorted(set(shapes) - set(own))
    mismatched = sorted(k for k in set(shapes) & set(own) if shapes[k] != own[k])
    if unexpected or mismatched:
        parts = []
        if mismatched:
            k = mismatched[0]
            parts.append(f"{len(mismatched)} shape mismatches, e.g. {k}: {shapes[k]} in the checkpoint vs {own[k]} in the model")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys, e.g. {unexpected[0]}")
        raise UserError(
            f"checkpoint {path} was made for a different model ({'; '.join(parts)}); resume with the run's own "
            "config.yaml (same backbone, backbone_kwargs and method settings) or start a new --output"
        )


def load(accelerator: Any, path: Path, *, model: Any = None) -> dict[str, Any]:
    """Restore the training state saved at ``path`` into ``accelerator``'s prepared objects.

    Every pickle file is first loaded weights-only (refused with a UserError otherwise); the
    model file is checked against ``model`` (the prepared model) when given. The RNG states of this
    process are then set explicitly, because Accelerate only logs a failure to restore them. Returns
    ``meta.json``.
    """
    import random

    import numpy as np
    import torch

    pickles = sorted(f for f in path.iterdir() if f.is_file() and f.suffix not in (".safetensors", ".json"))
    loaded = {f.name: _load_pickle(f) for f in pickles}
    if model is not None:
        _check_model_file(path, model)
    try:
        accelerator.load_state(str(path))
    except RuntimeError as exc:
        if "Error(s) in loading state_dict" not in str(exc):
            raise
        first = " ".join(str(exc).split())[:200]
        raise UserError(
            f"checkpoint {path} was made for a different model ({first}); resume with the run's own config.yaml or start a new --output"
        ) from exc
    states = loaded.get(f"random_states_{accelerator.process_index}.pkl")
    if states is None:
        if accelerator.is_main_process:
            print(
                f"warning: {path} has no RNG state for process {accelerator.process_index} (saved with fewer processes); "
                "data order and augmentation do not depend on it, but dropout-like layers will draw other numbers",
                file=sys.stderr,
            )
    else:
        random.setstate(states["random_state"])
        np.random.set_state(states["numpy_random_seed"])
        torch.set_rng_state(states["torch_manual_seed"])
        if torch.cuda.is_available() and "torch_cuda_manual_seed" in states:
            torch.cuda.set_rng_state_all(states["torch_cuda_manual_seed"])
    return read_meta(path)
