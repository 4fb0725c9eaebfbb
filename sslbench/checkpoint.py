"""Atomic, verifiable checkpoints on top of Accelerate's ``save_state``/``load_state``.

A checkpoint is the directory ``checkpoints/step-00001234/`` written by ``save_state`` (model as
safetensors, optimizer, every process's RNG states) plus ``meta.json`` (step, epoch) and
``manifest.json`` (size and sha256 of every file). It is written under a temporary name and
renamed into place only when complete, so a crash mid-write never leaves a checkpoint that looks
valid. On resume, a checkpoint whose manifest does not match its files (truncated, corrupt) is
skipped with a warning and the one before it is used. Accelerate loads optimizer and RNG files with
``torch.load(weights_only=True)``, so a crafted pickle cannot run code.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

PREFIX = "step-"
TMP_PREFIX = ".tmp-"


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
        if f.stat().st_size != info["size"]:
            return f"{rel} is truncated ({f.stat().st_size} of {info['size']} bytes)"
        if _sha256(f) != info["sha256"]:
            return f"{rel} is corrupt (checksum mismatch)"
    return None


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Finished checkpoints, newest first."""
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith(PREFIX)]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]), reverse=True)


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
    return json.loads((path / "meta.json").read_text())


def save(accelerator: Any, ckpt_dir: Path, step: int, *, keep: int, meta: dict[str, Any]) -> Path:
    """Save the full training state at ``step`` atomically; keep the newest ``keep`` checkpoints."""
    final = ckpt_dir / f"{PREFIX}{step:08d}"
    tmp = ckpt_dir / f"{TMP_PREFIX}{PREFIX}{step:08d}"
    if accelerator.is_main_process:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "meta.json").write_text(json.dumps(meta))
        write_manifest(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(ckpt_dir)
        for old in list_checkpoints(ckpt_dir)[keep:]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in ckpt_dir.glob(f"{TMP_PREFIX}*"):
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load(accelerator: Any, path: Path) -> None:
    accelerator.load_state(str(path))
