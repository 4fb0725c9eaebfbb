"""Vision transformers as first-class backbones: the evaluated feature is timm's own pre-logits
feature, position embeddings are interpolated for inputs of another size (timm's
``dynamic_img_size``) without changing the output at the model's own size, and every registered
method trains a ViT on views of two sizes (multi-crop).
"""

from __future__ import annotations

import pytest
import timm
import torch
from timm.layers import resample_abs_pos_embed

from sslbench.backbones import create_backbone
from sslbench.core.augment import AugmentConfig, eval_batch
from sslbench.core.registry import METHODS, get_method
from sslbench.evaluation.features import extract_features
from sslbench.testing import check_views_of_several_sizes

VIT = "vit_tiny_patch16_224"


def test_encoder_feature_is_timms_pre_logits_feature():
    """The encoder (``num_classes=0``) and the evaluation's feature extraction give exactly what
    timm's ``forward_head(forward_features(x), pre_logits=True)`` gives: the final-norm CLS token."""
    torch.manual_seed(0)
    m = create_backbone(VIT, 32).eval()
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    x = eval_batch(images, 32)
    with torch.no_grad():
        want = m.forward_head(m.forward_features(x), pre_logits=True)
        assert torch.equal(m(x), want)
        assert torch.equal(want, m.forward_features(x)[:, 0])  # DINO's feature, the CLS token after the last norm
    got = extract_features(m, images, image_size=32)
    assert got.shape == (6, m.num_features) and torch.allclose(got, want, atol=1e-6)


def test_position_embeddings_are_interpolated_for_other_sizes_and_unchanged_at_the_own_size():
    torch.manual_seed(0)
    m = create_backbone(VIT, 32).eval()
    assert m.dynamic_img_size and m.patch_embed.patch_size == (4, 4)
    fixed = timm.create_model(VIT, num_classes=0, img_size=32, patch_size=4).eval()
    fixed.load_state_dict(m.state_dict())
    x32, x16 = torch.randn(3, 3, 32, 32), torch.randn(3, 3, 16, 16)
    small = timm.create_model(VIT, num_classes=0, img_size=16, patch_size=4).eval()
    state = dict(m.state_dict())
    state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], (4, 4), (8, 8), num_prefix_tokens=1)
    small.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(m(x32), fixed(x32))  # the model's own size: unchanged
        assert torch.allclose(m(x16), small(x16), atol=1e-5)  # 16 px: the 8x8 grid's embeddings resampled to 4x4
        with pytest.raises(AssertionError):
            fixed(x16)  # without dynamic_img_size timm refuses another size
    big = create_backbone(VIT, 224)
    assert big.dynamic_img_size and big(torch.zeros(1, 3, 96, 96)).shape == (1, big.num_features)  # DINO's 224/96
    assert create_backbone(VIT, 32, dynamic_img_size=False).dynamic_img_size is False  # an explicit choice is kept


@pytest.mark.parametrize("name", METHODS.names())
def test_every_method_trains_a_vit_on_views_of_two_sizes(name):
    """Each registered method that uses several views, on a 2-block ViT-Tiny (patch 4 at 32 px): its own views, and when
    they all have one size the last view at half the size (16 px, a 4x4 grid): one step gives a
    finite loss and gradients on the patch and position embeddings (sslbench.testing.check_views_of_several_sizes)."""
    reason = check_views_of_several_sizes(name)
    if reason:
        pytest.skip(reason)


@pytest.mark.parametrize(("name", "key"), [("swav", "local_crop_size"), ("dino", "local_crop_size")])
def test_default_local_crops_fit_a_vits_patches_and_a_size_that_does_not_is_refused(name, key):
    """At 32 px a ViT has 4 px patches: the default local crop side is rounded to a multiple of
    them (SwAV's 9/16 of 32 = 18 px becomes 16), while a ResNet keeps the method's own default;
    a local size the user sets that the patches do not tile is one clear error naming the key."""
    from sslbench.core.errors import UserError

    cls = get_method(name)
    vit_sizes = {s.size for s in cls(create_backbone(VIT, 32, depth=1), cls.Config()).views(AugmentConfig(), 32)}
    assert vit_sizes == {32, 16}
    resnet = create_backbone("resnet18", 32, channels=(8, 16, 32, 64))
    assert {s.size for s in cls(resnet, cls.Config()).views(AugmentConfig(), 32)} == {32, 18 if name == "swav" else 16}
    with pytest.raises(UserError, match=f"method_cfg.{key} 18 px must be a multiple of the backbone's 4 px patches"):
        cls(create_backbone(VIT, 32, depth=1), cls.Config(**{key: 18})).views(AugmentConfig(), 32)
