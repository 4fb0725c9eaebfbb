"""The split types of :mod:`sslbench.data` (private; re-exported there): the in-memory
:class:`ImageSplit` and the file-backed :class:`FileSplit`, plus the memory check for splits that
have no file-backed form.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image
from torch import Tensor

from sslbench.core.errors import UserError
from sslbench.data.decode import _DECODE_ERRORS, _fit, _one_line, _open_rgb

SPLITS = ("train", "test")


@dataclass
class ImageSplit:
    """A split held in memory: ``images`` uint8 (N, 3, H, W), ``labels`` int64 (N,), the class
    names (``classes[label]``), and ``source_side``: the median shorter side in pixels of the images
    as read, before they were fitted to the storage size (None when not known, e.g. a split cached
    before it was recorded)."""

    images: Tensor
    labels: Tensor
    classes: list[str]
    source_side: int | None = None

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4 or self.images.shape[1] != 3:
            raise ValueError(f"images must be uint8 (N, 3, H, W), got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.dtype != torch.int64 or self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"labels must be int64 ({self.images.shape[0]},), got {self.labels.dtype} {tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, idx: Tensor) -> ImageSplit:
        """The images at ``idx`` (class list unchanged, so labels keep their meaning)."""
        return ImageSplit(self.images[idx], self.labels[idx], list(self.classes), self.source_side)


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


def _check_memory(n: int, size: int, max_memory_gb: float, what: str) -> None:
    """UserError when ``n`` images at ``size`` px exceed ``max_memory_gb`` (no file-backed form)."""
    need = n * 3 * size * size / 1e9
    if need > max_memory_gb:
        raise UserError(
            f"{what} needs {need:.3g} GB in memory at {size} px, more than max_memory_gb={max_memory_gb:g}; "
            "raise max_memory_gb, lower image_size, or export it as an image folder and use imagefolder:PATH"
        )
