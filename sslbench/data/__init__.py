"""Data specs -> in-memory uint8 splits (or file-backed splits for very large image folders).

A *spec* names where images come from (see :func:`data_sources`):

- ``digits``: scikit-learn's bundled 8x8 digits, upsampled to 32 px RGB. Offline; the default.
- ``cifar10``, ``cifar100``, ``stl10``, ``fashion-mnist``: torchvision's files, downloaded once into
  ``cache_dir/<name>`` (Fashion-MNIST is read from ``/usr/share/datasets/fashion-mnist`` first,
  where Debian's ``dataset-fashion-mnist`` package installs it). Files already there are read as they are (no md5 check, so a copy made
  by hand works offline); torchvision checks the md5 when it downloads.
- ``imagefolder:PATH``: ``PATH/train`` plus ``PATH/test`` (or ``PATH/val``), one folder per class.
- ``hf:NAME[?image=COL&label=COL&train=SPLIT&test=SPLIT&...]``: a Hugging Face dataset: a hub
  name (``?config=CONFIG``), a ``save_to_disk`` directory, a parquet/CSV/JSON/arrow file or a folder
  of them, or an image folder (datasets' ``imagefolder`` builder); a data set with one split gets a
  seeded, class-balanced held-out test split. See :mod:`sslbench.data.hf`.
- ``shards:DIR``: tar shards written by ``sslbench shard`` (WebDataset layout and an index), read
  per sample by DataLoader workers, in the order of the images they were written from. See
  :mod:`sslbench.data.shards`.

Storage size. Every image of a split is stored at ``store_size(image_size)`` pixels square:
``image_size`` below 96, else ``round(image_size / 0.875)`` (room for a 0.875 centre crop at
evaluation, as for ImageNet's 224/256). An image is resized on its shorter side (PIL bilinear,
which is antialiased when shrinking) and centre-cropped; an image already of that size is kept
bit-exact (CIFAR at 32 px stays the original pixels).

Memory. A split whose stored pixels (``N * 3 * store_size**2`` bytes) exceed ``max_memory_gb``
(in units of 1e9 bytes) comes back as a :class:`FileSplit` for ``imagefolder`` specs, decoded per
image by DataLoader workers. The other specs have no per-file form, so they raise a
:class:`~sslbench.core.errors.UserError` instead of running out of memory.

Cache. Decoded :class:`ImageSplit` objects are cached under ``cache_dir/decoded/`` keyed by the
spec, the source files (paths, sizes, modification times), the split and the storage size, so a
second load reads one file instead of decoding again, and any change to the files decodes anew.
Files are written atomically (:func:`sslbench.core.rundir.write_atomic`) under a file lock, so processes
started together (one per GPU) decode once.

Unreadable images. In an image folder or a Hugging Face split, a file that PIL cannot decode
(corrupt, truncated, not an image) is *skipped*: one warning line on the ``sslbench.data`` logger
gives how many were skipped and the first one. A benchmark over tens of thousands of images should
not die on one bad download; the count keeps the loss visible. A split with no readable image is an
error. A :class:`FileSplit` cannot check its files up front (that would decode them all), so its
:meth:`FileSplit.open` raises a UserError naming a file that turns out to be unreadable.

Layout: this module holds the data-set list, the public helpers and :func:`load_split`; the split
types are in :mod:`sslbench.data.splits`, image decoding in :mod:`sslbench.data.decode`, the
decoded-split cache in :mod:`sslbench.data.cache` and the per-source loaders in
:mod:`sslbench.data.sources` (their public names are re-exported here).
"""

from __future__ import annotations

import logging
import numbers
from pathlib import Path

import torch
from torch import Tensor

from sslbench.core.errors import UserError
from sslbench.core.rundir import default_cache_dir as default_cache_dir  # (defined with the other paths; re-exported)
from sslbench.data.cache import _read_cache as _read_cache  # re-exported (tests)
from sslbench.data.decode import IMAGE_EXTENSIONS as IMAGE_EXTENSIONS
from sslbench.data.decode import _did_you_mean
from sslbench.data.decode import _fit as _fit  # re-exported (sslbench.evaluation.features, sslbench.api.fit_image)
from sslbench.data.decode import _open_rgb as _open_rgb  # re-exported (tests)
from sslbench.data.sources import DATA_SOURCES, DataSource, register_data_source
from sslbench.data.splits import SPLITS as SPLITS
from sslbench.data.splits import FileSplit, ImageSplit

__all__ = [
    "DATA_SOURCES",
    "DataSource",
    "FileSplit",
    "ImageSplit",
    "balanced_subset",
    "default_cache_dir",
    "default_image_size",
    "data_sources",
    "load_split",
    "parse_spec",
    "register_data_source",
    "store_size",
]

logger = logging.getLogger(__name__)

#: The training resolution of data whose source names none (image folders, Hugging Face data:
#: their size is unknown until read).
FALLBACK_IMAGE_SIZE = 32


def data_sources() -> dict[str, str]:
    """How each registered data source's spec is written -> its one-line description, in
    registration order: ``{"digits": ..., "imagefolder:PATH": ..., "hf:NAME": ...}``."""
    return {source.spec: source.description for source in DATA_SOURCES.in_order()}


def default_image_size(spec: str) -> int:
    """The resolution a run on data ``spec`` trains at when ``image_size`` is not given: its
    source's native size (digits 16, fashion-mnist 28, cifar 32, stl10 96), else ``FALLBACK_IMAGE_SIZE``."""
    name = str(spec).strip().partition(":")[0].lower()
    source = DATA_SOURCES.get(name) if name in DATA_SOURCES else None
    return source.image_size if source is not None and source.image_size is not None else FALLBACK_IMAGE_SIZE


# --------------------------------------------------------------------------------------------
# Public helpers


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
    """Load the ``split`` ('train' or 'test') of the data set ``spec`` (see :func:`data_sources`),
    stored at ``store_size(image_size)`` pixels square.

    ``cache_dir`` (default :func:`default_cache_dir`) holds downloads and decoded splits;
    ``download`` allows torchvision to fetch a missing ``cifar10``/``cifar100``/``stl10``/``fashion-mnist``.
    Raises :class:`~sslbench.core.errors.UserError` for a bad spec, split, size or missing data.
    """
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}{_did_you_mean(split, SPLITS)}; valid: {', '.join(SPLITS)}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise UserError(f"image_size must be a positive int, got {image_size!r}")
    if max_memory_gb < 0:
        raise UserError(f"max_memory_gb must be >= 0, got {max_memory_gb}")
    size = store_size(image_size)
    cache_root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    source, arg = parse_spec(spec)
    return source.load(arg, split, size, cache_root, max_memory_gb, download)


def parse_spec(spec: str) -> tuple[DataSource, str]:
    """``'cifar10'`` -> (the cifar10 source, ``''``); ``'imagefolder:/x'`` -> (the imagefolder source, ``'/x'``)."""
    name, colon, arg = spec.partition(":")
    source = DATA_SOURCES.get(name) if name in DATA_SOURCES else None
    if source is not None and source.arg is not None:
        if not arg.strip():
            what = source.arg.lower() if source.arg in ("PATH", "NAME") else f"{source.arg} argument"
            raise UserError(f"data spec {spec!r} needs a {what}: write {source.spec}")
        return source, arg.strip()
    if source is not None and not colon:
        return source, ""
    valid = ", ".join(data_sources())
    raise UserError(f"unknown data set {spec!r}{_did_you_mean(name, DATA_SOURCES.names())}; valid: {valid}")
