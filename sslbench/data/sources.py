"""The data-source registry and the built-in sources of :mod:`sslbench.data`: ``digits``, the
torchvision sets (``cifar10``, ``cifar100``, ``stl10``, ``fashion-mnist``), ``imagefolder:PATH``
and ``hf:NAME``.

A data source is one kind of data spec: its name alone (``cifar10``) or its name, a colon and an
argument (``imagefolder:PATH``). Its loader returns the requested split decoded (through the
cache) or, for a large image folder, a :class:`~sslbench.data.FileSplit`. A third-party source is
one registration (:func:`register_data_source`, found through the entry-point group
``sslbench.data_sources``), after which ``--data yourprefix:ARG`` dispatches to it.
"""

from __future__ import annotations

import gzip
import logging
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from sslbench.core.errors import UserError
from sslbench.core.registry import Registry
from sslbench.data.cache import _cached, _decode_split, _fingerprint
from sslbench.data.decode import IMAGE_EXTENSIONS, _fit_array, _one_line
from sslbench.data.splits import SPLITS, FileSplit, ImageSplit, _check_memory

DATA_SOURCES_ENTRY_POINT_GROUP = "sslbench.data_sources"

#: ``load(arg, split, size, cache_root, max_memory_gb, download)``: ``arg`` is what follows
#: ``name:`` in the spec ('' for a source without an argument), ``split`` 'train' or 'test',
#: ``size`` the side every image is stored at (:func:`sslbench.data.store_size`), ``cache_root`` the
#: folder for downloads and decoded splits, ``download`` whether fetching missing files is allowed.
Loader = Callable[[str, str, int, Path, float, bool], ImageSplit | FileSplit]


@dataclass(frozen=True)
class DataSource:
    """One kind of data spec: ``name`` or ``name:ARG``."""

    name: str
    load: Loader
    description: str  # one line for `sslbench list data-sources` and the unknown-spec error
    arg: str | None = None  # what follows "name:" ("PATH"); None: the spec is the name alone
    image_size: int | None = None  # the native training resolution; None: the fallback (32 px)

    @property
    def spec(self) -> str:
        """How a spec of this source is written: ``cifar10``, ``imagefolder:PATH``."""
        return f"{self.name}:{self.arg}" if self.arg else self.name


def _check_source(name: str, source: DataSource) -> None:
    if not isinstance(source, DataSource):
        raise TypeError(f"data source {name!r}: {source!r} must be an sslbench.api.DataSource (use @register_data_source)")
    if not name or not name.replace("_", "").replace("-", "").isalnum():
        raise TypeError(f"data source {name!r}: a name is letters, digits, '-' and '_' (it is the prefix before ':' in --data)")


#: Every data source, in registration order (the built-ins below first).
DATA_SOURCES: Registry[DataSource] = Registry(
    "data source",
    DATA_SOURCES_ENTRY_POINT_GROUP,
    ("sslbench.data.sources", "sslbench.data.shards"),
    check=_check_source,
    same=lambda a, b: a.spec == b.spec and a.load.__qualname__ == b.load.__qualname__,
    ordered=True,
)


def register_data_source(name: str, *, description: str, arg: str | None = None, image_size: int | None = None) -> Callable[[Loader], Loader]:
    """Decorator registering ``load`` (see :data:`Loader`) as the data source ``name``: ``--data
    name`` (``arg=None``) or ``--data name:ARG`` (``arg`` names what follows the colon, e.g. "PATH")."""

    def deco(load: Loader) -> Loader:
        DATA_SOURCES.add(name, DataSource(name, load, description, arg, image_size))
        return load

    return deco


#: The one logger of the data modules (named ``sslbench.data`` whichever module logs).
logger = logging.getLogger("sslbench.data")


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
    return ImageSplit(_fit_array(images, size), labels, [str(d) for d in range(10)], source_side=8)  # (the 8x8 originals)


# --------------------------------------------------------------------------------------------
# torchvision data sets (cifar10, cifar100, stl10)


@dataclass(frozen=True)
class _TorchvisionSet:
    """Where torchvision puts a data set and how to read its files without md5 checks."""

    folder: str  # under cache_dir/<name>/
    files: dict[str, tuple[str, ...]]  # split -> files that must exist
    read: Callable[[Path, str], tuple[np.ndarray, np.ndarray, list[str]]]  # (folder, split) -> NCHW, labels, classes
    fetch: Callable[[Path, str], object]  # (root, split) -> torchvision dataset, downloading
    system: str | None = None  # a folder a distribution package installs the same files into, read first when complete


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


#: Fashion-MNIST's classes in label order (zalandoresearch/fashion-mnist README, "Labels").
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
_FASHION_MNIST_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (LeCun's MNIST format; gzip-compressed when the name ends in .gz): magic bytes 0,
    0, type code 0x08 (unsigned byte), the number of dimensions, then each dimension as a big-endian
    uint32 and the data, row-major."""
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path.name} is not an unsigned-byte IDX file (magic {raw[:4].hex()})")
    ndim = raw[3]
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    size = int(np.prod(shape))
    if len(raw) != 4 + 4 * ndim + size:
        raise ValueError(f"{path.name} holds {len(raw) - 4 - 4 * ndim} bytes of data for shape {shape}")
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _read_fashion_mnist(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Fashion-MNIST's IDX files: 28x28 grey images, repeated into RGB (N, 3, 28, 28); labels 0..9."""
    images, labels = (read_idx(folder / name) for name in _FASHION_MNIST_FILES[split])
    if images.ndim != 3 or labels.shape != images.shape[:1]:
        raise ValueError(f"images {images.shape} and labels {labels.shape} do not match")
    return np.repeat(images[:, None], 3, axis=1), labels.astype(np.int64), list(FASHION_MNIST_CLASSES)


def _fetch_torchvision(name: str) -> Callable[[Path, str], object]:
    def fetch(root: Path, split: str) -> object:
        import torchvision.datasets as tvd

        if name == "stl10":
            return tvd.STL10(str(root), split=split, download=True)
        if name == "fashion-mnist":  # keeps the downloaded .gz files in root/FashionMNIST/raw
            return tvd.FashionMNIST(str(root), train=split == "train", download=True)
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
    "fashion-mnist": _TorchvisionSet(
        "FashionMNIST/raw",
        dict(_FASHION_MNIST_FILES),
        _read_fashion_mnist,
        _fetch_torchvision("fashion-mnist"),
        system="/usr/share/datasets/fashion-mnist",  # Debian's and Ubuntu's dataset-fashion-mnist package
    ),
}


def _load_torchvision(name: str, split: str, size: int, cache_root: Path, max_memory_gb: float, download: bool) -> ImageSplit:
    """Read torchvision's files from ``cache_root/name`` (downloading them first when missing)."""
    tv = _TORCHVISION[name]
    root = cache_root / name
    folder = root / tv.folder
    if tv.system is not None and all((Path(tv.system) / f).is_file() for f in tv.files[split]):
        folder = Path(tv.system)
    files = [folder / f for f in tv.files[split]]
    hint = f"put the torchvision-format files ({', '.join(tv.files[split])}) in {folder}, or use imagefolder:PATH with a local image-folder copy"
    if tv.system is not None:
        hint = f"install the files in {tv.system} (Debian/Ubuntu: apt install dataset-{name}), or {hint}"
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
            fix = (
                f"reinstall the package that put them there (dataset-{name})"
                if folder == Path(tv.system or "")
                else f"delete {root} to download again"
            )
            raise UserError(f"cannot read {name} files in {folder} ({_one_line(err)}); {fix}") from err
        _check_memory(len(labels), size, max_memory_gb, f"{name} {split}")
        return ImageSplit(_fit_array(images, size), torch.from_numpy(labels), classes, source_side=min(images.shape[2:]))

    out = _cached(cache_root, f"{name}:{folder.resolve()}", split, size, _fingerprint([str(f.resolve()) for f in files]), build)
    _check_memory(len(out), size, max_memory_gb, f"{name} {split}")  # also on a cache hit
    return out


# --------------------------------------------------------------------------------------------
# imagefolder:PATH


def _load_imagefolder(arg: str, split: str, size: int, cache_root: Path, max_memory_gb: float) -> ImageSplit | FileSplit:
    """``PATH/train`` and ``PATH/test`` (or ``PATH/val``), one folder per class (sorted names)."""
    files, labels, classes, split_dir = imagefolder_files(arg, split)
    if len(files) * 3 * size * size / 1e9 > max_memory_gb:
        logger.info("%s: %d images at %d px exceed max_memory_gb=%g; reading them per image", split_dir, len(files), size, max_memory_gb)
        return FileSplit(list(zip(files, labels, strict=True)), classes, size)

    def build() -> ImageSplit:
        return _decode_split(files, torch.tensor(labels, dtype=torch.int64), classes, size, lambda i: files[i], str(split_dir))

    return _cached(cache_root, f"imagefolder:{split_dir}", split, size, _fingerprint(files), build)


def imagefolder_files(arg: str, split: str) -> tuple[list[str], list[int], list[str], Path]:
    """The ``split`` of ``imagefolder:{arg}`` as (image paths, labels, classes, split folder), in the
    order every reader of it uses (classes sorted, files sorted within each)."""
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
    return files, labels, classes, split_dir


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
# The built-in sources, in the order `sslbench list data-sources` shows them


@register_data_source(
    "digits",
    description="scikit-learn's 8x8 handwritten digits upsampled to RGB, 16 px by default (1,347 train / 450 test, 10 classes); offline default",
    image_size=16,  # its 8x8 pixels doubled: keeps the default CPU job to a few minutes (--image-size 32 upsamples more)
)
def _digits(arg: str, split: str, size: int, cache_root: Path, max_memory_gb: float, download: bool) -> ImageSplit:
    out = _cached(cache_root, "digits", split, size, {}, lambda: _build_digits(split, size, max_memory_gb))
    _check_memory(len(out), size, max_memory_gb, f"digits {split}")  # also on a cache hit
    return out


def _torchvision_source(name: str, description: str, image_size: int) -> None:
    def load(arg: str, split: str, size: int, cache_root: Path, max_memory_gb: float, download: bool) -> ImageSplit:
        return _load_torchvision(name, split, size, cache_root, max_memory_gb, download)

    load.__qualname__ = f"_torchvision_source.{name}"  # one loader per set (the registry tells re-registrations by it)
    register_data_source(name, description=description, image_size=image_size)(load)


_torchvision_source("cifar10", "CIFAR-10, 32 px (50,000 / 10,000, 10 classes); torchvision download into the cache", 32)
_torchvision_source("cifar100", "CIFAR-100, 32 px (50,000 / 10,000, 100 fine classes); torchvision download into the cache", 32)
_torchvision_source("stl10", "STL-10 labelled splits, 96 px (5,000 / 8,000, 10 classes); torchvision download into the cache", 96)
_torchvision_source(
    "fashion-mnist",
    "Fashion-MNIST, 28 px grey as RGB (60,000 / 10,000, 10 classes); Debian's dataset-fashion-mnist files, else a torchvision download into the cache",
    28,
)


@register_data_source("imagefolder", arg="PATH", description="PATH/train and PATH/test (or PATH/val), one sub-folder per class")
def _imagefolder(arg: str, split: str, size: int, cache_root: Path, max_memory_gb: float, download: bool) -> ImageSplit | FileSplit:
    return _load_imagefolder(arg, split, size, cache_root, max_memory_gb)


@register_data_source(
    "hf",
    arg="NAME",
    description="Hugging Face dataset: hub name (?config=CONFIG), save_to_disk folder, parquet/csv/tsv/json/jsonl/arrow file or folder, "
    "image folder; options ?image=COL&label=COL&train=SPLIT&test=SPLIT; one split: held-out test part (?heldout=0.2&split_seed=0)",
)
def _hf(arg: str, split: str, size: int, cache_root: Path, max_memory_gb: float, download: bool) -> ImageSplit:
    from sslbench.data.hf import load_hf

    return load_hf(arg, split, size, cache_root, max_memory_gb)
