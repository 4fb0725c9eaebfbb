"""No collapse: a short training on the default data leaves every method with spread-out
embeddings and a better k-NN than its untrained backbone.

Threshold: a collapsed encoder maps every image to the same point, so the mean per-dimension
standard deviation of its L2-normalised features h is 0. The natural reference is the untrained
backbone of the same seed: a randomly initialised ResNet already maps images to nearly the same
direction (pooled post-ReLU features; mean std ~0.005 for the narrow ResNet-18 on digits, against
1/sqrt(128) = 0.088 for directions spread over the sphere), and a healthy short run spreads them
out (~0.02-0.025 measured for BYOL and MoCo). We require 1.5x the untrained spread: collapse falls
below it, a method that learns anything clears it by a wide margin.
"""

import json

import pytest
import torch
import torch.nn.functional as F

from sslbench.backbones import create_backbone, load_encoder
from sslbench.config import build_config
from sslbench.data import load_split
from sslbench.evals.features import extract_features
from sslbench.pipeline import train_and_score
from sslbench.registry import METHODS


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS.names())
def test_short_training_does_not_collapse_and_beats_untrained(method, tmp_path, monkeypatch):
    monkeypatch.setenv("SSLBENCH_CACHE", str(tmp_path / "cache"))
    cfg = build_config(
        flags={"method": method, "epochs": 4, "batch_size": 128, "seed": 0, "output": str(tmp_path / "run")},
        sets=["backbone_kwargs.channels=16,32,64,128", "checkpoint_every=0"],
    )
    result = train_and_score(cfg, quiet=True)
    metrics = json.loads((tmp_path / "run" / "results.json").read_text())["metrics"]
    assert metrics["knn_top1"] > metrics["untrained_knn_top1"], metrics
    encoder = load_encoder(tmp_path / "run")
    test = load_split("digits", "test", 32)

    def spread(enc):
        h = F.normalize(extract_features(enc, test.images, image_size=32), dim=1)
        return h.std(dim=0).mean().item()

    torch.manual_seed(cfg.seed)
    untrained = create_backbone(cfg.backbone, cfg.image_size, **cfg.backbone_kwargs)
    std, base = spread(encoder), spread(untrained)
    assert std > 1.5 * base, (std, base)
    assert result.steps == 4 * (1347 // 128)
