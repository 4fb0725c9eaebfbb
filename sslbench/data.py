"""Data specs -> in-memory uint8 splits (or file-backed splits for very large image folders).

A *spec* names where images come from (see :data:`DATASETS`):

- ``digits``: scikit-learn's bundled 8x8 digits, upsampled to 32 px RGB. Offline; the default.
- ``cifar10``, ``cifar100``, ``stl10``: torchvision's files, downloaded once into
  ``cache_dir/<name>``. Files already there are read as they are (no md5 check, so a copy made
  by hand works offline); torchvision checks the md5 when it downloads.
- ``imagefolder:PATH``: ``PATH/train`` plus ``PATH/test`` (or ``PATH/val``), one folder per class.
- ``hf:NAME[?image=COL&label=COL&train=SPLIT&test=SPLIT]``: a Hugging Face dataset, a hub name or
  a directory written by ``save_to_disk``.

Storage size. Every image of a split is stored at ``store_size(image_size)`` pixels square:
``image_size`` below 96, else ``round(image_size / 0.875)`` (room for a 0.875 centre crop at
evaluation, as for ImageNet's 224/256). An image is resized on its shorter side (PIL bilinear,
which is antialiased when shrinking) and centre-cropped; an image already of that size is kept
bit-exact (CIFAR at 32 px stays the original pixels).

Memory. A split whose stored pixels (``N * 3 * store_size**2`` bytes) exceed ``max_memory_gb``
(in units of 1e9 bytes) comes back as a :class:`FileSplit` for ``imagefolder`` specs, decoded per
image by DataLoader workers. The other specs have no per-file form, so they raise a
:class:`~sslbench.errors.UserError` instead of running out of memory.

Cache. Decoded :class:`ImageSplit` objects are cached under ``cache_dir/decoded/`` keyed by the
spec, the source files (paths, sizes, modification times), the split and the storage size, so a
second load reads one file instead of decoding again, and any change to the files decodes anew.
Files are written atomically (:func:`sslbench.rundir.write_atomic`) under a file lock, so processes
started together (one per GPU) decode once.

Unreadable images. In an image folder or a Hugging Face split, a file that PIL cannot decode
(corrupt, truncated, not an image) is *skipped*: one warning line on the ``sslbench.data`` logger
gives how many were skipped and the first one. A benchmark over tens of thousands of images should
not die on one bad download; the count keeps the loss visible. A split with no readable image is an
error. A :class:`FileSplit` cannot check its files up front (that would decode them all), so its
:meth:`FileSplit.open` raises a UserError naming a file that turns out to be unreadable.
"""

from __future__ import annotations

import difflib
import hashlib
import io
import json
import logging
import numbers
import os
import pickle
import re
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from filelock import FileLock
from PIL import Image
from torch import Tensor

from .errors import UserError
from .rundir import write_atomic

__all__ = [
    "DATASETS",
    "FileSplit",
    "ImageSplit",
    "balanced_subset",
    "default_cache_dir",
    "default_image_size",
    "load_split",
    "store_size",
]

logger = logging.getLogger(__name__)

DATASETS: dict[str, str] = {
    "digits": "scikit-learn's 8x8 handwritten digits upsampled to RGB, 16 px by default (1,347 train / 450 test, 10 classes); offline default",
    "cifar10": "CIFAR-10, 32 px (50,000 / 10,000, 10 classes); torchvision download into the cache",
    "cifar100": "CIFAR-100, 32 px (50,000 / 10,000, 100 fine classes); torchvision download into the cache",
    "stl10": "STL-10 labelled splits, 96 px (5,000 / 8,000, 10 classes); torchvision download into the cache",
    "imagefolder:PATH": "PATH/train and PATH/test (or PATH/val), one sub-folder per class",
    "hf:NAME": "Hugging Face dataset (hub name or save_to_disk folder); options ?image=COL&label=COL&train=SPLIT&test=SPLIT",
}

SPLITS = ("train", "test")

#: Training resolution used when none is given: the data's native size (digits: its 8x8 pixels
#: doubled, which keeps the default CPU job to a few minutes; ``--image-size 32`` upsamples more).
NATIVE_IMAGE_SIZE: dict[str, int] = {"digits": 16, "cifar10": 32, "cifar100": 32, "stl10": 96}
#: ... and for image folders and Hugging Face data, whose size is unknown until read.
FALLBACK_IMAGE_SIZE = 32


def default_image_size(spec: str) -> int:
    """The resolution a run on data ``spec`` trains at when ``image_size`` is not given."""
    return NATIVE_IMAGE_SIZE.get(str(spec).strip().lower(), FALLBACK_IMAGE_SIZE)


#: File name endings read as images in an image folder (torchvision's ImageFolder list).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

#: Bump when the decoded pixels for a given source would change, to invalidate old cache files.
_CACHE_VERSION = 1
#: Images decoded per DataLoader item.
_CHUNK = 512
#: Below this many images decoding runs in the calling process (starting workers costs more).
_PARALLEL_MIN_IMAGES = 4096
#: Exceptions that mean "this image cannot be decoded" (PIL raises all of these for bad input).
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


# --------------------------------------------------------------------------------------------
# Splits


@dataclass
class ImageSplit:
    """A split held in memory: ``images`` uint8 (N, 3, H, W), ``labels`` int64 (N,), and the class
    names (``classes[label]``)."""

    images: Tensor
    labels: Tensor
    classes: list[str]

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4 or self.images.shape[1] != 3:
            raise ValueError(f"images must be uint8 (N, 3, H, W), got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.dtype != torch.int64 or self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"labels must be int64 ({self.images.shape[0]},), got {self.labels.dtype} {tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, idx: Tensor) -> ImageSplit:
        """The images at ``idx`` (class list unchanged, so labels keep their meaning)."""
        return ImageSplit(self.images[idx], self.labels[idx], list(self.classes))


@dataclass
class FileSplit:
    """A split too large for memory: ``(path, label)`` pairs, decoded one image at a time.

    ``size`` is the storage size (see :func:`store_size`): :meth:`open` resizes and centre-crops to
    it, so a file-backed split yields the same images an in-memory one would hold. ``None`` keeps
    each image as decoded.
    """

    samples: list[tuple[str, int]]
    classes: list[str]
    size: int | None = None

    @property
    def labels(self) -> Tensor:
        """int64 (N,) labels, in sample order."""
        return torch.tensor([label for _, label in self.samples], dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.samples)

    def subset(self, idx: Tensor) -> FileSplit:
        """The samples at ``idx`` (class list unchanged)."""
        return FileSplit([self.samples[i] for i in idx.tolist()], list(self.classes), self.size)

    def open(self, i: int) -> Image.Image:
        """Decode sample ``i`` as an RGB image (resized to ``size`` when set)."""
        path = self.samples[i][0]
        try:
            img = _open_rgb(path)
        except _DECODE_ERRORS as err:
            raise UserError(f"cannot decode image {path} ({_one_line(err)}); delete or replace the file") from err
        return img if self.size is None else _fit(img, self.size)


# --------------------------------------------------------------------------------------------
# Public helpers


def default_cache_dir() -> Path:
    """Download and decode cache: ``$SSLBENCH_CACHE`` when set, else ``~/.cache/sslbench``."""
    env = os.environ.get("SSLBENCH_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sslbench"


def store_size(image_size: int) -> int:
    """Side length images are stored at for a training ``image_size``: ``image_size`` below 96,
    else ``round(image_size / 0.875)`` (e.g. 224 -> 256)."""
    return image_size if image_size < 96 else round(image_size / 0.875)


def balanced_subset(labels: Tensor, n_or_fraction: int | float, seed: int) -> Tensor:
    """Sorted int64 indices of a class-balanced subset of ``labels``, fixed by ``seed``.

    An ``int`` is a total count, shared as equally as possible among the classes; a class with
    fewer images than its share gives all it has and the rest goes to the others; which classes
    get one extra (when the count does not divide) is drawn with the seed. A ``float`` in (0, 1] is
    a fraction of each class: ``max(1, round(fraction * class_count))`` images per class.
    """
    if labels.dim() != 1:
        raise ValueError(f"labels must be 1-D, got shape {tuple(labels.shape)}")
    n_total = labels.numel()
    value: object = n_or_fraction  # numbers.Integral also admits NumPy integers, which `int | float` does not describe
    is_count = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if is_count and not 1 <= n_or_fraction <= n_total:
        raise UserError(
            f"subset count {n_or_fraction} is outside 1..{n_total} (the split's size); pass a count in that range or a fraction in (0, 1]"
        )
    if not is_count and not (isinstance(n_or_fraction, float) and 0.0 < n_or_fraction <= 1.0):
        raise UserError(f"subset size {n_or_fraction!r} is neither a count 1..{n_total} nor a fraction in (0, 1]; pass e.g. 1000 or 0.1")

    labels = labels.to(torch.int64).cpu()
    gen = torch.Generator().manual_seed(seed)
    members = [torch.nonzero(labels == c).flatten() for c in torch.unique(labels).tolist()]
    avail = [m.numel() for m in members]
    if is_count:
        take = _water_fill(avail, int(n_or_fraction), gen)
    else:
        take = [max(1, int(n_or_fraction * a + 0.5)) for a in avail]

    chosen = [m[torch.randperm(m.numel(), generator=gen)[:k]] for m, k in zip(members, take, strict=True)]
    return torch.sort(torch.cat(chosen)).values if chosen else torch.empty(0, dtype=torch.int64)


def _water_fill(avail: list[int], total: int, gen: torch.Generator) -> list[int]:
    """Per-class counts summing to ``total``, as equal as ``avail`` (per-class caps) allows."""
    take = [0] * len(avail)
    remaining = total
    while remaining > 0:
        open_classes = [c for c in range(len(avail)) if take[c] < avail[c]]
        share = remaining // len(open_classes)
        if share == 0:  # fewer images left than classes: one more each for a seeded draw of classes
            pick = torch.randperm(len(open_classes), generator=gen)[:remaining].tolist()
            for p in pick:
                take[open_classes[p]] += 1
            break
        for c in open_classes:
            add = min(share, avail[c] - take[c])
            take[c] += add
            remaining -= add
    return take


# --------------------------------------------------------------------------------------------
# Entry point


def load_split(
    spec: str,
    split: str,
    image_size: int,
    *,
    cache_dir: str | Path | None = None,
    max_memory_gb: float = 8.0,
    download: bool = True,
) -> ImageSplit | FileSplit:
    """Load the ``split`` ('train' or 'test') of the data set ``spec`` (see :data:`DATASETS`),
    stored at ``store_size(image_size)`` pixels square.

    ``cache_dir`` (default :func:`default_cache_dir`) holds downloads and decoded splits;
    ``download`` allows torchvision to fetch a missing ``cifar10``/``cifar100``/``stl10``.
    Raises :class:`~sslbench.errors.UserError` for a bad spec, split, size or missing data.
    """
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}{_did_you_mean(split, SPLITS)}; valid: {', '.join(SPLITS)}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise UserError(f"image_size must be a positive int, got {image_size!r}")
    if max_memory_gb < 0:
        raise UserError(f"max_memory_gb must be >= 0, got {max_memory_gb}")
    size = store_size(image_size)
    cache_root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    kind, arg = _parse_spec(spec)
    if kind == "imagefolder":
        return _load_imagefolder(arg, split, size, cache_root, max_memory_gb)
    if kind == "hf":
        return _load_hf(arg, split, size, cache_root, max_memory_gb)
    if kind == "digits":
        out = _cached(cache_root, "digits", split, size, {}, lambda: _build_digits(split, size, max_memory_gb))
        _check_memory(len(out), size, max_memory_gb, f"digits {split}")  # also on a cache hit
        return out
    return _load_torchvision(kind, split, size, cache_root, max_memory_gb, download)


def _parse_spec(spec: str) -> tuple[str, str]:
    """``'cifar10'`` -> ``('cifar10', '')``; ``'imagefolder:/x'`` -> ``('imagefolder', '/x')``."""
    valid = ", ".join(DATASETS)
    kind, colon, arg = spec.partition(":")
    if kind in ("imagefolder", "hf"):
        if not arg.strip():
            example = "imagefolder:PATH" if kind == "imagefolder" else "hf:NAME"
            raise UserError(f"data spec {spec!r} needs a {'path' if kind == 'imagefolder' else 'name'}: write {example}")
        return kind, arg.strip()
    if not colon and (kind == "digits" or kind in _TORCHVISION):
        return kind, ""
    names = [name.split(":")[0] for name in DATASETS]
    raise UserError(f"unknown data set {spec!r}{_did_you_mean(kind, names)}; valid: {valid}")


# --------------------------------------------------------------------------------------------
# Decoding and resizing


def _open_rgb(source: str | bytes | dict[str, Any]) -> Image.Image:
    """Fully decode an image (path, encoded bytes, or a Hugging Face ``{'bytes', 'path'}`` dict)
    as RGB. Grayscale, palette and alpha images are converted; raises a ``_DECODE_ERRORS`` error
    for a corrupt or truncated file."""
    if isinstance(source, dict):
        source = source["bytes"] if source.get("bytes") is not None else source["path"]
    fp = io.BytesIO(source) if isinstance(source, bytes) else str(source)
    img: Image.Image  # Pillow types __enter__ as typing.Self, which Python 3.10 (mypy's target) lacks
    with Image.open(fp) as img:
        img.load()  # decode now, so truncation raises here and not later
        if img.mode == "P" and "transparency" in img.info:
            return img.convert("RGBA").convert("RGB")
        if img.mode.startswith("I") or img.mode == "F":
            return _to_8bit_gray(img).convert("RGB")
        return img.convert("RGB")


def _to_8bit_gray(img: Image.Image) -> Image.Image:
    """A 16/32-bit integer or float single-channel image as 8-bit grayscale (Pillow's own
    ``convert`` clips every value above 255, so a 16-bit image would come out white): 16-bit
    ranges (max > 255) are scaled by 255 / 65535, larger integers by 255 / max, floats in [0, 1]
    by 255; anything else is clipped to [0, 255]."""
    import numpy as np

    arr = np.asarray(img).astype(np.float64)
    top = float(arr.max()) if arr.size else 0.0
    if img.mode == "F" and top <= 1.0:
        arr = arr * 255.0
    elif img.mode != "F" and top > 255:
        arr = arr * (255.0 / (65535.0 if top <= 65535 else top))
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")


def _fit(img: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to ``size`` (bilinear, antialiased) and centre-crop to square.
    An image already ``size`` x ``size`` is returned unchanged."""
    w, h = img.size
    if (w, h) == (size, size):
        return img
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.Resampling.BILINEAR)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


def _fit_array(images: np.ndarray, size: int) -> Tensor:
    """uint8 (N, 3, H, W) array -> uint8 (N, 3, size, size) tensor (copied as is when H == W == size)."""
    if images.shape[2:] == (size, size):
        return torch.from_numpy(np.ascontiguousarray(images))
    out = np.empty((images.shape[0], 3, size, size), dtype=np.uint8)
    for i, img in enumerate(images):
        out[i] = np.asarray(_fit(Image.fromarray(img.transpose(1, 2, 0)), size)).transpose(2, 0, 1)
    return torch.from_numpy(out)


#: An item of :class:`_DecodeChunks`: ``(start, images, ok, errors)``.
_Chunk = tuple[int, Tensor, Tensor, list[tuple[int, str]]]


class _DecodeChunks(torch.utils.data.Dataset[_Chunk]):
    """Item ``k``: images ``k*chunk .. (k+1)*chunk`` of ``sources`` decoded and fitted to ``size``,
    as ``(start, images uint8 (n, 3, size, size), ok bool (n,), errors [(index, message)])``.
    Unreadable images are zeros with ``ok`` False."""

    def __init__(self, sources: Sequence[Any], size: int, chunk: int) -> None:
        self.sources, self.size, self.chunk = sources, size, chunk

    def __len__(self) -> int:
        return -(-len(self.sources) // self.chunk)

    def __getitem__(self, k: int) -> _Chunk:
        start = k * self.chunk
        batch = self.sources[start : start + self.chunk]
        images = np.zeros((len(batch), 3, self.size, self.size), dtype=np.uint8)
        ok = np.zeros(len(batch), dtype=bool)
        errors: list[tuple[int, str]] = []
        for j, source in enumerate(batch):
            try:
                images[j] = np.asarray(_fit(_open_rgb(source), self.size)).transpose(2, 0, 1)
                ok[j] = True
            except _DECODE_ERRORS as err:
                errors.append((start + j, _one_line(err)))
        return start, torch.from_numpy(images), torch.from_numpy(ok), errors


def _decode_all(sources: Sequence[Any], size: int) -> tuple[Tensor, Tensor, list[tuple[int, str]]]:
    """Decode every source (in order) with DataLoader workers when there are many.

    Returns ``(images uint8 (N, 3, size, size), ok bool (N,), errors)``; rows that failed are zeros.
    """
    n = len(sources)
    workers = min(_cpu_count(), 8) if n >= _PARALLEL_MIN_IMAGES else 0
    loader = torch.utils.data.DataLoader(_DecodeChunks(sources, size, _CHUNK), batch_size=None, shuffle=False, num_workers=workers)
    images = torch.empty((n, 3, size, size), dtype=torch.uint8)
    ok = torch.empty(n, dtype=torch.bool)
    errors: list[tuple[int, str]] = []
    for start, chunk_images, chunk_ok, chunk_errors in loader:
        images[start : start + len(chunk_ok)] = chunk_images
        ok[start : start + len(chunk_ok)] = chunk_ok
        errors.extend(chunk_errors)
    return images, ok, errors


def _decode_split(sources: Sequence[Any], labels: Tensor, classes: list[str], size: int, names: Callable[[int], str], where: str) -> ImageSplit:
    """Decode ``sources`` into an :class:`ImageSplit`, skipping (and reporting once) unreadable ones."""
    logger.info("decoding %d images from %s at %d px", len(sources), where, size)
    images, ok, errors = _decode_all(sources, size)
    if errors:
        index, message = errors[0]
        if not ok.any():  # (raised before the warning: a failing command prints one line)
            raise UserError(f"no readable image in {where} (first failure: {names(index)}: {message}); check the files")
        note = f"skipped {len(errors)} unreadable image(s) in {where}; first: {names(index)} ({message})"
        _warn_skipped(note)
        split = ImageSplit(images[ok], labels[ok], classes)
        split.skipped_note = note  # type: ignore[attr-defined]  # kept in the decode cache, repeated on a cache hit
        return split
    return ImageSplit(images, labels, classes)


_WARNED: set[str] = set()


def _warn_skipped(note: str) -> None:
    """The skipped-images warning, once per process (a split is read again for the k-NN)."""
    if note not in _WARNED:
        _WARNED.add(note)
        logger.warning("%s", note)


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _check_memory(n: int, size: int, max_memory_gb: float, what: str) -> None:
    """UserError when ``n`` images at ``size`` px exceed ``max_memory_gb`` (no file-backed form)."""
    need = n * 3 * size * size / 1e9
    if need > max_memory_gb:
        raise UserError(
            f"{what} needs {need:.3g} GB in memory at {size} px, more than max_memory_gb={max_memory_gb:g}; "
            "raise max_memory_gb, lower image_size, or export it as an image folder and use imagefolder:PATH"
        )


# --------------------------------------------------------------------------------------------
# Decoded-split cache


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
        payload = {"images": result.images, "labels": result.labels, "classes": result.classes,
                   "skipped_note": getattr(result, "skipped_note", "")}
        write_atomic(path, lambda tmp: torch.save(payload, tmp),
                     "free some space, or set cache_dir or $SSLBENCH_CACHE to another disk", errors=(OSError, RuntimeError))
    return result


def _read_cache(path: Path) -> ImageSplit | None:
    """The split stored at ``path``, or None when absent or unreadable (then it is rebuilt)."""
    if not path.is_file():
        return None
    try:
        data = torch.load(path, weights_only=True)
        split = ImageSplit(data["images"], data["labels"], list(data["classes"]))
        if data.get("skipped_note"):
            _warn_skipped(data["skipped_note"])
        return split
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, KeyError, TypeError, ValueError) as err:
        logger.warning("ignoring unreadable cache file %s (%s); decoding again", path, _one_line(err))
        return None


# --------------------------------------------------------------------------------------------
# digits


def _build_digits(split: str, size: int, max_memory_gb: float) -> ImageSplit:
    """scikit-learn's digits, 8x8 values 0..16 -> 32 px RGB uint8 (bilinear), fitted to ``size``;
    split stratified 75/25 with ``random_state=0``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    index = np.arange(len(digits.target))
    train_idx, test_idx = train_test_split(index, test_size=0.25, random_state=0, stratify=digits.target)
    idx = np.sort(train_idx if split == "train" else test_idx)
    _check_memory(len(idx), size, max_memory_gb, f"digits {split}")
    small = torch.from_numpy(digits.images[idx]).float().unsqueeze(1)  # (N, 1, 8, 8), 0..16
    big = F.interpolate(small, size=(32, 32), mode="bilinear", align_corners=False)
    gray = (big * (255.0 / 16.0)).round().clamp(0, 255).to(torch.uint8)
    images = gray.expand(-1, 3, -1, -1).numpy()
    labels = torch.from_numpy(digits.target[idx]).to(torch.int64)
    return ImageSplit(_fit_array(images, size), labels, [str(d) for d in range(10)])


# --------------------------------------------------------------------------------------------
# torchvision data sets (cifar10, cifar100, stl10)


@dataclass(frozen=True)
class _TorchvisionSet:
    """Where torchvision puts a data set and how to read its files without md5 checks."""

    folder: str  # under cache_dir/<name>/
    files: dict[str, tuple[str, ...]]  # split -> files that must exist
    read: Callable[[Path, str], tuple[np.ndarray, np.ndarray, list[str]]]  # (folder, split) -> NCHW, labels, classes
    fetch: Callable[[Path, str], object]  # (root, split) -> torchvision dataset, downloading


def _read_cifar(
    label_key: str, meta_file: str, meta_key: str, split_files: dict[str, tuple[str, ...]]
) -> Callable[[Path, str], tuple[np.ndarray, np.ndarray, list[str]]]:
    """Reader for the pickled CIFAR batches (the 'python version' torchvision downloads)."""

    def read(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
        data, labels = [], []
        for name in split_files[split]:
            entry = _unpickle(folder / name)
            data.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.extend(entry[label_key])
        classes = [str(c) for c in _unpickle(folder / meta_file)[meta_key]]
        return np.concatenate(data), np.asarray(labels, dtype=np.int64), classes

    return read


def _unpickle(path: Path) -> dict[str, Any]:
    with open(path, "rb") as f:
        entry: dict[str, Any] = pickle.load(f, encoding="latin1")
        return entry


def _read_stl10(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """STL-10 binaries: uint8 images stored column-major (N, 3, 96, 96), labels 1..10."""
    images = np.fromfile(folder / f"{split}_X.bin", dtype=np.uint8).reshape(-1, 3, 96, 96).transpose(0, 1, 3, 2)
    labels = np.fromfile(folder / f"{split}_y.bin", dtype=np.uint8).astype(np.int64) - 1
    classes = (folder / "class_names.txt").read_text().split()
    return images, labels, classes


def _fetch_torchvision(name: str) -> Callable[[Path, str], object]:
    def fetch(root: Path, split: str) -> object:
        import torchvision.datasets as tvd

        if name == "stl10":
            return tvd.STL10(str(root), split=split, download=True)
        cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
        return cls(str(root), train=split == "train", download=True)

    return fetch


_CIFAR10_FILES: dict[str, tuple[str, ...]] = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
_CIFAR100_FILES: dict[str, tuple[str, ...]] = {"train": ("train",), "test": ("test",)}
_TORCHVISION: dict[str, _TorchvisionSet] = {
    "cifar10": _TorchvisionSet(
        "cifar-10-batches-py",
        {s: (*f, "batches.meta") for s, f in _CIFAR10_FILES.items()},
        _read_cifar("labels", "batches.meta", "label_names", _CIFAR10_FILES),
        _fetch_torchvision("cifar10"),
    ),
    "cifar100": _TorchvisionSet(
        "cifar-100-python",
        {s: (*f, "meta") for s, f in _CIFAR100_FILES.items()},
        _read_cifar("fine_labels", "meta", "fine_label_names", _CIFAR100_FILES),
        _fetch_torchvision("cifar100"),
    ),
    "stl10": _TorchvisionSet(
        "stl10_binary",
        {s: (f"{s}_X.bin", f"{s}_y.bin", "class_names.txt") for s in SPLITS},
        _read_stl10,
        _fetch_torchvision("stl10"),
    ),
}


def _load_torchvision(name: str, split: str, size: int, cache_root: Path, max_memory_gb: float, download: bool) -> ImageSplit:
    """Read torchvision's files from ``cache_root/name`` (downloading them first when missing)."""
    tv = _TORCHVISION[name]
    root = cache_root / name
    folder = root / tv.folder
    files = [folder / f for f in tv.files[split]]
    hint = f"put the torchvision-format files ({', '.join(tv.files[split])}) in {folder}, or use imagefolder:PATH with a local image-folder copy"
    if not all(f.is_file() for f in files):
        if not download:
            raise UserError(f"{name} not found in {folder} and download is off; allow the download or {hint}")
        try:
            tv.fetch(root, split)
        except Exception as err:  # network, disk, checksum: all end the same way for the user
            raise UserError(f"could not download {name} into {root} ({_one_line(err)}); to work offline {hint}") from err
        if not all(f.is_file() for f in files):
            raise UserError(f"{name} download finished but files are missing in {folder}; delete {root} and retry, or {hint}")

    def build() -> ImageSplit:
        try:
            images, labels, classes = tv.read(folder, split)
        except (OSError, ValueError, KeyError, EOFError, pickle.UnpicklingError) as err:
            raise UserError(f"cannot read {name} files in {folder} ({_one_line(err)}); delete {root} to download again") from err
        _check_memory(len(labels), size, max_memory_gb, f"{name} {split}")
        return ImageSplit(_fit_array(images, size), torch.from_numpy(labels), classes)

    out = _cached(cache_root, f"{name}:{folder.resolve()}", split, size, _fingerprint([str(f.resolve()) for f in files]), build)
    _check_memory(len(out), size, max_memory_gb, f"{name} {split}")  # also on a cache hit
    return out


# --------------------------------------------------------------------------------------------
# imagefolder:PATH


def _load_imagefolder(arg: str, split: str, size: int, cache_root: Path, max_memory_gb: float) -> ImageSplit | FileSplit:
    """``PATH/train`` and ``PATH/test`` (or ``PATH/val``), one folder per class (sorted names)."""
    root = Path(arg).expanduser().resolve()
    if not root.is_dir():
        raise UserError(f"image folder {root} does not exist; imagefolder:PATH needs PATH/train and PATH/test with one sub-folder per class")
    train_dir = root / "train"
    test_dir = next((root / d for d in ("test", "val") if (root / d).is_dir()), None)
    if not train_dir.is_dir() or test_dir is None:
        missing = "train" if not train_dir.is_dir() else "test (or val)"
        raise UserError(f"image folder {root} has no {missing} folder; expected {root}/train/<class>/<image> and {root}/test/<class>/<image>")
    train_classes, test_classes = _class_folders(train_dir), _class_folders(test_dir)
    if train_classes != test_classes:
        only_train = sorted(set(train_classes) - set(test_classes))
        only_test = sorted(set(test_classes) - set(train_classes))
        raise UserError(
            f"class folders differ between {train_dir} and {test_dir} (only in train: {only_train or 'none'}; "
            f"only in {test_dir.name}: {only_test or 'none'}); give both splits the same class folders"
        )
    split_dir = train_dir if split == "train" else test_dir
    classes = train_classes
    files: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        found = _image_files(split_dir / name)
        if not found:
            raise UserError(
                f"class folder {split_dir / name} has no images ({', '.join(IMAGE_EXTENSIONS)}); add images or remove the folder from both splits"
            )
        files.extend(found)
        labels.extend([label] * len(found))

    if len(files) * 3 * size * size / 1e9 > max_memory_gb:
        logger.info("%s: %d images at %d px exceed max_memory_gb=%g; reading them per image", split_dir, len(files), size, max_memory_gb)
        return FileSplit(list(zip(files, labels, strict=True)), classes, size)

    def build() -> ImageSplit:
        return _decode_split(files, torch.tensor(labels, dtype=torch.int64), classes, size, lambda i: files[i], str(split_dir))

    return _cached(cache_root, f"imagefolder:{split_dir}", split, size, _fingerprint(files), build)


def _class_folders(split_dir: Path) -> list[str]:
    """Sorted names of the (non-hidden) class folders in ``split_dir``."""
    classes = sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise UserError(f"{split_dir} has no class folders; expected {split_dir}/<class>/<image> with one sub-folder per class")
    return classes


def _image_files(folder: Path | str) -> list[str]:
    """Paths of the image files under ``folder`` (recursively, sorted, hidden entries skipped)."""
    found: list[str] = []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            found.extend(_image_files(entry.path))
        elif entry.name.lower().endswith(IMAGE_EXTENSIONS):
            found.append(entry.path)
    return found


# --------------------------------------------------------------------------------------------
# hf:NAME


_HF_OPTIONS = ("image", "label", "train", "test")
_HF_LABEL_NAMES = ("label", "labels", "fine_label")


class _HFImages(Sequence[Any]):
    """One image column of a Hugging Face dataset as a sequence of undecoded ``{'bytes', 'path'}``
    dicts (decoded by :func:`_open_rgb`, so bad images are skipped like bad files)."""

    def __init__(self, ds: Any, column: str) -> None:
        self.ds, self.column = ds, column

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, index: Any) -> Any:  # int -> one item, slice -> list (read as one batch)
        return list(self.ds[index][self.column]) if isinstance(index, slice) else self.ds[index][self.column]


def _load_hf(arg: str, split: str, size: int, cache_root: Path, max_memory_gb: float) -> ImageSplit:
    """A Hugging Face dataset: a ``save_to_disk`` directory or a hub name, see :data:`DATASETS`."""
    import datasets

    name, _, query = arg.partition("?")
    try:
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError as err:
        raise UserError(f"bad options {query!r} in hf:{arg}; write hf:NAME?image=COL&label=COL&train=SPLIT&test=SPLIT") from err
    options: dict[str, str] = {}
    for key, value in pairs:
        if key not in _HF_OPTIONS:
            raise UserError(f"unknown option {key!r} in hf:{arg}{_did_you_mean(key, _HF_OPTIONS)}; valid: {', '.join(_HF_OPTIONS)}")
        options[key] = value

    local = Path(name).expanduser()
    from .hub import hub_access, offline_reason

    with hub_access() as offline:
        try:
            dsd = datasets.load_from_disk(str(local)) if local.is_dir() else datasets.load_dataset(name)
        except Exception as err:  # hub, network, format: all mean "cannot load this name"
            reason = None if local.is_dir() else offline_reason(err, offline)
            if reason is not None:
                raise UserError(
                    f"cannot load Hugging Face dataset {name!r} ({reason}); where there is a network run "
                    f"python -c \"import datasets; datasets.load_dataset('{name}').save_to_disk('DIR')\", copy DIR here "
                    "and pass --data hf:DIR (or use imagefolder:PATH)"
                ) from err
            raise UserError(f"could not load Hugging Face dataset {name!r} ({_one_line(err)[:200]}); give a hub name or a save_to_disk directory") from err
    if not isinstance(dsd, datasets.DatasetDict):
        raise UserError(f"hf:{name} is a single split without names; save a DatasetDict with 'train' and 'test' splits")

    wanted = options.get(split) or ("train" if split == "train" else next((s for s in ("test", "validation") if s in dsd), "test"))
    if wanted not in dsd:
        raise UserError(f"hf:{name} has no split {wanted!r}{_did_you_mean(wanted, list(dsd))}; splits: {', '.join(dsd)}; choose with ?{split}=SPLIT")
    ds = dsd[wanted]
    image_col = options.get("image") or _hf_column(ds, name, "image", lambda f: isinstance(f, datasets.Image), ())
    label_col = options.get("label") or _hf_column(ds, name, "label", lambda f: isinstance(f, datasets.ClassLabel), _HF_LABEL_NAMES)
    for role, col in (("image", image_col), ("label", label_col)):
        if col not in ds.column_names:
            raise UserError(
                f"hf:{name} split {wanted!r} has no column {col!r}{_did_you_mean(col, ds.column_names)}; columns: {', '.join(ds.column_names)}; choose with ?{role}=COLUMN"
            )
    ds = ds.select_columns([image_col, label_col])
    if isinstance(ds.features[image_col], datasets.Image):
        ds = ds.cast_column(image_col, datasets.Image(decode=False))

    label_feature = ds.features[label_col]
    raw_labels = list(ds[label_col])
    if isinstance(label_feature, datasets.ClassLabel):
        classes = [str(c) for c in label_feature.names]
        labels = torch.tensor(raw_labels, dtype=torch.int64)
        if labels.numel() and int(labels.min()) < 0:
            raise UserError(f"hf:{name} split {wanted!r} has unlabelled rows (label -1); choose a labelled split with ?{split}=SPLIT")
    else:  # plain values: the classes are the sorted distinct values over all splits
        values = sorted({v for s in dsd.values() if label_col in s.column_names for v in list(s[label_col])})
        classes = [str(v) for v in values]
        position = {v: i for i, v in enumerate(values)}
        labels = torch.tensor([position[v] for v in raw_labels], dtype=torch.int64)
    if len(ds) == 0:
        raise UserError(f"hf:{name} split {wanted!r} is empty; choose another with ?{split}=SPLIT")
    _check_memory(len(ds), size, max_memory_gb, f"hf:{name} {wanted}")

    def build() -> ImageSplit:
        return _decode_split(_HFImages(ds, image_col), labels, classes, size, lambda i: f"row {i}", f"hf:{name} split {wanted!r}")

    cache_files = [str(Path(f["filename"]).resolve()) for f in dsd[wanted].cache_files]
    if not cache_files:  # an in-memory dataset has no files to key a cache on
        return build()
    source = f"hf:{local.resolve() if local.is_dir() else name}?image={image_col}&label={label_col}&split={wanted}"
    return _cached(cache_root, source, split, size, _fingerprint(cache_files), build)


def _hf_column(ds: Any, name: str, role: str, is_kind: Callable[[Any], bool], names: tuple[str, ...]) -> str:
    """Pick the ``role`` column: the single one of the right feature type, else a conventional name."""
    typed: list[str] = [c for c, f in ds.features.items() if is_kind(f)]
    if len(typed) == 1:
        return typed[0]
    named = [c for c in names if c in (typed or ds.column_names)]
    if named:
        return named[0]
    raise UserError(f"hf:{name}: cannot tell which column holds the {role} (columns: {', '.join(ds.column_names)}); name it with ?{role}=COLUMN")


# --------------------------------------------------------------------------------------------
# Messages


def _did_you_mean(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(word.lower(), list(choices), n=3, cutoff=0.6)
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""


def _one_line(err: BaseException) -> str:
    """An exception as one short line (type and message, whitespace collapsed)."""
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}"[:300] if text else type(err).__name__
