"""Data specs: digits, torchvision-format files, image folders, Hugging Face datasets, the decoded
cache, balanced subsets and the user errors. Everything offline; the real CIFAR-10 JPEG tarball
test skips when the shared copy is absent."""

from __future__ import annotations

import gzip
import io
import logging
import pickle
import subprocess
import time
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import sslbench.data as data
import sslbench.data.decode as data_decode
from sslbench.core.errors import UserError
from sslbench.data import FileSplit, ImageSplit, balanced_subset, data_sources, default_cache_dir, load_split, store_size

CIFAR_TARBALL = Path(__file__).resolve().parents[1].parent / "shared/data/cifar10-jpeg/cifar10-jpeg.tar.gz"
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _noise(rng: np.random.Generator, h: int, w: int, channels: int = 3) -> np.ndarray:
    return rng.integers(0, 256, size=(h, w, channels) if channels > 1 else (h, w), dtype=np.uint8)


@pytest.fixture
def folder(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """An image folder with awkward files; returns (root, {name: expected RGB pixels (16, 16, 3)}).

    train/cat: a_rgb, b_gray (L), c_rgba, d_rgb, e_rgb      -> 5 readable
    train/dog: a_bad.jpg (not an image), b_pal (P + transparency), c_rgb, d_trunc.jpg (truncated),
               e_rgb, f_rgb                                 -> 4 readable, 2 skipped
    test/{cat,dog}: two RGB images each; a README.txt that is not an image.
    """
    rng = np.random.default_rng(0)
    root = tmp_path / "imgs"
    expected: dict[str, np.ndarray] = {}

    def save(rel: str, pixels: np.ndarray, mode: str | None = None) -> None:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels, mode=mode).save(path) if mode else Image.fromarray(pixels).save(path)

    for rel in (
        "train/cat/a_rgb.png",
        "train/cat/d_rgb.png",
        "train/cat/e_rgb.png",
        "train/dog/c_rgb.png",
        "train/dog/e_rgb.png",
        "train/dog/f_rgb.png",
        "test/cat/0.png",
        "test/cat/1.png",
        "test/dog/0.png",
        "test/dog/1.png",
    ):
        expected[rel] = _noise(rng, 16, 16)
        save(rel, expected[rel])
    gray = _noise(rng, 16, 16, channels=1)
    save("train/cat/b_gray.png", gray)
    expected["train/cat/b_gray.png"] = np.repeat(gray[:, :, None], 3, axis=2)
    rgba = _noise(rng, 16, 16, channels=4)
    save("train/cat/c_rgba.png", rgba)
    expected["train/cat/c_rgba.png"] = rgba[:, :, :3]

    pal = Image.fromarray(rng.integers(0, 4, size=(16, 16), dtype=np.uint8), mode="P")
    palette = [0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255]
    pal.putpalette(palette + [0] * (768 - len(palette)))
    pal.save(root / "train/dog/b_pal.png", transparency=0)
    expected["train/dog/b_pal.png"] = np.asarray(pal.convert("RGBA").convert("RGB"))

    (root / "train/dog/a_bad.jpg").write_bytes(b"this is not a jpeg" * 10)
    buf = io.BytesIO()
    Image.fromarray(_noise(rng, 64, 64)).save(buf, format="JPEG", quality=90)
    (root / "train/dog/d_trunc.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (root / "test/README.txt").write_text("not a class folder entry")
    (root / "test/cat/notes.txt").write_text("ignored: not an image extension")
    return root, expected


# ---------------------------------------------------------------------------------------------
# digits


def test_digits_shapes_classes_and_stratified_split(tmp_path: Path) -> None:
    from sklearn.datasets import load_digits

    train = load_split("digits", "train", 32, cache_dir=tmp_path)
    test = load_split("digits", "test", 32, cache_dir=tmp_path)
    assert isinstance(train, ImageSplit) and isinstance(test, ImageSplit)
    assert train.images.shape == (1347, 3, 32, 32) and test.images.shape == (450, 3, 32, 32)
    assert train.images.dtype == torch.uint8 and train.labels.dtype == torch.int64
    assert train.classes == [str(d) for d in range(10)]
    assert torch.equal(train.images[:, 0], train.images[:, 1]) and torch.equal(train.images[:, 0], train.images[:, 2])
    assert int(train.images.min()) == 0 and int(train.images.max()) == 255
    per_class = np.bincount(load_digits().target, minlength=10)
    test_counts = test.labels.bincount(minlength=10).numpy()
    assert np.array_equal(train.labels.bincount(minlength=10).numpy() + test_counts, per_class)
    assert np.all(np.abs(test_counts - 0.25 * per_class) <= 1)  # stratified


def test_digits_deterministic_and_resized(tmp_path: Path) -> None:
    a = load_split("digits", "test", 32, cache_dir=tmp_path / "a")
    b = load_split("digits", "test", 32, cache_dir=tmp_path / "b")
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    big = load_split("digits", "test", 112, cache_dir=tmp_path / "a")
    assert big.images.shape == (450, 3, 128, 128) and torch.equal(big.labels, a.labels)


def test_store_size_rule() -> None:
    assert [store_size(s) for s in (8, 32, 64, 95, 96, 224)] == [8, 32, 64, 95, 110, 256]


# ---------------------------------------------------------------------------------------------
# imagefolder


def test_imagefolder_decodes_converts_and_skips_bad_files(folder, tmp_path: Path, caplog) -> None:
    root, expected = folder
    caplog.set_level(logging.WARNING, logger="sslbench.data")
    train = load_split(f"imagefolder:{root}", "train", 16, cache_dir=tmp_path / "cache")
    assert isinstance(train, ImageSplit)
    assert train.classes == ["cat", "dog"]
    assert train.labels.tolist() == [0] * 5 + [1] * 4
    order = [
        "train/cat/a_rgb.png",
        "train/cat/b_gray.png",
        "train/cat/c_rgba.png",
        "train/cat/d_rgb.png",
        "train/cat/e_rgb.png",
        "train/dog/b_pal.png",
        "train/dog/c_rgb.png",
        "train/dog/e_rgb.png",
        "train/dog/f_rgb.png",
    ]
    for i, rel in enumerate(order):  # same-size images are kept bit-exact
        assert np.array_equal(train.images[i].permute(1, 2, 0).numpy(), expected[rel]), rel
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "skipped 2 unreadable" in warnings[0].getMessage() and "a_bad.jpg" in warnings[0].getMessage()

    test = load_split(f"imagefolder:{root}", "test", 16, cache_dir=tmp_path / "cache")
    assert test.labels.tolist() == [0, 0, 1, 1] and test.classes == ["cat", "dog"]
    assert np.array_equal(test.images[3].permute(1, 2, 0).numpy(), expected["test/dog/1.png"])


def test_imagefolder_val_folder_and_resize_centre_crop(tmp_path: Path) -> None:
    root = tmp_path / "stripes"
    stripes = np.zeros((24, 48, 3), dtype=np.uint8)  # 48 wide, 24 high: red | green | blue thirds
    stripes[:, :16, 0] = stripes[:, 16:32, 1] = stripes[:, 32:, 2] = 255
    for split in ("train", "val"):
        (root / split / "s").mkdir(parents=True)
        Image.fromarray(stripes).save(root / split / "s" / "x.png")
    out = load_split(f"imagefolder:{root}", "test", 16, cache_dir=tmp_path / "cache")  # 'val' serves as test
    img = out.images[0]
    assert img.shape == (3, 16, 16)
    # shorter side 24 -> 16 makes it 32 wide; the centre 16 columns are the green stripe
    centre = img[:, :, 4:12]
    assert torch.all(centre[1] == 255) and torch.all(centre[0] == 0) and torch.all(centre[2] == 0)
    assert load_split(f"imagefolder:{root}", "train", 96, cache_dir=tmp_path / "cache").images.shape == (1, 3, 110, 110)


def test_imagefolder_parallel_decode_matches_serial(folder, tmp_path: Path, monkeypatch) -> None:
    root, _ = folder
    serial = load_split(f"imagefolder:{root}", "train", 12, cache_dir=tmp_path / "serial")
    monkeypatch.setattr(data_decode, "_PARALLEL_MIN_IMAGES", 0)
    monkeypatch.setattr(data_decode, "_CHUNK", 2)
    open_rgb = data_decode._open_rgb

    def in_worker_only(source):  # forked DataLoader workers inherit this patch
        assert torch.utils.data.get_worker_info() is not None, "decoded in the main process"
        return open_rgb(source)

    monkeypatch.setattr(data_decode, "_open_rgb", in_worker_only)
    parallel = load_split(f"imagefolder:{root}", "train", 12, cache_dir=tmp_path / "parallel")
    assert serial.images.shape == (9, 3, 12, 12)
    assert torch.equal(serial.images, parallel.images) and torch.equal(serial.labels, parallel.labels)


def test_imagefolder_file_split_when_over_memory(folder, tmp_path: Path) -> None:
    root, expected = folder
    split = load_split(f"imagefolder:{root}", "train", 8, cache_dir=tmp_path, max_memory_gb=0.0)
    assert isinstance(split, FileSplit)
    assert len(split) == 11 and split.classes == ["cat", "dog"]  # unreadable files are not checked up front
    assert split.labels.tolist() == [0] * 5 + [1] * 6 and split.labels.dtype == torch.int64
    gray = split.open(1)
    assert gray.mode == "RGB" and gray.size == (8, 8)
    full = FileSplit(split.samples, split.classes)  # size None: as decoded
    assert np.array_equal(np.asarray(full.open(1)), expected["train/cat/b_gray.png"])
    with pytest.raises(UserError, match="a_bad.jpg.*delete or replace"):
        split.open(5)
    sub = split.subset(torch.tensor([0, 6]))
    assert sub.samples == [split.samples[0], split.samples[6]] and sub.labels.tolist() == [0, 1] and sub.size == 8
    assert not (tmp_path / "decoded").exists()  # nothing decoded, nothing cached


def test_decoded_split_is_cached_and_invalidated_by_changes(folder, tmp_path: Path, monkeypatch) -> None:
    root, _ = folder
    cache = tmp_path / "cache"
    first = load_split(f"imagefolder:{root}", "train", 16, cache_dir=cache)
    cached = list((cache / "decoded").glob("*.pt"))
    assert len(cached) == 1 and not list((cache / "decoded").glob("*.tmp"))

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded although the split is cached")

    monkeypatch.setattr(data_decode.Image, "open", no_decoding)
    second = load_split(f"imagefolder:{root}", "train", 16, cache_dir=cache)
    assert torch.equal(first.images, second.images) and torch.equal(first.labels, second.labels)
    assert second.classes == first.classes

    (root / "train/cat/z_new.png").write_bytes((root / "train/cat/a_rgb.png").read_bytes())
    with pytest.raises(AssertionError, match="decoded although"):  # a new file changes the key
        load_split(f"imagefolder:{root}", "train", 16, cache_dir=cache)


def test_unreadable_cache_file_is_rebuilt(tmp_path: Path) -> None:
    first = load_split("digits", "test", 16, cache_dir=tmp_path)
    (path,) = (tmp_path / "decoded").glob("*.pt")
    path.write_bytes(b"garbage")
    again = load_split("digits", "test", 16, cache_dir=tmp_path)
    assert torch.equal(first.images, again.images)
    assert path.stat().st_size > 1000


@pytest.mark.parametrize(
    "setup,match",
    [
        (lambda r: None, r"does not exist.*PATH/train and PATH/test"),
        (lambda r: (r / "train" / "a").mkdir(parents=True), r"no test \(or val\) folder"),
        (lambda r: [(r / s).mkdir(parents=True) for s in ("train", "test")], r"train has no class folders; expected"),
        (lambda r: [(r / s / "a").mkdir(parents=True) for s in ("train", "test")], r"class folder .*train/a has no images"),
        (
            lambda r: [(r / s / c).mkdir(parents=True) for s, c in (("train", "a"), ("train", "b"), ("test", "a"))],
            r"class folders differ.*only in train: \['b'\]",
        ),
    ],
    ids=["missing", "no-test", "empty", "no-images", "class-mismatch"],
)
def test_imagefolder_user_errors(tmp_path: Path, setup, match) -> None:
    root = tmp_path / "data"
    setup(root)
    with pytest.raises(UserError, match=match):
        load_split(f"imagefolder:{root}", "train", 16, cache_dir=tmp_path / "cache")


def test_folder_with_only_unreadable_images_is_an_error(tmp_path: Path) -> None:
    for split in ("train", "test"):
        (tmp_path / "d" / split / "a").mkdir(parents=True)
        (tmp_path / "d" / split / "a" / "x.png").write_bytes(b"nope")
    with pytest.raises(UserError, match="no readable image"):
        load_split(f"imagefolder:{tmp_path / 'd'}", "train", 16, cache_dir=tmp_path / "cache")


# ---------------------------------------------------------------------------------------------
# torchvision formats, offline


def _write_tiny_cifar10(root: Path, rng: np.random.Generator) -> dict[str, tuple[np.ndarray, list[int]]]:
    """torchvision's cifar-10-batches-py layout with 3 images per batch file."""
    folder = root / "cifar10" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    written: dict[str, tuple[np.ndarray, list[int]]] = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        pixels = rng.integers(0, 256, size=(3, 3 * 32 * 32), dtype=np.uint8)
        labels = rng.integers(0, 10, size=3).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({"batch_label": name, "labels": labels, "data": pixels, "filenames": ["x.png"] * 3}, f)
        written[name] = (pixels.reshape(3, 3, 32, 32), labels)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": CIFAR_CLASSES, "num_vis": 3072}, f)
    return written


def test_cifar10_from_local_torchvision_files(tmp_path: Path) -> None:
    written = _write_tiny_cifar10(tmp_path, np.random.default_rng(1))
    train = load_split("cifar10", "train", 32, cache_dir=tmp_path, download=False)
    test = load_split("cifar10", "test", 32, cache_dir=tmp_path, download=False)
    assert train.classes == CIFAR_CLASSES and len(train) == 15 and len(test) == 3
    expected = np.concatenate([written[f"data_batch_{i}"][0] for i in range(1, 6)])
    assert np.array_equal(train.images.numpy(), expected)  # 32 px stays bit-exact
    assert train.labels.tolist() == sum((written[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    assert np.array_equal(test.images.numpy(), written["test_batch"][0])
    assert load_split("cifar10", "test", 16, cache_dir=tmp_path, download=False).images.shape == (3, 3, 16, 16)


def test_cifar100_from_local_torchvision_files(tmp_path: Path) -> None:
    folder = tmp_path / "cifar100" / "cifar-100-python"
    folder.mkdir(parents=True)
    pixels = np.arange(2 * 3072, dtype=np.int64).astype(np.uint8).reshape(2, 3072)
    for name in ("train", "test"):
        with open(folder / name, "wb") as f:
            pickle.dump({"data": pixels, "fine_labels": [7, 99], "coarse_labels": [1, 2]}, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"c{i}" for i in range(100)], "coarse_label_names": []}, f)
    out = load_split("cifar100", "test", 32, cache_dir=tmp_path, download=False)
    assert out.labels.tolist() == [7, 99] and len(out.classes) == 100 and out.classes[99] == "c99"
    assert np.array_equal(out.images.numpy(), pixels.reshape(2, 3, 32, 32))


def test_stl10_column_major_binaries(tmp_path: Path) -> None:
    folder = tmp_path / "stl10" / "stl10_binary"
    folder.mkdir(parents=True)
    img = np.zeros((96, 96, 3), dtype=np.uint8)  # HWC: top half white
    img[:48] = 255
    chw_column_major = img.transpose(2, 1, 0)  # STL-10 stores (3, W, H)
    (folder / "test_X.bin").write_bytes(np.stack([chw_column_major, chw_column_major]).tobytes())
    (folder / "test_y.bin").write_bytes(bytes([1, 10]))
    (folder / "class_names.txt").write_text("\n".join(["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]) + "\n")
    out = load_split("stl10", "test", 48, cache_dir=tmp_path, download=False)
    assert out.images.shape == (2, 3, 48, 48) and out.labels.tolist() == [0, 9] and out.classes[2] == "car"
    assert torch.all(out.images[0, :, :20] == 255) and torch.all(out.images[0, :, 28:] == 0)


def _write_idx(path: Path, array: np.ndarray) -> None:
    """An unsigned-byte IDX file written from the format's definition (magic 0 0 8 ndim, big-endian dims)."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def test_idx_files_read_back_and_bad_ones_are_refused(tmp_path: Path) -> None:
    from sslbench.data.sources import read_idx

    array = np.arange(2 * 3 * 5, dtype=np.uint8).reshape(2, 3, 5)
    _write_idx(tmp_path / "a.gz", array)
    assert np.array_equal(read_idx(tmp_path / "a.gz"), array)
    (tmp_path / "plain").write_bytes(gzip.decompress((tmp_path / "a.gz").read_bytes()))
    assert np.array_equal(read_idx(tmp_path / "plain"), array)
    (tmp_path / "short").write_bytes(gzip.decompress((tmp_path / "a.gz").read_bytes())[:-1])
    with pytest.raises(ValueError, match="bytes of data for shape"):
        read_idx(tmp_path / "short")
    (tmp_path / "float").write_bytes(bytes([0, 0, 0x0D, 1, 0, 0, 0, 1]) + b"\0" * 4)
    with pytest.raises(ValueError, match="not an unsigned-byte IDX file"):
        read_idx(tmp_path / "float")


def test_fashion_mnist_from_the_cache_folder_when_no_package_installed_it(tmp_path: Path, monkeypatch) -> None:
    import dataclasses

    from sslbench.data import sources

    tv = sources._TORCHVISION["fashion-mnist"]
    monkeypatch.setitem(sources._TORCHVISION, "fashion-mnist", dataclasses.replace(tv, system=str(tmp_path / "no-package")))
    with pytest.raises(UserError, match=r"download is off; .*apt install dataset-fashion-mnist") as info:
        load_split("fashion-mnist", "test", 28, cache_dir=tmp_path, download=False)
    assert "\n" not in str(info.value)
    raw = tmp_path / "fashion-mnist" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    images = np.zeros((3, 28, 28), dtype=np.uint8)
    images[1, :14] = 255  # the top half of the second image white
    _write_idx(raw / "t10k-images-idx3-ubyte.gz", images)
    _write_idx(raw / "t10k-labels-idx1-ubyte.gz", np.array([9, 0, 3]))
    out = load_split("fashion-mnist", "test", 28, cache_dir=tmp_path, download=False)
    assert out.images.shape == (3, 3, 28, 28) and out.labels.tolist() == [9, 0, 3]
    assert out.classes[9] == "Ankle boot" and out.source_side == 28
    assert torch.all(out.images[1, :, :14] == 255) and torch.all(out.images[1, :, 14:] == 0) and torch.all(out.images[0] == 0)


FASHION_MNIST_PACKAGE = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(
    not (FASHION_MNIST_PACKAGE / "t10k-labels-idx1-ubyte.gz").is_file(),
    reason="Fashion-MNIST is not installed (Debian/Ubuntu: apt install dataset-fashion-mnist; .ci/run installs it)",
)
def test_fashion_mnist_from_the_debian_package(tmp_path: Path) -> None:
    """The package's files as the data set describes itself: 60,000 / 10,000 grey 28x28 images,
    6,000 / 1,000 per class, the test set's first labels 9, 2, 1, 1, 6 (zalandoresearch/fashion-mnist)."""
    test = load_split("fashion-mnist", "test", 28, cache_dir=tmp_path, download=False)
    assert test.images.shape == (10000, 3, 28, 28) and test.labels[:5].tolist() == [9, 2, 1, 1, 6]
    assert torch.bincount(test.labels).tolist() == [1000] * 10
    assert torch.equal(test.images[:, 0], test.images[:, 1]) and torch.equal(test.images[:, 0], test.images[:, 2])  # grey
    train = load_split("fashion-mnist", "train", 32, cache_dir=tmp_path, download=False)
    assert train.images.shape == (60000, 3, 32, 32) and torch.bincount(train.labels).tolist() == [6000] * 10


def test_torchvision_missing_files_and_failed_download(tmp_path: Path, monkeypatch) -> None:
    with pytest.raises(UserError, match=r"not found in .*cifar-10-batches-py and download is off"):
        load_split("cifar10", "train", 32, cache_dir=tmp_path, download=False)

    import torchvision.datasets

    def offline(self):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.datasets.CIFAR10, "download", offline)
    with pytest.raises(UserError, match=r"could not download cifar10 .*no network.*cifar-10-batches-py.*imagefolder:PATH") as info:
        load_split("cifar10", "test", 32, cache_dir=tmp_path)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------
# Hugging Face


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def test_hf_saved_dataset_with_detected_columns(tmp_path: Path, caplog) -> None:
    from datasets import ClassLabel, Dataset, DatasetDict
    from datasets import Image as HFImage

    rng = np.random.default_rng(2)
    pics = [_noise(rng, 16, 16) for _ in range(5)]
    rows = [{"bytes": _png(p), "path": None} for p in pics] + [{"bytes": b"broken", "path": None}]

    def split(images, labels):
        ds = Dataset.from_dict({"picture": images, "target": labels, "extra": list(range(len(labels)))})
        return ds.cast_column("picture", HFImage()).cast_column("target", ClassLabel(names=["neg", "pos"]))

    path = tmp_path / "hfds"
    DatasetDict({"train": split(rows[:3] + rows[5:], [0, 1, 1, 0]), "test": split(rows[3:5], [1, 0])}).save_to_disk(str(path))
    caplog.set_level(logging.WARNING, logger="sslbench.data")
    train = load_split(f"hf:{path}", "train", 16, cache_dir=tmp_path / "cache")
    assert train.classes == ["neg", "pos"] and train.labels.tolist() == [0, 1, 1]
    assert all(np.array_equal(train.images[i].permute(1, 2, 0).numpy(), pics[i]) for i in range(3))
    assert any("skipped 1 unreadable" in r.getMessage() and "row 3" in r.getMessage() for r in caplog.records)
    test = load_split(f"hf:{path}", "test", 16, cache_dir=tmp_path / "cache")
    assert test.labels.tolist() == [1, 0] and np.array_equal(test.images[1].permute(1, 2, 0).numpy(), pics[4])
    assert len(list((tmp_path / "cache" / "decoded").glob("*.pt"))) == 2


def test_hf_query_options_plain_labels_and_validation_fallback(tmp_path: Path) -> None:
    from datasets import Dataset, DatasetDict
    from datasets import Image as HFImage

    rng = np.random.default_rng(3)

    def split(labels):
        images = [{"bytes": _png(_noise(rng, 20, 20)), "path": None} for _ in labels]
        return Dataset.from_dict({"img": images, "fine_label": labels, "coarse": labels}).cast_column("img", HFImage())

    path = tmp_path / "hfq"
    DatasetDict({"training": split([5, 3, 5]), "validation": split([3, 9])}).save_to_disk(str(path))
    train = load_split(f"hf:{path}?train=training", "train", 8, cache_dir=tmp_path)
    assert train.classes == ["3", "5", "9"] and train.labels.tolist() == [1, 0, 1]  # sorted over all splits
    assert train.images.shape == (3, 3, 8, 8)
    test = load_split(f"hf:{path}?image=img&label=coarse", "test", 8, cache_dir=tmp_path)  # falls back to validation
    assert test.labels.tolist() == [0, 2]
    with pytest.raises(UserError, match=r"unknown option 'imgae'.*did you mean 'image'"):
        load_split(f"hf:{path}?imgae=img", "train", 8, cache_dir=tmp_path)
    with pytest.raises(UserError, match=r"no split 'train'.*splits: training, validation"):
        load_split(f"hf:{path}", "train", 8, cache_dir=tmp_path)
    with pytest.raises(UserError, match=r"no column 'lable'.*did you mean 'label'|no column 'lable'"):
        load_split(f"hf:{path}?train=training&label=lable", "train", 8, cache_dir=tmp_path)


# ---------------------------------------------------------------------------------------------
# Spec and argument errors


@pytest.mark.parametrize(
    "spec,split,size,kwargs,match",
    [
        (
            "cifar-10",
            "train",
            32,
            {},
            r"unknown data set 'cifar-10' \(did you mean 'cifar10' or 'cifar100'\?\); valid: digits, cifar10, .*imagefolder:PATH, hf:NAME",
        ),
        ("svhn", "train", 32, {}, r"unknown data set 'svhn'; valid: digits"),
        ("imagefolder", "train", 32, {}, r"needs a path: write imagefolder:PATH"),
        ("hf:", "train", 32, {}, r"needs a name: write hf:NAME"),
        ("digits", "tset", 32, {}, r"unknown split 'tset' \(did you mean 'test'\?\); valid: train, test"),
        ("digits", "train", 0, {}, r"image_size must be a positive int"),
        (
            "digits",
            "train",
            32,
            {"max_memory_gb": 0.001},
            r"digits train needs 0.00414 GB in memory at 32 px, more than max_memory_gb=0.001; raise max_memory_gb",
        ),
    ],
)
def test_user_errors(tmp_path: Path, spec, split, size, kwargs, match) -> None:
    with pytest.raises(UserError, match=match) as info:
        load_split(spec, split, size, cache_dir=tmp_path, **kwargs)
    assert "\n" not in str(info.value)


def test_dataset_listing_and_cache_dir(monkeypatch, tmp_path: Path) -> None:
    assert list(data_sources()) == ["digits", "cifar10", "cifar100", "stl10", "fashion-mnist", "imagefolder:PATH", "hf:NAME", "shards:DIR"]
    assert all(desc and "\n" not in desc for desc in data_sources().values())
    monkeypatch.setenv("SSLBENCH_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("SSLBENCH_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "sslbench"


# ---------------------------------------------------------------------------------------------
# balanced_subset


def test_balanced_subset_count_is_balanced_sorted_and_seeded() -> None:
    labels = torch.arange(10).repeat_interleave(50)[torch.randperm(500, generator=torch.Generator().manual_seed(0))]
    idx = balanced_subset(labels, 100, seed=0)
    assert idx.dtype == torch.int64 and idx.numel() == 100 and idx.unique().numel() == 100
    assert torch.equal(idx, idx.sort().values)
    assert labels[idx].bincount(minlength=10).tolist() == [10] * 10
    assert torch.equal(idx, balanced_subset(labels, 100, seed=0))
    assert torch.equal(idx, balanced_subset(labels, np.int64(100), seed=0))
    assert not torch.equal(idx, balanced_subset(labels, 100, seed=1))
    uneven = labels[balanced_subset(labels, 105, seed=3)].bincount(minlength=10)
    assert uneven.sum() == 105 and set(uneven.tolist()) == {10, 11}
    assert torch.equal(balanced_subset(labels, 500, seed=0), torch.arange(500))


def test_balanced_subset_fraction_and_imbalanced_classes() -> None:
    labels = torch.tensor([0] * 100 + [1] * 40 + [2] * 3)
    assert labels[balanced_subset(labels, 0.1, seed=0)].bincount().tolist() == [10, 4, 1]  # at least one per class
    assert labels[balanced_subset(labels, 9, seed=0)].bincount().tolist() == [3, 3, 3]
    # class 2 gives all it has; the rest is shared by the others, the odd one drawn by the seed
    counts = {tuple(labels[balanced_subset(labels, 60, seed=s)].bincount().tolist()) for s in range(8)}
    assert counts == {(29, 28, 3), (28, 29, 3)}
    assert torch.equal(balanced_subset(labels, 1.0, seed=5), torch.arange(143))


@pytest.mark.parametrize("bad", [0, 501, -3, 0.0, 1.5, True, "10"])
def test_balanced_subset_rejects_bad_sizes(bad) -> None:
    with pytest.raises(UserError, match="subset"):
        balanced_subset(torch.zeros(500, dtype=torch.int64), bad, seed=0)


def test_split_subset_keeps_classes(tmp_path: Path) -> None:
    split = load_split("digits", "test", 16, cache_dir=tmp_path)
    idx = balanced_subset(split.labels, 20, seed=0)
    sub = split.subset(idx)
    assert len(sub) == 20 and sub.classes == split.classes and torch.equal(sub.images, split.images[idx])
    with pytest.raises(ValueError, match="uint8"):
        ImageSplit(split.images.float(), split.labels, split.classes)


# ---------------------------------------------------------------------------------------------
# The real CIFAR-10 JPEG copy


@pytest.mark.slow
@pytest.mark.skipif(not CIFAR_TARBALL.is_file(), reason=f"CIFAR-10 JPEG tarball not found at {CIFAR_TARBALL} (only on machines with ../shared)")
def test_real_cifar10_jpeg_folder(tmp_path: Path) -> None:
    (tmp_path / "cifar10").mkdir()
    subprocess.run(["tar", "xzf", str(CIFAR_TARBALL), "-C", str(tmp_path / "cifar10")], check=True)  # ~10x faster than tarfile
    start = time.perf_counter()
    train = load_split(f"imagefolder:{tmp_path / 'cifar10'}", "train", 32, cache_dir=tmp_path / "cache")
    test = load_split(f"imagefolder:{tmp_path / 'cifar10'}", "test", 32, cache_dir=tmp_path / "cache")
    print(f"decoded 60,000 CIFAR-10 JPEGs in {time.perf_counter() - start:.1f} s")
    assert isinstance(train, ImageSplit) and isinstance(test, ImageSplit)
    assert train.images.shape == (50000, 3, 32, 32) and test.images.shape == (10000, 3, 32, 32)
    assert train.classes == CIFAR_CLASSES and test.classes == CIFAR_CLASSES
    assert train.labels.bincount().tolist() == [5000] * 10 and test.labels.bincount().tolist() == [1000] * 10
    mean = train.images.float().mean() / 255
    assert 0.45 < mean < 0.50  # CIFAR-10's mean pixel is about 0.47: real photos, no zero rows


@pytest.mark.parametrize(
    "make, fmt",
    [
        (lambda g: Image.fromarray(g.astype(np.uint16) * 257), "PNG"),  # 16-bit grayscale (I;16)
        (lambda g: Image.fromarray(g.astype(np.int32) * 257), "TIFF"),  # 32-bit integer (I)
        (lambda g: Image.fromarray(g.astype(np.float32) / 255), "TIFF"),  # float in [0, 1] (F)
        (lambda g: Image.fromarray(g), "PNG"),  # 8-bit grayscale (L), the reference
    ],
)
def test_high_bit_depth_images_decode_like_their_8_bit_version(make, fmt):
    """Pillow's convert('RGB') clips values above 255: a 16-bit image decoded all white."""
    g = (np.arange(48 * 40).reshape(40, 48) % 256).astype(np.uint8)
    buf = io.BytesIO()
    make(g).save(buf, fmt)
    rgb = np.asarray(data._open_rgb(buf.getvalue()))
    assert rgb.shape == (40, 48, 3) and rgb.dtype == np.uint8
    for c in range(3):
        assert np.array_equal(rgb[..., c], g)


def test_max_memory_gb_is_enforced_also_when_the_split_is_cached(tmp_path):
    """The digits (and torchvision) limit was checked only while decoding: a warm cache loaded
    the split whatever max_memory_gb said."""
    assert len(load_split("digits", "test", 16, cache_dir=tmp_path)) > 0  # warm the cache
    with pytest.raises(UserError, match="more than max_memory_gb=1e-06"):
        load_split("digits", "test", 16, cache_dir=tmp_path, max_memory_gb=1e-6)
