"""timm backbones: any name, small-image adaptations, strict reloading."""

import pytest
import torch
from torch import nn

from sslbench.backbones import create_backbone, load_state_strict
from sslbench.core.errors import UserError


def test_resnet_gets_cifar_stem_at_32px():
    m = create_backbone("resnet18", 32)
    assert isinstance(m.conv1, nn.Conv2d) and m.conv1.kernel_size == (3, 3) and m.conv1.stride == (1, 1)
    assert isinstance(m.maxpool, nn.Identity)
    assert m(torch.zeros(2, 3, 32, 32)).shape == (2, m.num_features)
    big = create_backbone("resnet18", 224)
    assert big.conv1.kernel_size == (7, 7) and not isinstance(big.maxpool, nn.Identity)


def test_deep_stem_resnet_stride_one():
    m = create_backbone("resnet18d", 32)
    first = next(x for x in m.conv1.modules() if isinstance(x, nn.Conv2d))
    assert first.stride == (1, 1) and isinstance(m.maxpool, nn.Identity)


def test_timm_kwargs_pass_through_narrow_resnet():
    m = create_backbone("resnet18", 32, channels=(16, 32, 64, 128))
    assert m.num_features == 128
    assert m.layer1[0].conv1.out_channels == 16


def test_vit_gets_fitting_patch_and_image_size():
    m = create_backbone("vit_tiny_patch16_224", 32)
    assert m.patch_embed.grid_size == (8, 8)
    assert m(torch.zeros(1, 3, 32, 32)).shape == (1, m.num_features)


def test_unknown_backbone_suggests_close_matches():
    with pytest.raises(UserError, match=r"unknown backbone 'resnet181'.*resnet18"):
        create_backbone("resnet181", 32)


def test_strict_load_reports_mismatch():
    a = create_backbone("resnet18", 32, channels=(16, 32, 64, 128))
    b = create_backbone("resnet18", 32)
    with pytest.raises(UserError, match="shape mismatch"):
        load_state_strict(b, a.state_dict(), source="x")
    c = create_backbone("resnet34", 32)
    with pytest.raises(UserError, match="unexpected keys"):
        load_state_strict(b, c.state_dict(), source="x")
