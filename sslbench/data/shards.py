"""``shards:DIR``: images in WebDataset-style tar shards, read per sample by DataLoader workers.

A shard folder, written by ``sslbench shard SRC DIR --shard-size N``
(:func:`write_shards`), holds ``DIR/index.json`` and ``DIR/{train,test}/shard-000000.tar``, ...
Each tar holds, in order, ``{key}.{ext}`` (the image's encoded bytes: the source file itself for
an image folder or a Hugging Face data set, a PNG for a source that exists only decoded, such as
``digits``) and ``{key}.cls`` (the label as text), which is WebDataset's layout: any WebDataset
reader reads these shards. The index holds the classes, the number of samples per shard, the
median image size, a SHA-256 per shard and, per sample, its key, label, the byte offset and length
of its image in the tar and a CRC-32 of those bytes.

Reading. ``load_split('shards:DIR', split, ...)`` returns a :class:`ShardSplit` (a
:class:`~sslbench.data.FileSplit`, so evaluation reads it like a large image folder). Sample ``i``
of a split is image ``i`` of its source split (shard ``i // shard_size``, position ``i %
shard_size``), so the data order of training, a pure function of ``(seed, epoch)`` over the
sample index (:func:`sslbench.train.batches.epoch_permutation`), is the order the in-memory
source would have: training from shards equals training from the same images in memory, bitwise.
A sample is read by one ``pread`` at its offset (no scan of the tar), so each process reads only
its share of each global batch, in any order, and a resumed run starts at the next sample without
reading what it trained on. Each read is checked against its CRC-32; a shard whose size differs
from the index's is refused when the split is loaded.

Why the standard library's ``tarfile`` and not the ``webdataset`` or ``datasets`` streaming
readers: both stream shards sequentially and shuffle approximately (shard order plus a shuffle
buffer), so their order cannot be the exact per-epoch permutation the in-memory path uses, a
resumed run would re-read (or skip by decoding) what it trained on, and a process cannot read only
its share of a batch. Random access needs the offsets in the index and nothing else; neither
library is installed with sslbench (``webdataset`` is not a dependency; ``datasets`` is, but its
iterable data sets have no random access).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from sslbench.core.errors import UserError
from sslbench.core.rundir import write_text_atomic
from sslbench.data.decode import _DECODE_ERRORS, _fit, _one_line, _open_rgb, median_side
from sslbench.data.sources import logger, register_data_source
from sslbench.data.splits import SPLITS, FileSplit

__all__ = ["INDEX", "ShardSplit", "load_shards", "write_shards"]

INDEX = "index.json"
FORMAT = "sslbench-shards"
VERSION = 1
#: What a shard error tells to do.
REWRITE = "write the shards again with `sslbench shard SRC DIR --shard-size N`"


@dataclass
class ShardSplit(FileSplit):
    """A split in tar shards: ``samples`` are ``('SHARD#KEY', label)`` (for messages),
    ``locations[i]`` is sample ``i``'s ``(shard number, offset, length, crc32)`` of its image
    bytes in ``shards`` (absolute paths). :meth:`pixels` gives the uint8 ``(3, size, size)`` array
    an in-memory split would hold; :meth:`open` the PIL image (evaluation)."""

    shards: list[str] = field(default_factory=list)
    locations: list[tuple[int, int, int, int]] = field(default_factory=list)
    _files: dict[int, Any] = field(default_factory=dict, repr=False, compare=False)  # shard -> open file (closed when dropped)
    _pid: int = field(default=-1, repr=False, compare=False)

    def __getstate__(self) -> dict[str, Any]:  # (DataLoader workers open their own files)
        return {**self.__dict__, "_files": {}, "_pid": -1}

    def subset(self, idx: Tensor) -> ShardSplit:
        """The samples at ``idx`` (class list unchanged)."""
        keep = idx.tolist()
        return ShardSplit([self.samples[i] for i in keep], list(self.classes), self.size, list(self.shards), [self.locations[i] for i in keep])

    def read(self, i: int) -> bytes:
        """The encoded image bytes of sample ``i``, checked against the index's CRC-32."""
        shard, offset, length, crc = self.locations[i]
        if self._pid != os.getpid():  # a forked worker: its own files (pread needs no shared position)
            self._files, self._pid = {}, os.getpid()
        path = self.shards[shard]
        try:
            f = self._files.get(shard)
            if f is None:
                f = self._files[shard] = open(path, "rb", buffering=0)  # kept open for the next reads
            data = os.pread(f.fileno(), length, offset)
        except OSError as err:
            raise UserError(f"cannot read shard {path} ({_one_line(err)}); check the disk, or {REWRITE}") from err
        if len(data) != length or zlib.crc32(data) != crc:
            raise UserError(f"shard {path} is corrupt: sample {self.samples[i][0]} does not match its checksum in {INDEX}; {REWRITE}")
        return data

    def open(self, i: int) -> Image.Image:
        """Decode sample ``i`` as an RGB image fitted to ``size`` (when set)."""
        try:
            img = _open_rgb(self.read(i))
        except _DECODE_ERRORS as err:
            raise UserError(f"cannot decode {self.samples[i][0]} ({_one_line(err)}); {REWRITE}") from err
        return img if self.size is None else _fit(img, self.size)

    def pixels(self, i: int) -> np.ndarray:
        """Sample ``i`` as uint8 ``(3, size, size)``: the pixels the in-memory split holds."""
        out: np.ndarray = np.asarray(self.open(i), dtype=np.uint8).transpose(2, 0, 1)
        return out


class ShardBatches(torch.utils.data.Dataset[tuple[Tensor, str]]):
    """Item ``k``: the images of ``batches[k]`` (sample indices) decoded as uint8 ``(B, 3, s, s)``,
    and '' or the one-line error that stopped the read (raised by the caller, in the main process:
    an exception in a DataLoader worker would come back with its traceback)."""

    def __init__(self, split: ShardSplit, batches: Sequence[Sequence[int]]) -> None:
        self.split, self.batches = split, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, k: int) -> tuple[Tensor, str]:
        try:
            return torch.from_numpy(np.stack([self.split.pixels(i) for i in self.batches[k]])), ""
        except UserError as err:
            return torch.empty(0, dtype=torch.uint8), str(err)


# --------------------------------------------------------------------------------------------
# Reading


def _read_index(root: Path) -> dict[str, Any]:
    if not root.is_dir():
        raise UserError(f"shard folder {root} does not exist; {REWRITE} first")
    path = root / INDEX
    if not path.is_file():
        raise UserError(f"{root} has no {INDEX}, so it is not a shard folder of sslbench; {REWRITE}")
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read {path} ({_one_line(err)}); {REWRITE}") from err
    if not isinstance(index, dict) or index.get("format") != FORMAT or index.get("version") != VERSION:
        raise UserError(f"{path} is not a version-{VERSION} {FORMAT} index; {REWRITE}")
    return index


def load_shards(arg: str, split: str, size: int) -> ShardSplit:
    """The ``split`` of the shard folder ``arg`` at storage size ``size`` (no image is read)."""
    root = Path(arg).expanduser().resolve()
    index = _read_index(root)
    part = index["splits"].get(split)
    if part is None:
        raise UserError(f"{root / INDEX} has no {split} split; {REWRITE}")
    shards: list[str] = []
    samples: list[tuple[str, int]] = []
    locations: list[tuple[int, int, int, int]] = []
    for n, shard in enumerate(part["shards"]):
        path = root / shard["file"]
        try:
            have = path.stat().st_size
        except OSError as err:
            raise UserError(f"shard {path} listed in {root / INDEX} is missing ({_one_line(err)}); {REWRITE}") from err
        if have != shard["bytes"]:
            raise UserError(f"shard {path} is corrupt: {have} bytes, {INDEX} says {shard['bytes']}; {REWRITE}")
        shards.append(str(path))
        for key, label, offset, length, crc in shard["samples"]:
            samples.append((f"{shard['file']}#{key}", int(label)))
            locations.append((n, int(offset), int(length), int(crc)))
    if not samples:
        raise UserError(f"{root / INDEX}: the {split} split has no samples; {REWRITE}")
    return ShardSplit(samples, list(index["classes"]), size, shards, locations)


@register_data_source(
    "shards",
    arg="DIR",
    description="tar shards written by `sslbench shard` (WebDataset layout + index.json), read per sample by DataLoader workers",
)
def _shards(arg: str, split: str, size: int, cache_root: Path, max_memory_gb: float, download: bool) -> ShardSplit:
    return load_shards(arg, split, size)


# --------------------------------------------------------------------------------------------
# Writing


def _source_images(spec: str, split: str, image_size: int, cache_root: Path) -> tuple[Sequence[Any], list[int], list[str], str]:
    """The images of ``spec``'s ``split`` as (undecoded sources, labels, classes, where): the files
    of an image folder or the records of a Hugging Face data set, as they are; any other source
    decoded at ``store_size(image_size)`` and encoded as lossless PNG."""
    from sslbench.data import ImageSplit, load_split, parse_spec, store_size
    from sslbench.data.hf import hf_sources
    from sslbench.data.sources import imagefolder_files

    source, arg = parse_spec(spec)
    if source.name == "imagefolder":
        files, labels, classes, split_dir = imagefolder_files(arg, split)
        return files, labels, classes, str(split_dir)
    if source.name == "hf":
        sources, label_tensor, classes, where, _, _ = hf_sources(arg, split, cache_root)
        return sources, label_tensor.tolist(), classes, where
    if source.name == "shards":
        raise UserError(f"{spec} is already a shard folder; give the images it was written from as SRC")
    loaded = load_split(spec, split, image_size, cache_dir=cache_root, max_memory_gb=float("inf"))
    if not isinstance(loaded, ImageSplit):
        raise UserError(f"{spec} {split} is not an in-memory split; give an image folder or hf: source")
    size, images = store_size(image_size), loaded.images

    class _Png(Sequence[bytes]):
        def __len__(self) -> int:
            return len(images)

        def __getitem__(self, i: Any) -> Any:
            buf = io.BytesIO()
            Image.fromarray(images[i].permute(1, 2, 0).numpy()).save(buf, format="PNG")
            return buf.getvalue()

    return _Png(), loaded.labels.tolist(), list(loaded.classes), f"{spec} {split} ({size} px)"


def _encoded(source: Any) -> bytes:
    """The bytes of an undecoded source (bytes, a Hugging Face ``{'bytes', 'path'}`` record, a path)."""
    if isinstance(source, dict):
        source = source["bytes"] if source.get("bytes") is not None else source["path"]
    if isinstance(source, bytes):
        return source
    with open(source, "rb") as f:
        return f.read()


_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "TIFF": "tif", "PPM": "ppm", "GIF": "gif"}


def write_shards(spec: str, dst: str | Path, shard_size: int, *, image_size: int, cache_root: Path) -> dict[str, Any]:
    """Write the train and test splits of the data spec ``spec`` as tar shards of ``shard_size``
    samples into ``dst`` (which must not exist or be empty), with ``dst/index.json``; returns the
    index. Unreadable images are skipped (and counted), as the in-memory loaders skip them, so
    sample ``i`` of a split is image ``i`` of the split those loaders give."""
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise UserError(f"--shard-size must be a positive number of images per shard, got {shard_size!r}; e.g. --shard-size 10000")
    out = Path(dst).expanduser().resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"DST {out} exists and is not an empty folder; pass a new folder (shards are never written over others)")
    gathered = {split: _source_images(spec, split, image_size, cache_root) for split in SPLITS}
    classes = gathered["train"][2]
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    index: dict[str, Any] = {"format": FORMAT, "version": VERSION, "source": spec, "classes": classes, "shard_size": shard_size, "splits": {}}
    try:
        for split, (sources, labels, _, where) in gathered.items():
            index["splits"][split] = _write_split(tmp, split, sources, labels, shard_size, where)
        write_text_atomic(tmp / INDEX, json.dumps(index, indent=1), f"free some space and run `sslbench shard` again into {out}")
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return index


def _write_split(root: Path, split: str, sources: Sequence[Any], labels: list[int], shard_size: int, where: str) -> dict[str, Any]:
    (root / split).mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, Any]] = []
    sides: list[int] = []
    skipped: list[str] = []
    shard: _TarWriter | None = None  # the shard being filled (one image in memory at a time)
    for i in range(len(sources)):
        try:
            data = _encoded(sources[i])
            with Image.open(io.BytesIO(data)) as probe:
                fmt = probe.format or "PNG"
            img = _open_rgb(data)  # as the in-memory loaders decode it: what they skip is skipped here
        except (*_DECODE_ERRORS, KeyError) as err:
            skipped.append(f"image {i} ({_one_line(err)})")
            continue
        sides.append(min(img.size))
        if shard is None:
            shard = _TarWriter(root, f"{split}/shard-{len(shards):06d}.tar")
        shard.add(f"{len(sides) - 1:09d}", _EXT.get(fmt, fmt.lower()), data, int(labels[i]))
        if len(shard.samples) == shard_size:
            shards.append(shard.close())
            shard = None
    if shard is not None:
        shards.append(shard.close())
    if skipped:
        logger.warning("skipped %d unreadable image(s) in %s; first: %s", len(skipped), where, skipped[0])
    if not sides:
        raise UserError(f"no readable image in {where}; check the images")
    return {
        "count": len(sides),
        "skipped": len(skipped),
        "image_size": median_side(torch.tensor(sides)),  # median shorter side of the images as stored
        "shards": shards,
    }


class _TarWriter:
    """One tar in WebDataset's layout, written sample by sample; :meth:`close` returns its index
    entry (the offsets read back from the tar's headers)."""

    def __init__(self, root: Path, name: str) -> None:
        self.path, self.name = root / name, name
        self.tar = tarfile.open(self.path, "w", format=tarfile.USTAR_FORMAT)
        self.samples: list[list[Any]] = []  # [key, label, member name, crc32]

    def add(self, key: str, ext: str, data: bytes, label: int) -> None:
        for member, payload in ((f"{key}.{ext}", data), (f"{key}.cls", str(label).encode())):
            info = tarfile.TarInfo(member)
            info.size, info.mode, info.mtime = len(payload), 0o644, 0
            self.tar.addfile(info, io.BytesIO(payload))
        self.samples.append([key, label, f"{key}.{ext}", zlib.crc32(data)])

    def close(self) -> dict[str, Any]:
        self.tar.close()
        with tarfile.open(self.path, "r") as tar:
            offsets = {m.name: (m.offset_data, m.size) for m in tar.getmembers()}
        entries = [[key, label, *offsets[member], crc] for key, label, member, crc in self.samples]
        digest = hashlib.sha256()
        with open(self.path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        return {"file": self.name, "count": len(entries), "bytes": self.path.stat().st_size, "sha256": digest.hexdigest(), "samples": entries}
