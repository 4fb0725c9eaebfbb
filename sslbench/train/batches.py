"""The training data stream: which samples each step sees and their augmented views.

Data order and augmentation are pure functions of ``(seed, epoch, position)``: a step's global
batch is a slice of a seeded permutation, each process takes its contiguous share, and views come
from :mod:`sslbench.core.augment`'s counter-based randomness. So N processes see exactly the batches
one process sees, and a resumed run continues exactly where it stopped.

Each view has its own :class:`~sslbench.core.method.ViewSpec` (augmentation and output size):
multi-crop views of several sizes are augmented as whole batches, one view at a time.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.profiler import record_function

from sslbench.core.augment import BatchAugment, last_box, per_image_transform
from sslbench.core.errors import UserError
from sslbench.core.method import ViewSpec
from sslbench.data import FileSplit, ImageSplit
from sslbench.data.shards import ShardBatches, ShardSplit

__all__ = ["DATA_GPU_SHARE", "Plan", "data_fits_on_device", "epoch_permutation", "stream_batches"]

DATA_GPU_SHARE = 0.25  # in-memory training data is copied to a GPU when it takes at most this share of its memory


@dataclass
class Plan:
    """Step bookkeeping derived from the config and the data set size."""

    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    global_batch: int
    local_batch: int

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch


def epoch_permutation(n: int, seed: int, epoch: int) -> Tensor:
    """The data order of one epoch: a pure function of (seed, epoch)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


def data_fits_on_device(nbytes: int, device: torch.device) -> bool:
    """Whether in-memory training data of ``nbytes`` is kept on ``device`` (always on the CPU; on
    a GPU when it takes at most :data:`DATA_GPU_SHARE` of the GPU's memory, which leaves the rest
    to the model: 8 GB of data would not leave a 16 GB GPU room to train a ResNet-50)."""
    if device.type != "cuda":
        return True
    return nbytes <= DATA_GPU_SHARE * torch.cuda.get_device_properties(device).total_memory


def _to_device_async(t: Tensor, device: torch.device) -> Tensor:
    """``t`` (on the host) copied to ``device`` without blocking the host: a plain ``.to(cuda)``
    from pageable memory synchronises the stream (the GPU's queue drains), so CUDA copies go
    through pinned memory with ``non_blocking``."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class FileViews(torch.utils.data.Dataset[tuple[list[Tensor], Tensor, int]]):
    """Per-image path for data that does not fit in memory: decode, then the torchvision pipeline
    of each view, seeded per (seed, epoch, index, view) so it is independent of worker and process."""

    def __init__(self, split: FileSplit, specs: Sequence[ViewSpec], seed: int) -> None:
        self.split = split
        self.transforms = [per_image_transform(s.aug, s.size) for s in specs]
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> tuple[list[Tensor], Tensor, int]:
        """The views of image ``i`` and their crop boxes ``(V, 5)`` (:func:`~sslbench.core.augment.crop_box`)."""
        img = self.split.open(i)
        views, boxes = [], []
        for v, t in enumerate(self.transforms):
            torch.manual_seed(hash((self.seed, self.epoch, i, v)) & 0x7FFF_FFFF_FFFF)
            views.append(t(img))
            boxes.append(last_box(t))
        return views, torch.stack(boxes), i


def _augment(augmenters: list[BatchAugment], imgs: Tensor, idx: Tensor, seed: int, epoch: int) -> tuple[list[Tensor], list[Tensor]]:
    """Every view of ``imgs`` and its crop boxes."""
    pairs = [aug.view_and_box(imgs, idx, seed=seed, epoch=epoch, view=v) for v, aug in enumerate(augmenters)]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def stream_batches(
    train: ImageSplit | FileSplit,
    specs: Sequence[ViewSpec],
    plan: Plan,
    *,
    seed: int,
    start_step: int,
    rank: int,
    device: torch.device,
    num_workers: int = 2,
    data_on_device: bool | None = None,
) -> Iterator[tuple[int, list[Tensor], Tensor, list[Tensor]]]:
    """Yield (step, views, local sample indices, boxes) from ``start_step`` while ``step <
    plan.total_steps`` (read at every step: the loop may shorten the run); each process gets its
    contiguous share of the step's global batch, ``views[v]`` follows ``specs[v]`` and
    ``boxes[v]`` (B, 5) says where it came from (:attr:`~sslbench.core.method.Batch.boxes`).

    In-memory data lives on ``device`` (``data_on_device``, default :func:`data_fits_on_device`)
    or else in host memory, where each step's images are gathered and copied to the device
    without blocking. Either way the indices are on ``device`` and nothing in a step waits for
    the device (no host sync). Shards (:class:`~sslbench.data.shards.ShardSplit`) are read and
    decoded by ``num_workers`` DataLoader workers, this process's share of each remaining step
    only, and augmented on the device like in-memory images: the same views for the same images."""
    n = len(train)
    augmenters = [BatchAugment(s.aug, s.size) for s in specs]
    file_views = FileViews(train, specs, seed) if isinstance(train, FileSplit) and not isinstance(train, ShardSplit) else None
    images = None
    if isinstance(train, ImageSplit):
        if data_on_device is None:
            data_on_device = data_fits_on_device(train.images.nbytes, device)
        images = train.images.to(device) if data_on_device else train.images
    step = start_step
    while step < plan.total_steps:
        epoch = plan.epoch_of(step)
        perm = epoch_permutation(n, seed, epoch)
        first = step - epoch * plan.steps_per_epoch
        last = min(plan.steps_per_epoch, first + (plan.total_steps - step))

        def local(order: Tensor, first: int = first, last: int = last) -> list[Tensor]:
            lo, hi = rank * plan.local_batch, (rank + 1) * plan.local_batch
            return [order[p * plan.global_batch + lo : p * plan.global_batch + hi] for p in range(first, last)]

        if images is not None:
            perm_device = _to_device_async(perm, device)  # once per epoch; the steps slice it on the device
            for idx_host, idx in zip(local(perm), local(perm_device)):
                if step >= plan.total_steps:  # the loop may cut the run short (time budget)
                    return
                with record_function("sslbench.core.augment"):
                    imgs = images[idx] if data_on_device else _to_device_async(images[idx_host], device)
                    views, boxes = _augment(augmenters, imgs, idx, seed, epoch)
                yield step, views, idx, boxes
                step += 1
        elif isinstance(train, ShardSplit):
            # Shards: DataLoader workers read and decode this process's share of each step's batch
            # (only the steps still to train), then the batch is augmented on the device as in memory.
            shares = local(perm)
            shard_loader = torch.utils.data.DataLoader(
                ShardBatches(train, [idx.tolist() for idx in shares]),
                batch_size=None,
                num_workers=num_workers,
                pin_memory=device.type == "cuda",
                persistent_workers=False,
            )
            for idx_host, (imgs_host, error) in zip(shares, shard_loader):
                if error:
                    raise UserError(error)
                if step >= plan.total_steps:
                    return
                with record_function("sslbench.core.augment"):
                    imgs, idx = imgs_host.to(device, non_blocking=True), _to_device_async(idx_host, device)
                    views, boxes = _augment(augmenters, imgs, idx, seed, epoch)
                yield step, views, idx, boxes
                step += 1
        else:
            assert file_views is not None
            file_views.epoch = epoch
            loader = torch.utils.data.DataLoader(
                file_views,
                batch_sampler=[idx.tolist() for idx in local(perm)],
                num_workers=num_workers,
                pin_memory=device.type == "cuda",
                persistent_workers=False,
            )
            for views, boxes, idx in loader:
                if step >= plan.total_steps:
                    return
                views = [v.to(device, non_blocking=True) for v in views]
                yield step, views, idx, [b.to(device, non_blocking=True) for b in boxes.unbind(1)]
                step += 1
