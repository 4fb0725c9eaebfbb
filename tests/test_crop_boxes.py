"""The crops' geometry reaches the method: ``Batch.boxes`` says where every view came from.

An image whose pixels encode their own coordinates (channel 0: 4 * row, channel 1: 4 * column)
is cropped by the augmentation; reading the coordinates back from the view's interior gives the
box and flip it was cut from, which must equal the box the stream reports. Both the batched
(in-memory, shards) path and the per-image (file-backed, torchvision) path, on a non-square image.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from sslbench.core.augment import IMAGENET_MEAN, IMAGENET_STD, AugmentConfig, BatchAugment
from sslbench.core.method import Batch, ViewSpec
from sslbench.data.splits import FileSplit
from sslbench.testing import step_info
from sslbench.train.batches import FileViews

H, W, S = 48, 60, 12  # a non-square source: boxes are normalised by height and width separately
GEOMETRY_ONLY = AugmentConfig(crop_scale=(0.2, 1.0), jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)


def _coordinate_image() -> torch.Tensor:
    """uint8 (3, H, W): channel 0 = 4 * row, channel 1 = 4 * column, channel 2 = 0."""
    rows = torch.arange(H).view(H, 1).expand(H, W)
    cols = torch.arange(W).view(1, W).expand(H, W)
    return torch.stack([4 * rows, 4 * cols, torch.zeros(H, W, dtype=torch.int64)]).to(torch.uint8)


def _expected_coordinates(box: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(S,) source row and (S,) source column at each view pixel's centre, from a crop_box row:
    the pixel-centre convention (source pixel i spans [i, i + 1)) of bilinear resizing."""
    top, left, h, w, flip = box.double().tolist()
    centres = (torch.arange(S, dtype=torch.float64) + 0.5) / S
    rows = (top + centres * h) * H - 0.5
    cols = (left + (1 - centres if flip else centres) * w) * W - 0.5
    return rows, cols


def _read_back(view: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, S) source rows and columns encoded in a normalised (3, S, S) view."""
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    x = (view.double() * std + mean) * 255 / 4
    return x[0], x[1]


def _assert_box_matches_view(box: torch.Tensor, view: torch.Tensor) -> None:
    rows, cols = _expected_coordinates(box)
    got_rows, got_cols = _read_back(view)
    inner = slice(2, S - 2)  # the resize's filter is clamped at the crop's border
    assert torch.allclose(got_rows[inner, inner], rows[inner].view(-1, 1).expand(S - 4, S - 4), atol=0.15), box
    assert torch.allclose(got_cols[inner, inner], cols[inner].view(1, -1).expand(S - 4, S - 4), atol=0.15), box


def test_batched_boxes_are_where_the_views_were_cut() -> None:
    aug = BatchAugment(GEOMETRY_ONLY, S)
    images = _coordinate_image().unsqueeze(0).expand(16, 3, H, W).contiguous()
    index = torch.arange(100, 116)
    views, boxes = aug.view_and_box(images, index, seed=3, epoch=1, view=0)
    assert boxes.shape == (16, 5) and boxes.dtype == torch.float32
    assert torch.equal(views, aug(images, index, seed=3, epoch=1, view=0))  # the views are unchanged
    assert 0 < int(boxes[:, 4].sum()) < 16  # both flipped and unflipped views were checked
    assert bool((boxes[:, :4] >= 0).all() and (boxes[:, :2] + boxes[:, 2:4] <= 1 + 1e-6).all())
    for box, view in zip(boxes, views):
        _assert_box_matches_view(box, view)


def test_file_backed_boxes_are_where_the_views_were_cut(tmp_path: Path) -> None:
    files = []
    for i in range(6):
        path = tmp_path / f"{i}.png"
        PIL.Image.fromarray(np.ascontiguousarray(_coordinate_image().permute(1, 2, 0).numpy())).save(path)
        files.append((str(path), 0))
    dataset = FileViews(FileSplit(files, ["a"]), [ViewSpec(GEOMETRY_ONLY, S)] * 2, seed=5)
    flips = 0
    for i in range(len(files)):
        views, boxes, index = dataset[i]
        assert index == i and boxes.shape == (2, 5)
        for view, box in zip(views, boxes):
            _assert_box_matches_view(box, view)
            flips += int(box[4])
    assert 0 < flips < 2 * len(files)


@pytest.mark.parametrize("with_boxes", [True, False])
def test_batch_slice_cuts_the_boxes_with_the_views(with_boxes: bool) -> None:
    views = [torch.randn(6, 3, 4, 4), torch.randn(6, 3, 2, 2)]
    boxes = [torch.rand(6, 5), torch.rand(6, 5)] if with_boxes else None
    part = Batch(views, torch.arange(6), step_info(0), boxes).slice(2, 5)
    assert torch.equal(part.views[1], views[1][2:5]) and torch.equal(part.index, torch.arange(2, 5))
    if boxes is None:
        assert part.boxes is None
        whole = torch.tensor([0.0, 0.0, 1.0, 1.0, 0.0]).expand(3, 5)
        assert all(torch.equal(b, whole) for b in part.view_boxes())
    else:
        assert part.boxes is not None and all(torch.equal(p, b[2:5]) for p, b in zip(part.boxes, boxes))
