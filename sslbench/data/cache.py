"""Decoded splits for :mod:`sslbench.data` (private): decoding a list of sources into an
:class:`~sslbench.data.ImageSplit` (skipping and reporting unreadable images) and the on-disk
cache of decoded splits under ``cache_dir/decoded/``, written atomically under a file lock.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock
from torch import Tensor

from sslbench.core.errors import UserError
from sslbench.core.rundir import write_atomic
from sslbench.data.decode import _decode_all, _one_line, median_side
from sslbench.data.splits import ImageSplit

#: The one logger of the data modules (named ``sslbench.data`` whichever module logs).
logger = logging.getLogger("sslbench.data")

#: Bump when the decoded pixels for a given source would change, to invalidate old cache files.
_CACHE_VERSION = 1


def _decode_split(sources: Sequence[Any], labels: Tensor, classes: list[str], size: int, names: Callable[[int], str], where: str) -> ImageSplit:
    """Decode ``sources`` into an :class:`ImageSplit`, skipping (and reporting once) unreadable ones."""
    logger.info("decoding %d images from %s at %d px", len(sources), where, size)
    images, ok, sides, errors = _decode_all(sources, size)
    if errors:
        index, message = errors[0]
        if not ok.any():  # (raised before the warning: a failing command prints one line)
            raise UserError(f"no readable image in {where} (first failure: {names(index)}: {message}); check the files")
        note = f"skipped {len(errors)} unreadable image(s) in {where}; first: {names(index)} ({message})"
        _warn_skipped(note)
        split = ImageSplit(images[ok], labels[ok], classes, median_side(sides[ok]))
        split.skipped_note = note  # type: ignore[attr-defined]  # kept in the decode cache, repeated on a cache hit
        return split
    return ImageSplit(images, labels, classes, median_side(sides))


_WARNED: set[str] = set()


def _warn_skipped(note: str) -> None:
    """The skipped-images warning, once per process (a split is read again for the k-NN)."""
    if note not in _WARNED:
        _WARNED.add(note)
        logger.warning("%s", note)


def _fingerprint(files: Sequence[str]) -> dict[str, Any]:
    """Identity of a set of files (absolute paths): count, newest mtime, and a hash over
    (path, size, mtime) of each, so an added, removed, renamed or rewritten file changes it."""
    digest = hashlib.sha256()
    newest = 0
    for f in files:
        st = os.stat(f)
        newest = max(newest, st.st_mtime_ns)
        digest.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return {"count": len(files), "newest_mtime_ns": newest, "files_sha256": digest.hexdigest()}


def _cached(cache_root: Path, source: str, split: str, size: int, fingerprint: dict[str, Any], build: Callable[[], ImageSplit]) -> ImageSplit:
    """Return the cached decoded split for this key, or ``build()`` it and cache it atomically."""
    key = json.dumps({"v": _CACHE_VERSION, "source": source, "split": split, "size": size, **fingerprint}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    readable = re.sub(r"[^A-Za-z0-9]+", "_", source).strip("_")[-40:] or "data"
    path = cache_root / "decoded" / f"{readable}-{split}-{size}px-{digest}.pt"
    hit = _read_cache(path)
    if hit is not None:
        return hit
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(str(path) + ".lock", os.O_RDWR | os.O_CREAT, 0o644))  # a clear error here, not a lock wait
    except OSError as err:
        raise UserError(
            f"cannot write the data cache {path.parent} ({err.strerror or err}); set cache_dir or $SSLBENCH_CACHE to a writable place"
        ) from err
    with FileLock(str(path) + ".lock"):
        hit = _read_cache(path)  # another process may have written it while we waited
        if hit is not None:
            return hit
        result = build()
        payload = {
            "images": result.images,
            "labels": result.labels,
            "classes": result.classes,
            "skipped_note": getattr(result, "skipped_note", ""),
            "source_side": result.source_side,
        }
        write_atomic(
            path,
            lambda tmp: torch.save(payload, tmp),
            "free some space, or set cache_dir or $SSLBENCH_CACHE to another disk",
            errors=(OSError, RuntimeError),
        )
    return result


def _read_cache(path: Path) -> ImageSplit | None:
    """The split stored at ``path``, or None when absent or unreadable (then it is rebuilt)."""
    if not path.is_file():
        return None
    try:
        data = torch.load(path, weights_only=True)
        side = data.get("source_side")  # (absent from files cached before it was recorded: unknown)
        split = ImageSplit(data["images"], data["labels"], list(data["classes"]), int(side) if side is not None else None)
        if data.get("skipped_note"):
            _warn_skipped(data["skipped_note"])
        return split
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, KeyError, TypeError, ValueError) as err:
        logger.warning("ignoring unreadable cache file %s (%s); decoding again", path, _one_line(err))
        return None
