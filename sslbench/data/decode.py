"""Image decoding for :mod:`sslbench.data` (private): one image to RGB, the fit to the storage size,
and the chunked (DataLoader-parallel) decoding of many images; plus the short message helpers
the data modules share.
"""

from __future__ import annotations

import difflib
import io
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

#: File name endings read as images in an image folder (torchvision's ImageFolder list).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

#: Images decoded per DataLoader item.
_CHUNK = 512
#: Below this many images decoding runs in the calling process (starting workers costs more).
_PARALLEL_MIN_IMAGES = 4096
#: Exceptions that mean "this image cannot be decoded" (PIL raises all of these for bad input).
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


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


#: An item of :class:`_DecodeChunks`: ``(start, images, ok, sides, errors)``.
_Chunk = tuple[int, Tensor, Tensor, Tensor, list[tuple[int, str]]]


class _DecodeChunks(torch.utils.data.Dataset[_Chunk]):
    """Item ``k``: images ``k*chunk .. (k+1)*chunk`` of ``sources`` decoded and fitted to ``size``,
    as ``(start, images uint8 (n, 3, size, size), ok bool (n,), sides int64 (n,), errors [(index,
    message)])``; ``sides`` is each image's shorter side as decoded. Unreadable images are zeros
    with ``ok`` False (and side 0)."""

    def __init__(self, sources: Sequence[Any], size: int, chunk: int) -> None:
        self.sources, self.size, self.chunk = sources, size, chunk

    def __len__(self) -> int:
        return -(-len(self.sources) // self.chunk)

    def __getitem__(self, k: int) -> _Chunk:
        start = k * self.chunk
        batch = self.sources[start : start + self.chunk]
        images = np.zeros((len(batch), 3, self.size, self.size), dtype=np.uint8)
        ok = np.zeros(len(batch), dtype=bool)
        sides = np.zeros(len(batch), dtype=np.int64)
        errors: list[tuple[int, str]] = []
        for j, source in enumerate(batch):
            try:
                img = _open_rgb(source)
                sides[j] = min(img.size)
                images[j] = np.asarray(_fit(img, self.size)).transpose(2, 0, 1)
                ok[j] = True
            except _DECODE_ERRORS as err:
                errors.append((start + j, _one_line(err)))
        return start, torch.from_numpy(images), torch.from_numpy(ok), torch.from_numpy(sides), errors


def _decode_all(sources: Sequence[Any], size: int) -> tuple[Tensor, Tensor, Tensor, list[tuple[int, str]]]:
    """Decode every source (in order) with DataLoader workers when there are many.

    Returns ``(images uint8 (N, 3, size, size), ok bool (N,), sides int64 (N,), errors)``: rows that
    failed are zeros; ``sides`` are the shorter sides of the images as decoded (0 where one failed).
    """
    n = len(sources)
    workers = min(_cpu_count(), 8) if n >= _PARALLEL_MIN_IMAGES else 0
    loader = torch.utils.data.DataLoader(_DecodeChunks(sources, size, _CHUNK), batch_size=None, shuffle=False, num_workers=workers)
    images = torch.empty((n, 3, size, size), dtype=torch.uint8)
    ok = torch.empty(n, dtype=torch.bool)
    sides = torch.zeros(n, dtype=torch.int64)
    errors: list[tuple[int, str]] = []
    for start, chunk_images, chunk_ok, chunk_sides, chunk_errors in loader:
        images[start : start + len(chunk_ok)] = chunk_images
        ok[start : start + len(chunk_ok)] = chunk_ok
        sides[start : start + len(chunk_ok)] = chunk_sides
        errors.extend(chunk_errors)
    return images, ok, sides, errors


def median_side(sides: Tensor) -> int | None:
    """The median (the lower one of an even count) of the image sides ``sides``; None when empty."""
    return int(sides.median()) if sides.numel() else None


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _did_you_mean(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(word.lower(), list(choices), n=3, cutoff=0.6)
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""


def _one_line(err: BaseException) -> str:
    """An exception as one short line (type and message, whitespace collapsed)."""
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}"[:300] if text else type(err).__name__
