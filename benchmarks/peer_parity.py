"""Parity with a peer implementation (not a test): each method that lightly ships, trained twice on
the same images, backbone, epochs, batch, image size and seed, and scored with the same k-NN.

* **peer**: the method assembled from lightly's parts (heads, losses, transforms, memory banks,
  momentum utilities) with lightly's own published recipe for it, replayed as a plain PyTorch loop
  (the ``training_step`` / ``configure_optimizers`` of lightly's benchmark module; pytorch-lightning
  is not needed), fed by a torch ``DataLoader`` with lightly's transforms and ``--num-workers``
  workers over the image files;
* **sslbench**: the same method through ``sslbench.commands.pipeline.train_and_score`` (what ``sslbench
  train`` runs) with the method's own sslbench recipe.

Both sides train on the same class-balanced subset (``sslbench.data.balanced_subset`` of the
train split's file order, the ``train_subset`` sslbench itself draws) and the same backbone
construction (``sslbench.backbones.create_backbone``; lightly's heads take its ``num_features``);
both frozen encoders are scored with sslbench's k-NN (``sslbench/evaluation/features.py`` + ``evals/knn.py``,
k=200, T=0.1) on the test split, the memory bank being the whole train split (``--knn-bank``
draws a balanced subset of it, for smoke tests only). images/s is the training loop's (data
loading included; the peer's DataLoader workers start once per epoch, as under Lightning).

Every finished side is one JSON line in ``--rows`` (its budget, command, commit, versions, CPU,
threads, seed); a re-run skips the sides already there (resume across sessions), and the README
is rendered from the rows alone (:func:`render_readme`)::

    pip install -e '.[parity]'   # lightly, a benchmark-only extra (see pyproject.toml)
    nice -n 19 python benchmarks/peer_parity.py --subset 5000 --epochs 5 --batch-size 256
    python benchmarks/peer_parity.py --render-only      # README from the rows

lightly is imported only when the peer side trains, so ``--render-only`` (and the test of the
rendering) needs no lightly.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
OUT_DIR = REPO / "leaderboards" / "peer-parity"
ROWS = OUT_DIR / "results.jsonl"
LIGHTLY_COMMIT = "e8d317fc5a87f4387a85a35e689869039ec249ee"  # the lightly source the recipes were read from
CIFAR_BENCH = "docs/source/getting_started/benchmarks/cifar10_benchmark.py"

# Head sizes that lightly's ImageNet recipes make too large for a few-thousand-image CPU run: the
# same reduced size on both sides (the peer builds it, the sslbench side gets these --set overrides).
SHARED_SIZES: dict[str, dict[str, int]] = {
    "ibot": {"out_dim": 2048, "patch_out_dim": 2048},  # the CIFAR-10 benchmark's DINO: 2048 prototypes
    "dinov2": {"out_dim": 2048, "patch_out_dim": 2048},
    # sslbench's default predictor for ViT-Tiny (round(12 x 12/32) blocks, 192 x 384/1280 rounded up to
    # a multiple of 12); lightly's example builds its predictor from a ViT as large as the encoder
    "ijepa": {"predictor_depth": 4, "predictor_dim": 60},
}
# method -> (where lightly publishes the recipe, what the peer follows). Line ranges are of the
# files at LIGHTLY_COMMIT (the CIFAR-10 benchmark's transforms are at lines 167-204).
RECIPES: dict[str, tuple[str, str]] = {
    "simclr": (
        f"{CIFAR_BENCH}:173-178,360-389",
        "SimCLRProjectionHead(F, 512, 128), NTXentLoss(T=0.5); SimCLRTransform(32, cj 0.5, no blur); SGD 0.06 x B/128, m 0.9, wd 5e-4, cosine per epoch",
    ),
    "moco": (
        f"{CIFAR_BENCH}:292-357",
        "MoCoProjectionHead(F, 512, 128), NTXentLoss(T=0.1, bank 4096), momentum 0.99, batch shuffle, symmetric loss; SimCLRTransform; SGD 0.06 x B/128, wd 5e-4, cosine",
    ),
    "byol": (
        f"{CIFAR_BENCH}:167-171,534-594",
        "BYOLProjectionHead(F, 1024, 256), BYOLPredictionHead(256, 1024, 256), momentum 0.99 constant; BYOLTransform (no blur); SGD 0.06 x B/128, wd 5e-4, cosine",
    ),
    "simsiam": (
        f"{CIFAR_BENCH}:180-184,392-433",
        "2-layer projector F-2048-2048 (BN), SimSiamPredictionHead(2048, 512, 2048); SimSiamTransform (no blur); SGD 0.06 (no lr scaling), wd 5e-4, cosine",
    ),
    "swav": (
        f"{CIFAR_BENCH}:189-196,597-644",
        "SwaVProjectionHead(F, 512, 128), 512 prototypes, SwaVLoss defaults, no queue; 2 crops of 32 px (scale 0.14-1, cj 0.5, no blur); Adam 1e-3 x B/128, wd 1e-6, cosine",
    ),
    "barlow_twins": (
        f"{CIFAR_BENCH}:167-171,455-491",
        "2-layer projector F-2048-2048 (BN after the first), BarlowTwinsLoss defaults; BYOLTransform (no blur); SGD 0.06 x B/128, wd 5e-4, cosine",
    ),
    "vicreg": (
        "examples/pytorch/vicreg.py:17-55 (head, loss, transform) + " + f"{CIFAR_BENCH}:486-491 (optimizer)",
        "VICRegProjectionHead(F, 2048, 2048, 2 layers), VICRegLoss defaults, VICRegTransform(32); lightly's CIFAR benchmark has no VICReg: its shared SGD recipe (0.06 x B/128, wd 5e-4, cosine)",
    ),
    "nnclr": (
        f"{CIFAR_BENCH}:173-178,647-691",
        "2-layer projector F-2048-256 (BN), NNCLRPredictionHead(256, 4096, 256), NNMemoryBankModule(4096), NTXentLoss(T=0.5); SimCLRTransform; SGD 0.06 x B/128, wd 5e-4, cosine",
    ),
    "dino": (
        f"{CIFAR_BENCH}:198-204,694-753",
        "DINOProjectionHead with 2 layers (F-2048 BN GELU-256), 2048 prototypes, DINOLoss defaults (teacher T 0.04), momentum 0.99; DINOTransform(32, no local views, cj 0.5, no blur); SGD 0.06 x B/128, wd 5e-4, cosine",
    ),
    "mae": (
        "benchmarks/imagenet/vitb16/mae.py:20-161",
        "MaskedVisionTransformerTIMM + MaskedVisionTransformerDecoderTIMM, mask 0.75, MSE on raw (normalised-image) patches; MAETransform(32); AdamW 1.5e-4 x B/256, betas (0.9, 0.95), wd 0.05 (not on norms/biases), warm-up 40 of 100 epochs then cosine, per step",
    ),
    "simmim": (
        "examples/pytorch/simmim.py:15-57,66,92-107",
        "MaskedVisionTransformerTIMM with its mask token at 75% of the tokens (the example's ratio), nn.Linear(D, patch^2 x 3) head, L1 on the masked patches; "
        "MAETransform(32); AdamW 1.5e-4, no schedule",
    ),
    "dcl": (
        f"{CIFAR_BENCH}:173-178,243,756-785",
        "SimCLRProjectionHead(F, 512, 128), DCLLoss defaults (T 0.1); SimCLRTransform(32, cj 0.5, no blur); SGD 0.06 x B/128, m 0.9, wd 5e-4, cosine per epoch",
    ),
    "dclw": (
        f"{CIFAR_BENCH}:173-178,244,788-817",
        "SimCLRProjectionHead(F, 512, 128), DCLWLoss defaults (T 0.1, sigma 0.5); SimCLRTransform(32, cj 0.5, no blur); SGD 0.06 x B/128, m 0.9, wd 5e-4, cosine per epoch",
    ),
    "tico": (
        "benchmarks/imagenet/resnet50/tico.py:25-68,92-134",
        "TiCoProjectionHead(F, 4096, 256), TiCoLoss(beta 0.9, rho 8), online view 1 vs momentum view 2, momentum cosine 0.99 -> 1 per step; "
        "LARS 0.2 x B/256, m 0.9, wd 1.5e-6 (not on norms/biases), warm-up 10% of the steps (10 of 100 epochs) then cosine, per step; "
        "TiCoTransform at 32 px without blur (the CIFAR benchmark's small-image convention; the ImageNet file's transform is 224 px)",
    ),
    "mmcr": (
        "examples/pytorch/mmcr.py:21-43,53,68-92",
        "MMCRProjectionHead(F, 512, 128), MMCRLoss defaults (lambda 5e-3), online and momentum projections of k=8 views, momentum cosine 0.996 -> 1 per epoch; "
        "MMCRTransform(k 8, 32 px, no blur); SGD 0.06, no momentum, no weight decay, no schedule",
    ),
    "vicregl": (
        "examples/pytorch/vicregl.py:16-30,40,65-85",
        "BarlowTwinsProjectionHead(F, 2048, 2048) on the pooled map, VicRegLLocalProjectionHead(F, 128, 128) on the final feature map, VICRegLLoss defaults; "
        "VICRegLTransform(32 px, no local views, grid = the feature map's side); SGD 0.01, m 0.9, no schedule. At 32 px the map is 4x4, not 7x7: "
        "num_matches (20, 4) of 49 cells become the same shares of the grid (round(n x cells / 49))",
    ),
    "lejepa": (
        "benchmarks/imagenet/vitb16/lejepa.py:37-63,85-126",
        "On the ResNet (sslbench's lejepa default family; lightly's file trains a ViT-S/16 with drop path 0.1, which does not apply): "
        "LeJEPAProjectionHead(F) (2048, 64, 3 layers), LeJEPALoss defaults (lambda 0.05, 1024 directions); DINOTransform with 2 global views of 32 px (scale 0.3-1) "
        "and 6 local of 14 px (96/224 of 32; scale 0.05-0.3), blur off (the CIFAR benchmark's convention); AdamW 5e-4, wd 5e-2, warm-up 1 epoch from 0.01x, cosine to 0.001x, per step",
    ),
    "msn": (
        "examples/pytorch/msn.py:20-49,96-124",
        "MaskedVisionTransformerTIMM, MSNProjectionHead(D) (2048, 256), 1024 prototypes, MSNLoss defaults; the EMA target (0.996) sees view 1, the anchor sees view 2 "
        "and the focal views with 15% of the tokens dropped; MSNTransform(32 px, focal 12 px = 96/224 of 32 in whole patches); AdamW 1.5e-4, no schedule. "
        "As in the example, the loss gets prototypes.data, so the prototypes keep their initialisation",
    ),
    "ijepa": (
        "examples/pytorch/ijepa.py:18-65,86-126",
        "On sslbench's timm ViT (the example: torchvision ViT-B/32 for the encoder and for the predictor): MaskedVisionTransformerTIMM context and EMA target "
        "encoders (0.996 -> 1 linearly, after each step), IJEPAPredictorTIMM, IJEPAMaskCollator defaults (1 context block of scale 0.2-0.8, 2 target blocks "
        "of 0.2-0.8, aspect 0.3-3, min_keep 4), layer-normed target patch tokens, SmoothL1Loss; IJEPATransform(32 px); AdamW 1.5e-4, no schedule; "
        f"predictor depth {SHARED_SIZES['ijepa']['predictor_depth']}, width {SHARED_SIZES['ijepa']['predictor_dim']} on both sides (sslbench's ViT-Tiny default)",
    ),
    "ibot": (
        "benchmarks/imagenet/vitb16/ibot.py:49-175,213-302",
        "MaskedVisionTransformerTIMM student (drop path 0.1) and EMA teacher (cosine 0.996 -> 1), one DINOProjectionHead for [CLS] and patches (student norm_last_layer off), "
        "DINOLoss + IBOTPatchLoss (teacher T 0.04 -> 0.07 over 30% of the steps), random_block_mask; IBOTTransform(32 px, 10 local views of 12 px); "
        "AdamW 5e-4 x B/256, wd 0.04 -> 0.4 cosine (not on norms/biases), warm-up 10% of the steps then cosine to 1e-6, grad clip 3, last layer frozen in epoch 0; "
        f"prototypes {SHARED_SIZES['ibot']['out_dim']} on both sides (lightly's 8192 is ImageNet-size)",
    ),
    "dinov2": (
        "benchmarks/imagenet/vitb16/dinov2.py:59-203,237-369",
        "MaskedVisionTransformerTIMM student (drop path 0.1) and EMA teacher (cosine 0.992 -> 1), DINOv2ProjectionHead shared by DINOLoss and IBOTPatchLoss "
        "(teacher T 0.04 -> 0.07 over 30% of the steps), KoLeo 0.1, random_block_mask; DINOTransform(32 px, 8 local views of 12 px, scales 0.32-1 / 0.05-0.32); "
        "AdamW 0.004 x sqrt(B/1024), layer decay 0.9, patch embedding 0.2x, wd 0.04 -> 0.4 cosine (not on norms/biases), warm-up 10% of the steps then cosine to 1e-6, "
        f"grad clip 3, last layer frozen in epoch 0; prototypes {SHARED_SIZES['dinov2']['out_dim']} on both sides (lightly's 65536 is ImageNet-size)",
    ),
}
NOT_SHIPPED = {
    # sslbench's mocov3 has no lightly counterpart: lightly 1.6.0 ships MoCoProjectionHead (num_layers,
    # batch_norm for v3) but no MoCo v3 model, example or benchmark recipe.
    "mocov3": "lightly 1.6.0 ships a MoCo v3-capable head (MoCoProjectionHead(num_layers=3, batch_norm=True)) but no MoCo v3 model, example or benchmark recipe",
    "wmse": "lightly 1.6.0 ships WMSELoss but no W-MSE head, transform, example or benchmark recipe; a peer would be a recipe written here, not lightly's",
    "ressl": "lightly 1.6.0 ships no ReSSL model, loss, example or benchmark",
    "deepclusterv2": "lightly 1.6.0 ships no DeepCluster v2 model, loss, example or benchmark",
    "all4one": "lightly 1.6.0 ships no All4One model, loss, example or benchmark",
}
METHODS = list(RECIPES)
VIT_METHODS = {"mae", "simmim", "msn", "ijepa", "ibot", "dinov2"}  # trained on the ViT backbone (--vit-backbone); the others on --backbone


# --------------------------------------------------------------------------------------------
# Budget and rows


@dataclass(frozen=True)
class Budget:
    data: str
    subset: int
    epochs: int
    batch_size: int
    image_size: int
    backbone: str
    channels: str  # ResNet widths, "" for none
    vit_backbone: str
    seed: int
    num_workers: int
    knn_bank: int  # 0: the whole train split
    knn_test: int  # 0: the whole test split
    mae_decoder: str  # "dim,depth,heads" of the MAE decoder on both sides

    def key(self) -> dict[str, Any]:
        return dict(self.__dict__)


def read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def done(rows: list[dict[str, Any]], method: str, side: str, budget: Budget, sets: list[str] | None = None) -> dict[str, Any] | None:
    for row in rows:
        if row["method"] == method and row["side"] == side and row["budget"] == budget.key() and row.get("sets", []) == (sets or []):
            return row
    return None


def _bkey(row: dict[str, Any]) -> str:
    """The budget of a row as a hashable key (rows are grouped and compared per budget)."""
    return json.dumps(row["budget"], sort_keys=True)


def new_row(method: str, side: str, budget: Budget, command: str, env: dict[str, Any], load_before: float, **fields: Any) -> dict[str, Any]:
    """A result or profile row: what ran (method, side, budget, seed, command, commit, versions), its
    ``fields``, the date, and the 1-minute load average before and after (other jobs skew images/s)."""
    row = {"method": method, "side": side, "budget": budget.key(), "seed": budget.seed, "command": command, **env, **fields}
    row["date"] = time.strftime("%Y-%m-%d")
    row["loadavg_1min"] = [load_before, round(os.getloadavg()[0], 2)]
    return row


def append_row(path: Path, row: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(row, sort_keys=True) + "\n")


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment() -> dict[str, Any]:
    import timm
    import torch
    import torchvision

    try:
        from importlib.metadata import version

        lightly_version = version("lightly")
    except Exception:
        lightly_version = None
    cpu = "unknown CPU"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        cpu = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        pass
    return {
        "commit": _git("rev-parse", "--short", "HEAD"),
        # the code's state: rows appended under leaderboards/ by an earlier run do not make the tree dirty
        "dirty": bool(_git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!leaderboards")),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "timm": timm.__version__,
            "lightly": lightly_version,
        },
        "cpu": f"{cpu} ({os.cpu_count()} cores)",
        "threads": torch.get_num_threads(),
    }


# --------------------------------------------------------------------------------------------
# Data and scoring (shared by both sides)


def split_files(data: str) -> tuple[list[str], list[int]]:
    """The train split's files and labels in sslbench's order (sorted class folders, sorted files)."""
    from sslbench.data.sources import _class_folders, _image_files

    train_dir = Path(data).expanduser().resolve() / "train"
    files: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(_class_folders(train_dir)):
        found = _image_files(train_dir / name)
        files += found
        labels += [label] * len(found)
    return files, labels


def knn_score(encoder: Any, budget: Budget) -> dict[str, float]:
    """sslbench's k-NN (k=200, T=0.1, exp weighting) of the frozen encoder's features, test split."""
    import torch

    from sslbench.data import balanced_subset, load_split
    from sslbench.evals.knn import knn_eval
    from sslbench.evaluation.features import extract_features

    spec = f"imagefolder:{budget.data}"
    train = load_split(spec, "train", budget.image_size)
    test = load_split(spec, "test", budget.image_size)
    if budget.knn_bank:
        train = train.subset(balanced_subset(train.labels, budget.knn_bank, budget.seed))
    if budget.knn_test:
        test = test.subset(balanced_subset(test.labels, budget.knn_test, budget.seed))
    encoder = encoder.to("cpu").eval()
    with torch.no_grad():
        f_train = extract_features(encoder, train.images, image_size=budget.image_size)
        f_test = extract_features(encoder, test.images, image_size=budget.image_size)
    return knn_eval(f_train, train.labels, f_test, test.labels, k=200, temperature=0.1)


def make_backbone(method: str, budget: Budget) -> Any:
    from sslbench.backbones import create_backbone

    if method in VIT_METHODS:
        return create_backbone(budget.vit_backbone, budget.image_size)
    kwargs = {"channels": tuple(int(c) for c in budget.channels.split(","))} if budget.channels else {}
    return create_backbone(budget.backbone, budget.image_size, **kwargs)


# --------------------------------------------------------------------------------------------
# The peer: lightly's parts, lightly's recipe


class FileDataset:
    """(lightly transform of the RGB image, label), as lightly's LightlyDataset yields them."""

    def __init__(self, files: list[str], labels: list[int], transform: Callable[[Any], Any]) -> None:
        self.files, self.labels, self.transform = files, labels, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        from PIL import Image

        with Image.open(self.files[i]) as img:
            return self.transform(img.convert("RGB")), self.labels[i]


def _as_views(x: Any) -> list[Any]:
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _lightly_peers() -> Any:
    """benchmarks/_lightly_peers.py, next to this file (a script's folder is not a package)."""
    import importlib.util

    if "_lightly_peers" not in sys.modules:
        spec = importlib.util.spec_from_file_location("_lightly_peers", Path(__file__).resolve().parent / "_lightly_peers.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["_lightly_peers"] = module
        spec.loader.exec_module(module)
    return sys.modules["_lightly_peers"]


@dataclass
class PeerContext:
    """What a builder of benchmarks/_lightly_peers.py gets: the backbone and the budget's sizes."""

    backbone: Any
    F: int  # the backbone's feature dimension
    S: int  # image size
    B: int  # batch size
    E: int  # epochs
    steps_per_epoch: int
    out_dim: int  # SHARED_SIZES' prototype count of the method (0: none)
    sizes: dict[str, int]  # the method's SHARED_SIZES entry (the sizes both sides use)

    @staticmethod
    def emb(backbone: Any, x: Any) -> Any:
        return backbone(x).flatten(start_dim=1)


def build_peer(method: str, budget: Budget, steps_per_epoch: int) -> tuple[Any, Any, Callable[..., Any], Any, Any, bool]:
    """(model, transform, training_step(model, views, epoch), optimizer, scheduler, per_step) for ``method``,
    following lightly's published recipe (see RECIPES)."""
    import torch
    from lightly import loss as L
    from lightly.models import utils
    from lightly.models.modules import heads
    from lightly.models.modules.nn_memory_bank import NNMemoryBankModule
    from lightly.transforms import (
        BYOLTransform,
        BYOLView1Transform,
        BYOLView2Transform,
        DINOTransform,
        MAETransform,
        SimCLRTransform,
        SimSiamTransform,
        SwaVTransform,
        VICRegTransform,
    )
    from torch import nn

    S, B, E = budget.image_size, budget.batch_size, budget.epochs
    lr_factor = B / 128
    backbone = make_backbone(method, budget)
    F = int(backbone.num_features)
    peers = _lightly_peers()
    if method in peers.BUILDERS:  # the later methods, one small builder each
        sizes = SHARED_SIZES.get(method, {})
        ctx = PeerContext(backbone, F, S, B, E, steps_per_epoch, sizes.get("out_dim", 0), sizes)
        return peers.BUILDERS[method](ctx)  # type: ignore[no-any-return]
    byol_t = BYOLTransform(
        view_1_transform=BYOLView1Transform(input_size=S, gaussian_blur=0.0), view_2_transform=BYOLView2Transform(input_size=S, gaussian_blur=0.0)
    )
    simclr_t = SimCLRTransform(input_size=S, cj_strength=0.5, gaussian_blur=0.0)
    m = nn.Module()
    m.backbone = backbone

    def sgd(params: Any, lr: float | None = None) -> tuple[Any, Any]:
        return peers._cifar_sgd(params, B, E, lr)  # type: ignore[no-any-return]

    def emb(x: Any, bb: Any = None) -> Any:
        return (bb if bb is not None else m.backbone)(x).flatten(start_dim=1)

    if method == "simclr":
        m.projection_head = heads.SimCLRProjectionHead(F, 512, 128)
        crit = L.NTXentLoss()

        def step(views: list[Any], epoch: int) -> Any:
            return crit(m.projection_head(emb(views[0])), m.projection_head(emb(views[1])))

        return m, simclr_t, step, *sgd(m.parameters()), False
    if method == "moco":
        m.projection_head = heads.MoCoProjectionHead(F, 512, 128)
        m.backbone_momentum = copy.deepcopy(m.backbone)
        m.projection_head_momentum = copy.deepcopy(m.projection_head)
        utils.deactivate_requires_grad(m.backbone_momentum)
        utils.deactivate_requires_grad(m.projection_head_momentum)
        crit = L.NTXentLoss(temperature=0.1, memory_bank_size=(4096, 128))

        def step(views: list[Any], epoch: int) -> Any:
            utils.update_momentum(m.backbone, m.backbone_momentum, 0.99)
            utils.update_momentum(m.projection_head, m.projection_head_momentum, 0.99)

            def one(x0: Any, x1: Any) -> tuple[Any, Any]:
                x1, shuffle = utils.batch_shuffle(x1)
                q = m.projection_head(emb(x0))
                k = m.projection_head_momentum(emb(x1, m.backbone_momentum))
                return q, utils.batch_unshuffle(k, shuffle)

            return 0.5 * (crit(*one(views[0], views[1])) + crit(*one(views[1], views[0])))

        return m, simclr_t, step, *sgd(list(m.backbone.parameters()) + list(m.projection_head.parameters())), False
    if method == "byol":
        m.projection_head = heads.BYOLProjectionHead(F, 1024, 256)
        m.prediction_head = heads.BYOLPredictionHead(256, 1024, 256)
        m.backbone_momentum = copy.deepcopy(m.backbone)
        m.projection_head_momentum = copy.deepcopy(m.projection_head)
        utils.deactivate_requires_grad(m.backbone_momentum)
        utils.deactivate_requires_grad(m.projection_head_momentum)
        crit = L.NegativeCosineSimilarity()

        def step(views: list[Any], epoch: int) -> Any:
            utils.update_momentum(m.backbone, m.backbone_momentum, m=0.99)
            utils.update_momentum(m.projection_head, m.projection_head_momentum, m=0.99)
            x0, x1 = views
            p0, p1 = (m.prediction_head(m.projection_head(emb(x))) for x in (x0, x1))
            z0, z1 = (m.projection_head_momentum(emb(x, m.backbone_momentum)).detach() for x in (x0, x1))
            return 0.5 * (crit(p0, z1) + crit(p1, z0))

        params = [*m.backbone.parameters(), *m.projection_head.parameters(), *m.prediction_head.parameters()]
        return m, byol_t, step, *sgd(params), False
    if method == "simsiam":
        m.prediction_head = heads.SimSiamPredictionHead(2048, 512, 2048)
        m.projection_head = heads.ProjectionHead([(F, 2048, nn.BatchNorm1d(2048), nn.ReLU(inplace=True)), (2048, 2048, nn.BatchNorm1d(2048), None)])
        crit = L.NegativeCosineSimilarity()

        def step(views: list[Any], epoch: int) -> Any:
            z0, z1 = (m.projection_head(emb(x)) for x in views)
            p0, p1 = m.prediction_head(z0), m.prediction_head(z1)
            return 0.5 * (crit(z0.detach(), p1) + crit(z1.detach(), p0))

        return m, SimSiamTransform(input_size=S, gaussian_blur=0.0), step, *sgd(m.parameters(), lr=6e-2), False
    if method == "swav":
        m.projection_head = heads.SwaVProjectionHead(F, 512, 128)
        m.prototypes = heads.SwaVPrototypes(128, 512)
        crit = L.SwaVLoss()
        # crop_max_scales=[1.0]: lightly 1.6.0 (and the benchmark's own commit) wants one per crop size and
        # raises on the benchmark's call without it; 1.0 is SwaVTransform's default for the global crops
        t = SwaVTransform(crop_sizes=[S], crop_counts=[2], crop_min_scales=[0.14], crop_max_scales=[1.0], cj_strength=0.5, gaussian_blur=0)

        def step(views: list[Any], epoch: int) -> Any:
            m.prototypes.normalize()
            out = [m.prototypes(nn.functional.normalize(m.projection_head(emb(x)), dim=1, p=2)) for x in views]
            return crit(out[:2], out[2:])

        opt = torch.optim.Adam(m.parameters(), lr=1e-3 * lr_factor, weight_decay=1e-6)
        return m, t, step, opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, E), False
    if method == "barlow_twins":
        m.projection_head = heads.ProjectionHead([(F, 2048, nn.BatchNorm1d(2048), nn.ReLU(inplace=True)), (2048, 2048, None, None)])
        crit = L.BarlowTwinsLoss()

        def step(views: list[Any], epoch: int) -> Any:
            return crit(m.projection_head(emb(views[0])), m.projection_head(emb(views[1])))

        return m, byol_t, step, *sgd(m.parameters()), False
    if method == "vicreg":
        m.projection_head = heads.VICRegProjectionHead(input_dim=F, hidden_dim=2048, output_dim=2048, num_layers=2)
        crit = L.VICRegLoss()

        def step(views: list[Any], epoch: int) -> Any:
            return crit(m.projection_head(emb(views[0])), m.projection_head(emb(views[1])))

        return m, VICRegTransform(input_size=S), step, *sgd(m.parameters()), False
    if method == "nnclr":
        m.prediction_head = heads.NNCLRPredictionHead(256, 4096, 256)
        m.projection_head = heads.ProjectionHead([(F, 2048, nn.BatchNorm1d(2048), nn.ReLU(inplace=True)), (2048, 256, nn.BatchNorm1d(256), None)])
        m.memory_bank = NNMemoryBankModule(size=(4096, 256))
        crit = L.NTXentLoss()

        def step(views: list[Any], epoch: int) -> Any:
            z0, z1 = (m.projection_head(emb(x)) for x in views)
            p0, p1 = m.prediction_head(z0), m.prediction_head(z1)
            z0 = m.memory_bank(z0.detach(), update=False)
            z1 = m.memory_bank(z1.detach(), update=True)
            return 0.5 * (crit(z0, p1) + crit(z1, p0))

        return m, simclr_t, step, *sgd(m.parameters()), False
    if method == "dino":

        def dino_head() -> Any:
            head = heads.DINOProjectionHead(F, 2048, 256, 2048, batch_norm=True)
            head.layers = heads.ProjectionHead([(F, 2048, nn.BatchNorm1d(2048), nn.GELU()), (2048, 256, None, None)]).layers
            return head

        m.head = dino_head()
        m.teacher_backbone = copy.deepcopy(m.backbone)
        m.teacher_head = dino_head()  # a fresh head, as lightly's benchmark builds it (not a copy)
        utils.deactivate_requires_grad(m.teacher_backbone)
        utils.deactivate_requires_grad(m.teacher_head)
        crit = L.DINOLoss(output_dim=2048)
        t = DINOTransform(global_crop_size=S, n_local_views=0, cj_strength=0.5, gaussian_blur=(0, 0, 0))

        m.teacher_entropy_frac = []  # per step: the health figure sslbench logs (sslbench/core/health.py), of the peer's teacher

        def step(views: list[Any], epoch: int) -> Any:
            utils.update_momentum(m.backbone, m.teacher_backbone, m=0.99)
            utils.update_momentum(m.head, m.teacher_head, m=0.99)
            teacher = [m.teacher_head(emb(x, m.teacher_backbone)) for x in views[:2]]
            student = [m.head(emb(x)) for x in views]
            with torch.no_grad():  # the targets DINOLoss forms: softmax((t - centre) / 0.04), centre before this step's update
                p = torch.softmax((torch.stack(teacher) - crit.center) / crit.teacher_temp, dim=-1)
                m.teacher_entropy_frac.append(float(-(p * p.clamp_min(1e-30).log()).sum(-1).mean() / math.log(p.shape[-1])))
            return crit(teacher, student, epoch=epoch)

        return m, t, step, *sgd([*m.backbone.parameters(), *m.head.parameters()]), False
    if method == "mae":
        from lightly.models.modules import MaskedVisionTransformerDecoderTIMM, MaskedVisionTransformerTIMM
        from lightly.models.modules.masked_vision_transformer_timm import init_weights
        from lightly.utils.scheduler import CosineWarmupScheduler

        dec_dim, dec_depth, dec_heads = (int(v) for v in budget.mae_decoder.split(","))
        vit = backbone
        patch = int(vit.patch_embed.patch_size[0])
        seq_len = int(vit.patch_embed.num_patches + vit.num_prefix_tokens)
        m.masked = MaskedVisionTransformerTIMM(vit=vit)
        m.decoder_embed = nn.Linear(int(vit.embed_dim), dec_dim)
        m.decoder = MaskedVisionTransformerDecoderTIMM(
            num_patches=int(vit.patch_embed.num_patches),
            embed_dim=dec_dim,
            depth=dec_depth,
            num_heads=dec_heads,
            num_prefix_tokens=int(vit.num_prefix_tokens),
            mlp_ratio=4.0,
            proj_drop_rate=0.0,
            attn_drop_rate=0.0,
        )
        m.prediction_head = nn.Linear(dec_dim, patch**2 * 3)
        m.decoder_embed.apply(init_weights)
        m.prediction_head.apply(init_weights)
        crit = nn.MSELoss()

        def step(views: list[Any], epoch: int) -> Any:
            images = views[0]
            idx_keep, idx_mask = utils.random_token_mask(size=(images.shape[0], seq_len), mask_ratio=0.75, device=images.device)
            feats = m.masked.encode(images=images, idx_keep=idx_keep)
            x = m.decoder_embed(feats)
            full = x.new_zeros(images.shape[0], seq_len, x.shape[-1])
            full = utils.set_at_index(full, idx_keep, x)
            pred = m.prediction_head(utils.get_at_index(m.decoder(full, idx_mask=idx_mask), idx_mask))
            target = utils.get_at_index(utils.patchify(images, patch), idx_mask - 1)
            return crit(pred, target)

        params, no_wd = utils.get_weight_decay_parameters([m.masked, m.decoder_embed, m.decoder, m.prediction_head])
        opt = torch.optim.AdamW(
            [{"params": params}, {"params": no_wd, "weight_decay": 0.0}], lr=1.5e-4 * B / 256, weight_decay=0.05, betas=(0.9, 0.95)
        )
        total = steps_per_epoch * E
        # lightly: warm-up 40 epochs of its 100-epoch default run, i.e. 40% of the steps
        sched = CosineWarmupScheduler(optimizer=opt, warmup_epochs=int(total * 0.4), max_epochs=total)
        return m, MAETransform(input_size=S), step, opt, sched, True
    raise SystemExit(f"no lightly recipe for {method!r}")


def _peer_setup(method: str, budget: Budget) -> tuple[Any, Any, Callable[..., Any], Any, Any, bool, int]:
    """(model, loader, training_step, optimizer, scheduler, per_step, train images) of the peer side."""
    import torch

    from sslbench.data import balanced_subset, load_split

    files, labels = split_files(budget.data)
    if load_split(f"imagefolder:{budget.data}", "train", budget.image_size).labels.tolist() != labels:
        raise SystemExit("the file list does not match sslbench's train split order; the two sides would train on different images")
    idx = balanced_subset(torch.tensor(labels), budget.subset, budget.seed).tolist() if budget.subset < len(files) else list(range(len(files)))
    files, labels = [files[i] for i in idx], [labels[i] for i in idx]
    steps_per_epoch = len(files) // budget.batch_size
    if steps_per_epoch < 1:
        raise SystemExit(f"--subset {budget.subset} is smaller than one batch of {budget.batch_size}")
    torch.manual_seed(budget.seed)
    model, transform, step, opt, sched, per_step = build_peer(method, budget, steps_per_epoch)
    loader = torch.utils.data.DataLoader(
        FileDataset(files, labels, transform),
        batch_size=budget.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=budget.num_workers,
        generator=torch.Generator().manual_seed(budget.seed),
    )
    return model, loader, step, opt, sched, per_step, len(files)


def train_peer(method: str, budget: Budget) -> tuple[dict[str, Any], Any]:
    import torch

    model, loader, step, opt, sched, per_step, n_files = _peer_setup(method, budget)
    model.train()
    steps, losses, failure = 0, [], None
    t0 = time.perf_counter()
    for epoch in range(budget.epochs):
        for batch, _ in loader:
            try:
                loss = step(_as_views(batch), epoch)
            except torch.linalg.LinAlgError as err:  # a loss's decomposition of non-finite values (lightly's MMCR: SVD)
                failure = f"step {steps}: {type(err).__name__}: {str(err).splitlines()[0]}"
                break
            if not torch.isfinite(loss):
                failure = f"step {steps}: loss {float(loss)}"
                break
            opt.zero_grad()
            loss.backward()
            opt.step()
            if per_step:
                sched.step()
            steps += 1
            losses.append(float(loss.detach()))
        if failure:
            break
        if not per_step:
            sched.step()  # Lightning's default interval: once per epoch
    wall = time.perf_counter() - t0
    encoder = model.backbone
    side = {
        "images_per_s": round(steps * budget.batch_size / wall, 2),
        "wall_s": round(wall, 2),
        "steps": steps,
        "train_images": n_files,
        "first_loss": round(losses[0], 4) if losses else None,
        "last_loss": round(losses[-1], 4) if losses else None,
        "recipe_source": f"lightly-ai/lightly@{LIGHTLY_COMMIT[:10]} {RECIPES[method][0]}",
        "recipe": RECIPES[method][1],
    }
    if failure:
        side["failure"] = failure  # the run stopped there: no k-NN of its non-finite weights
    series = getattr(model, "teacher_entropy_frac", None)  # DINO's peer records its teacher's entropy per step
    if series:
        side["health"] = {"teacher_entropy_frac_step0": series[0], "teacher_entropy_frac": series[-1], "teacher_entropy_frac_max": max(series)}
    return side, encoder


def _sslbench_args(method: str, budget: Budget, out: Path, variant: list[str] | None = None) -> tuple[dict[str, Any], list[str]]:
    """The ``sslbench train`` flags and ``--set`` items of ``method``'s sslbench side at ``budget``."""
    backbone = budget.vit_backbone if method in VIT_METHODS else budget.backbone
    sets = [f"train_subset={budget.subset}", "checkpoint_every=0", "quick_knn=false"]
    sets += [f"method_cfg.{k}={v}" for k, v in SHARED_SIZES.get(method, {}).items()]
    if method == "mae":
        dim, depth, heads = budget.mae_decoder.split(",")
        sets += [f"method_cfg.decoder_dim={dim}", f"method_cfg.decoder_depth={depth}", f"method_cfg.decoder_heads={heads}"]
    if method not in VIT_METHODS and budget.channels:
        sets.append(f"backbone_kwargs.channels={budget.channels}")
    flags = {
        "method": method,
        "backbone": backbone,
        "data": f"imagefolder:{budget.data}",
        "epochs": budget.epochs,
        "batch_size": budget.batch_size,
        "image_size": budget.image_size,
        "precision": "no",
        "seed": budget.seed,
        "output": str(out),
    }
    return flags, sets + (variant or [])


def train_sslbench(method: str, budget: Budget, work: Path, variant: list[str] | None = None) -> tuple[dict[str, Any], Any]:
    """sslbench's side; ``variant``: extra ``--set`` items (a gap measurement, not the recipe's row)."""
    import shutil

    from sslbench.commands.pipeline import train_and_score
    from sslbench.config import build_config
    from sslbench.config.build import load_encoder

    out = work / ("sslbench-" + "-".join([method, *(variant or [])]).replace("/", "_"))
    shutil.rmtree(out, ignore_errors=True)
    flags, sets = _sslbench_args(method, budget, out, variant)
    cfg = build_config(flags=flags, sets=sets)
    result = train_and_score(cfg, quiet=True)
    summary = json.loads((out / "results.json").read_text())
    side = {
        "images_per_s": result.images_per_s,
        "wall_s": result.wall_time_s,
        "steps": result.steps,
        "train_images": summary.get("train_images"),
        "health": summary.get("health"),
        "recipe_source": f"methods/{method}.py recipe() (docs/recipes.md)",
        "recipe": f"{summary.get('optimizer')} lr {summary.get('lr')} ({summary.get('lr_scaling')} scaling), sslbench's own heads, loss and augmentation",
        "sslbench_command": "sslbench train "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in flags.items() if k != "output")
        + "".join(f" --set {s}" for s in sets),
    }
    return side, load_encoder(out)


# --------------------------------------------------------------------------------------------
# Where the step time goes (--profile)

# ms per training step. data: the peer's wait for its next DataLoader batch (decoding and lightly's
# transforms run in its workers, beside the step), sslbench's batched augmentation (in the step);
# forward includes the loss; optimizer includes zero_grad, the method's after-step updates (EMA
# teachers, queues) and the scheduler; other: the rest of the step's wall time (callbacks, logging).
PHASES = ("data", "forward", "backward", "optimizer", "other")


def profile_peer(method: str, budget: Budget, steps: int, warmup: int) -> dict[str, Any]:
    """The peer's phases over ``steps`` steps after ``warmup`` ones, timed with ``perf_counter``
    around each part of the loop ``train_peer`` runs (the CPU runs torch ops synchronously)."""
    model, loader, step, opt, sched, per_step, _ = _peer_setup(method, budget)
    model.train()
    totals, epoch, it = dict.fromkeys(PHASES, 0.0), 0, iter(loader)
    t_end = t_first = time.perf_counter()
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        try:
            batch, _ = next(it)
        except StopIteration:  # the next epoch: the workers start again, as in train_peer
            epoch += 1
            if not per_step:
                sched.step()
            it = iter(loader)
            batch, _ = next(it)
        t1 = time.perf_counter()
        loss = step(_as_views(batch), epoch)
        t2 = time.perf_counter()
        opt.zero_grad()
        loss.backward()
        t3 = time.perf_counter()
        opt.step()
        if per_step:
            sched.step()
        t4 = time.perf_counter()
        if i == warmup:
            t_first = t_end
        if i >= warmup:
            for name, dt in zip(PHASES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t0 - t_end)):
                totals[name] += dt
        t_end = t4
    wall = t_end - t_first
    return {"step_ms": round(1000 * wall / steps, 1), "phases_ms": {k: round(1000 * v / steps, 1) for k, v in totals.items()}}


def profile_sslbench(method: str, budget: Budget, work: Path, steps: int, warmup: int) -> dict[str, Any]:
    """sslbench's phases over ``steps`` steps after ``warmup`` ones: the trainer's named ranges
    (``sslbench.core.augment``, ``.forward``, ``.backward``, ``.optimizer``) under torch.profiler,
    the step's wall time from a callback's clock at each step's end."""
    import shutil

    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile, schedule

    from sslbench.config import build_config
    from sslbench.train.callbacks import Callback
    from sslbench.train.trainer import train

    out = work / f"profile-{method}"
    shutil.rmtree(out, ignore_errors=True)
    flags, sets = _sslbench_args(method, budget, out)
    cfg = build_config(flags={**flags, "epochs": None, "steps": warmup + steps}, sets=sets)
    ticks: list[float] = []
    with profile(activities=[ProfilerActivity.CPU], schedule=schedule(wait=0, warmup=warmup, active=steps, repeat=1)) as prof:

        class Clock(Callback):
            def on_step_end(self, run: Any, batch: Any, control: Any) -> None:
                ticks.append(time.perf_counter())
                prof.step()

        train(cfg, quiet=True, callbacks=[Clock()])
    ranges = {"data": "sslbench.core.augment", "forward": "sslbench.forward", "backward": "sslbench.backward", "optimizer": "sslbench.optimizer"}
    events = [e for e in prof.key_averages() if e.device_type == DeviceType.CPU]
    phases = {name: sum(e.cpu_time_total for e in events if e.key == key) / 1000 / steps for name, key in ranges.items()}
    step_ms = 1000 * (ticks[warmup + steps - 1] - ticks[warmup - 1]) / steps
    phases["other"] = step_ms - sum(phases.values())
    return {"step_ms": round(step_ms, 1), "phases_ms": {k: round(v, 1) for k, v in phases.items()}}


def render_profiles(profiles: list[dict[str, Any]]) -> list[str]:
    """The README's "where the step time goes" section: per method, both sides' ms per step by
    phase (the last profile row of each method, side and budget wins), and what a 2x row needs."""
    latest: dict[tuple[str, str, str], dict[str, Any]] = {}
    for row in profiles:
        latest[(_bkey(row), row["method"], row["side"])] = row
    lines: list[str] = []
    for bkey in sorted({k[0] for k in latest}):
        b = json.loads(bkey)
        rows = [r for k, r in latest.items() if k[0] == bkey]
        methods = sorted({r["method"] for r in rows}, key=lambda m: METHODS.index(m) if m in METHODS else 99)
        lines += [
            "",
            f"### Where the step time goes: {b['subset']} images, batch {b['batch_size']}, {b['image_size']} px",
            "",
            "`--profile STEPS`: each side trains STEPS steps after WARMUP steps at the budget above; ms per step by phase. "
            "data: the peer's wait for its next DataLoader batch (its workers decode and transform beside the step) or "
            "sslbench's batched augmentation (in the step); forward includes the loss; optimizer includes zero_grad, EMA and "
            "queue updates and the scheduler; other: the rest of the step (sslbench: callbacks, logging). sslbench's phases "
            "are its trainer's named ranges under torch.profiler, the peer's perf_counter around each part of its loop.",
            "",
            "| method | side | ms/step | data | forward | backward | optimizer | other | steps (warm-up) |",
            "| :-- | :-- | --: | --: | --: | --: | --: | --: | :-- |",
        ]
        readings = []
        for method in methods:
            sides = {side: latest.get((bkey, method, side)) for side in ("peer", "sslbench")}
            for side, r in sides.items():
                if r is not None:
                    ph = r["phases_ms"]
                    lines.append(
                        f"| {method} | {side} | {r['step_ms']:,.0f} | "
                        + " | ".join(f"{ph[k]:,.0f}" for k in PHASES)
                        + f" | {r['steps']} ({r['warmup']}) |"
                    )
            peer, ours = sides["peer"], sides["sslbench"]
            if peer and ours:
                compute = sum(ours["phases_ms"][k] for k in ("forward", "backward", "optimizer"))
                peer_compute = sum(peer["phases_ms"][k] for k in ("forward", "backward", "optimizer"))
                target = peer["step_ms"] / 2
                if ours["step_ms"] <= target:
                    verdict = "already at least 2x"
                elif compute > target:
                    verdict = (
                        f"not reachable by the data path: sslbench's forward + backward + optimizer alone take {compute:,.0f} ms, "
                        f"more than half the peer's step ({target:,.0f} ms); only less arithmetic per image would close it"
                    )
                else:
                    verdict = (
                        f"sslbench's forward + backward + optimizer take {compute:,.0f} ms of the {target:,.0f} ms a 2x step allows; "
                        f"the other {ours['step_ms'] - compute:,.0f} ms (augmentation, other) would have to shrink to {target - compute:,.0f} ms"
                    )
                readings.append(
                    f"- {method}: model arithmetic (forward + backward + optimizer) {compute:,.0f} ms vs the peer's {peer_compute:,.0f} ms "
                    f"({compute / peer_compute:.2f}x); a 2x row needs a step of at most {target:,.0f} ms: {verdict}."
                )
        if readings:
            lines += ["", "Reading (computed from the rows):", "", *readings]
        envs = sorted({(r["commit"], r["cpu"], r["threads"]) for r in rows})
        lines += ["", "Profiled at: " + "; ".join(f"`{c}`, {cpu}, {t} torch threads" for c, cpu, t in envs) + "."]
        lines += ["", "```bash", *sorted({r["command"] for r in rows}), "```"]
    return lines


# --------------------------------------------------------------------------------------------
# The README, a pure function of the rows


def _fmt(x: Any, spec: str = ".2f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def render_readme(rows: list[dict[str, Any]], profiles: list[dict[str, Any]] | None = None) -> str:
    """leaderboards/peer-parity/README.md from the JSONL rows (the last row of each method, side and
    budget wins; a method with only one side so far is listed as pending) and the ``--profile``
    rows (:func:`render_profiles`, at the end of their budget's section)."""
    if not rows and not profiles:
        return "# Peer parity: sslbench vs lightly's parts\n\nNo rows yet: run `benchmarks/peer_parity.py`.\n"
    latest: dict[tuple[str, str, str], dict[str, Any]] = {}
    variants: dict[tuple[str, str, str], dict[str, Any]] = {}  # sslbench runs with extra --set items: gap measurements
    for row in rows:
        if row.get("sets"):
            variants[(_bkey(row), row["method"], " ".join(row["sets"]))] = row
        else:
            latest[(_bkey(row), row["method"], row["side"])] = row
    budgets = sorted({k[0] for k in latest})
    lines = ["# Peer parity: sslbench vs lightly's parts, same data, backbone, budget and k-NN", ""]
    lines += [
        "Generated by `benchmarks/peer_parity.py` from `results.jsonl` (`python benchmarks/peer_parity.py --render-only`).",
        "Each method trains twice on the same class-balanced CIFAR-10 subset, backbone, epochs, batch, image size and seed:",
        "**peer** = lightly's parts with lightly's own published recipe for that method (source: file and lines at",
        f"lightly-ai/lightly@{LIGHTLY_COMMIT[:10]}), replayed as a plain PyTorch loop with a torch DataLoader and lightly's",
        "transforms; **sslbench** = `sslbench train` with the method's sslbench recipe. Both frozen encoders are scored with",
        "sslbench's k-NN (k=200, T=0.1, exp weighting, features h; CIFAR-10 test set). images/s = training images per",
        "second of the training loop, data loading included. Δ = sslbench - peer.",
        "",
    ]
    for bkey in budgets:
        b = json.loads(bkey)
        methods = sorted({k[1] for k in latest if k[0] == bkey}, key=lambda m: METHODS.index(m) if m in METHODS else 99)
        bank = f"a balanced {b['knn_bank']}-image subset of train" if b["knn_bank"] else "all train images"
        bank += f"; test: a balanced {b['knn_test']}-image subset" if b.get("knn_test") else "; test: all test images"
        lines += [
            f"## {b['subset']} images x {b['epochs']} epochs, batch {b['batch_size']}, {b['image_size']} px, seed {b['seed']}",
            "",
            f"Data: `imagefolder:{b['data']}`, class-balanced subset of {b['subset']} training images (sslbench's `train_subset`, seed {b['seed']}); "
            f"k-NN memory bank: {bank}. Backbone: `{b['backbone']}`"
            + (f" channels {b['channels']}" if b["channels"] else "")
            + f" (CIFAR stem); ViT methods ({', '.join(m for m in methods if m in VIT_METHODS) or 'none here'}): "
            f"`{b['vit_backbone']}` at {b['image_size']} px; MAE decoder dim,depth,heads = {b['mae_decoder']} on both sides. Peer DataLoader workers: {b['num_workers']}.",
            "",
            "| method | peer k-NN | sslbench k-NN | Δ k-NN | peer img/s | sslbench img/s | speed ratio | peer wall (s) | sslbench wall (s) | verdict |",
            "| :-- | --: | --: | --: | --: | --: | --: | --: | --: | :-- |",
        ]
        pending, trailing, slow, failures = [], [], [], []
        for method in methods:
            peer, ours = latest.get((bkey, method, "peer")), latest.get((bkey, method, "sslbench"))
            if peer is None or ours is None:
                pending.append(f"{method} ({'peer' if peer is None else 'sslbench'} side missing)")
                continue
            failed = [f"{side} failed at {r['failure']}" for side, r in (("peer", peer), ("sslbench", ours)) if r.get("failure")]
            if failed:
                failures.append(f"{method} ({'; '.join(failed)})")
                lines.append(
                    f"| {method} | {_fmt(peer['knn_top1'])} | {_fmt(ours['knn_top1'])} | n/a | {_fmt(peer['images_per_s'], '.0f')} | "
                    f"{_fmt(ours['images_per_s'], '.0f')} | n/a | {_fmt(peer['wall_s'], '.0f')} | {_fmt(ours['wall_s'], '.0f')} | {'; '.join(failed)} |"
                )
                continue
            d = ours["knn_top1"] - peer["knn_top1"]
            ratio = ours["images_per_s"] / peer["images_per_s"]
            verdict = []
            if d < -1.0:
                trailing.append(method)
                verdict.append("k-NN trails")
            if ratio < 2.0:
                slow.append(method)
                verdict.append("< 2x speed")
            lines.append(
                f"| {method} | {_fmt(peer['knn_top1'])} | {_fmt(ours['knn_top1'])} | {d:+.2f} | {_fmt(peer['images_per_s'], '.0f')} | "
                f"{_fmt(ours['images_per_s'], '.0f')} | {ratio:.2f}x | {_fmt(peer['wall_s'], '.0f')} | {_fmt(ours['wall_s'], '.0f')} | {'; '.join(verdict) or 'ok'} |"
            )
        loads = [x for r in latest.values() if _bkey(r) == bkey for x in r.get("loadavg_1min", [])]
        if loads:
            lines += [
                "",
                f"1-minute load average at the start and end of the runs: {min(loads):.1f}-{max(loads):.1f} "
                "(other jobs on the machine slow both sides; compare images/s within a row).",
            ]
        lines += ["", "Reading (computed from the rows): "]
        done_n = len(methods) - len(pending) - len(failures)
        lines[-1] += (
            f"methods with both sides: {done_n}; sslbench rows within 1 k-NN point of the peer or above: {done_n - len(trailing)}"
            + (f"; trailing by more than 1 point: {', '.join(trailing)}" if trailing else "")
            + f"; sslbench rows at least 2x the peer's images/s: {done_n - len(slow)}"
            + (f"; below 2x: {', '.join(slow)}" if slow else "")
            + "."
            + (f" Pending: {', '.join(pending)}." if pending else "")
            + (f" Failed (no comparison): {', '.join(failures)}." if failures else "")
        )
        entropy = []
        for method in methods:
            figs = []
            for side in ("peer", "sslbench"):
                h = (latest.get((bkey, method, side)) or {}).get("health") or {}
                if h.get("teacher_entropy_frac") is not None:
                    peak = f", at most {h['teacher_entropy_frac_max']:.3f}" if h.get("teacher_entropy_frac_max") is not None else ""
                    figs.append(f"{side} {h['teacher_entropy_frac_step0']:.3f} at step 0 -> {h['teacher_entropy_frac']:.3f} at the end{peak}")
            if figs:
                entropy.append(f"{method}: " + "; ".join(figs))
        if entropy:
            lines += [
                "",
                "Teacher entropy / log K (sslbench/core/health.py's collapse figure; the peer's from the targets its DINOLoss forms, "
                "its centre starting at zero where sslbench's starts at the first batch's mean): " + "; ".join(entropy) + ".",
            ]
        measured = sorted((k for k in variants if k[0] == bkey), key=lambda k: (METHODS.index(k[1]) if k[1] in METHODS else 99, k[2]))
        if measured:
            lines += [
                "",
                "Gap measurements: the sslbench side again with settings changed (`--set`; the table above keeps the recipe):",
                "",
                "| method | sslbench settings | k-NN | Δ k-NN vs peer | Δ vs sslbench recipe | img/s | commit |",
                "| :-- | :-- | --: | --: | --: | --: | :-- |",
            ]
            for key in measured:
                v = variants[key]
                peer, ours = latest.get((bkey, key[1], "peer")), latest.get((bkey, key[1], "sslbench"))
                dp = f"{v['knn_top1'] - peer['knn_top1']:+.2f}" if peer else "n/a"
                do = f"{v['knn_top1'] - ours['knn_top1']:+.2f}" if ours else "n/a"
                lines.append(f"| {key[1]} | `{key[2]}` | {_fmt(v['knn_top1'])} | {dp} | {do} | {_fmt(v['images_per_s'], '.0f')} | `{v['commit']}` |")
        lines += ["", "Recipes:", ""]
        for method in methods:
            peer = latest.get((bkey, method, "peer"))
            ours = latest.get((bkey, method, "sslbench"))
            if peer:
                lines.append(f"- **{method}**, peer: `{peer['recipe_source']}`: {peer['recipe']}.")
            if ours:
                lines.append(f"  sslbench: {ours['recipe']}; `{ours.get('sslbench_command', '')}`.")
        envs = {
            (r["commit"], r["dirty"], r["cpu"], r["threads"], json.dumps(r["versions"], sort_keys=True))
            for r in [*latest.values(), *variants.values()]
            if _bkey(r) == bkey
        }
        lines += ["", "Runs (commit, CPU, threads, versions):", ""]
        for commit, dirty, cpu, threads, versions in sorted(envs):
            v = json.loads(versions)
            vs = ", ".join(f"{k} {v[k]}" for k in sorted(v) if v[k])
            lines.append(f"- `{commit}`{' (dirty tree)' if dirty else ''}; {cpu}; {threads} torch threads; {vs}")
        commands = sorted({r["command"] for r in [*latest.values(), *variants.values()] if _bkey(r) == bkey})
        lines += ["", "Commands:", "", "```bash", *commands, "```"]
        lines += [*render_profiles([r for r in profiles or [] if _bkey(r) == bkey]), ""]
    lines += render_profiles([r for r in profiles or [] if _bkey(r) not in budgets])
    if NOT_SHIPPED:
        lines += ["Not covered: " + "; ".join(f"{m}: {why}" for m, why in NOT_SHIPPED.items()) + ".", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {', '.join(METHODS)}")
    ap.add_argument("--data", default="/tmp/cifar10", help="image folder with train/ and test/ (one folder per class)")
    ap.add_argument("--subset", type=int, default=5000)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--channels", default="16,32,64,128", help="ResNet widths ('' for timm's own)")
    ap.add_argument("--vit-backbone", default="vit_tiny_patch16_224", help=f"backbone of the ViT methods ({', '.join(sorted(VIT_METHODS))})")
    ap.add_argument("--mae-decoder", default="128,2,4", help="MAE decoder dim,depth,heads on both sides (lightly's ImageNet: 512,8,16)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num-workers", type=int, default=2, help="the peer's DataLoader workers")
    ap.add_argument("--knn-bank", type=int, default=0, help="k-NN memory bank: a balanced subset of train (0: all of it; smoke tests only)")
    ap.add_argument("--knn-test", type=int, default=0, help="k-NN test images: a balanced subset of test (0: all of it; smoke tests only)")
    ap.add_argument("--sides", default="peer,sslbench")
    ap.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a gap measurement: train the sslbench side with this extra --set (repeatable); its row is listed apart from the recipe's",
    )
    ap.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="STEPS",
        help="instead of training rows: where each side's step time goes, over STEPS steps after --profile-warmup (rows in profile.jsonl next to --rows)",
    )
    ap.add_argument(
        "--profile-warmup",
        type=int,
        default=3,
        metavar="STEPS",
        help="steps before the profiled ones (DataLoader workers starting, first-call costs)",
    )
    ap.add_argument("--rows", type=Path, default=ROWS)
    ap.add_argument("--readme", type=Path, default=None, help="default: README.md next to --rows")
    ap.add_argument("--work", type=Path, default=Path("runs/peer-parity"), help="sslbench run directories")
    ap.add_argument("--render-only", action="store_true")
    args = ap.parse_args()
    readme = args.readme or args.rows.parent / "README.md"
    profile_rows = args.rows.parent / "profile.jsonl"
    if not args.render_only:
        budget = Budget(
            data=str(Path(args.data).expanduser().resolve()),
            subset=args.subset,
            epochs=args.epochs,
            batch_size=args.batch_size,
            image_size=args.image_size,
            backbone=args.backbone,
            channels=args.channels,
            vit_backbone=args.vit_backbone,
            seed=args.seed,
            num_workers=args.num_workers,
            knn_bank=args.knn_bank,
            knn_test=args.knn_test,
            mae_decoder=args.mae_decoder,
        )
        command = "python benchmarks/peer_parity.py " + " ".join(a for a in sys.argv[1:] if a != "--render-only")
        env = environment()
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        for method in methods:
            if method not in RECIPES:
                raise SystemExit(f"{method!r}: {NOT_SHIPPED.get(method, 'not a method lightly ships')}; choose from {', '.join(METHODS)}")
        if args.profile and (args.sets or args.profile_warmup < 1):
            raise SystemExit("--profile measures the recipes: drop --set, and keep --profile-warmup at 1 or more")
        for method in methods if args.profile else []:
            for side_name in [s.strip() for s in args.sides.split(",")]:
                load_before = round(os.getloadavg()[0], 2)
                print(f"{method:13s} {side_name:8s} profiling {args.profile} steps ...", flush=True)
                if side_name == "peer":
                    prof = profile_peer(method, budget, args.profile, args.profile_warmup)
                else:
                    prof = profile_sslbench(method, budget, args.work, args.profile, args.profile_warmup)
                prow = new_row(method, side_name, budget, command, env, load_before, steps=args.profile, warmup=args.profile_warmup, **prof)
                append_row(profile_rows, prow)
                print(f"{method:13s} {side_name:8s} {prof['step_ms']:,.0f} ms/step: {prof['phases_ms']}", flush=True)
        for method in [] if args.profile else methods:
            for side_name in [s.strip() for s in args.sides.split(",")]:
                variant = args.sets if side_name == "sslbench" else []
                if done(read_rows(args.rows), method, side_name, budget, variant):
                    print(f"{method:13s} {side_name:8s} already in {args.rows}; skipped")
                    continue
                t0 = time.perf_counter()
                load_before = round(os.getloadavg()[0], 2)
                print(f"{method:13s} {side_name:8s} training ...", flush=True)
                side, encoder = train_peer(method, budget) if side_name == "peer" else train_sslbench(method, budget, args.work, variant)
                print(f"{method:13s} {side_name:8s} trained in {side['wall_s']:.1f} s ({side['images_per_s']:.1f} img/s); k-NN ...", flush=True)
                side.update(knn_score(encoder, budget) if not side.get("failure") else {"knn_top1": None})
                row = new_row(method, side_name, budget, command, env, load_before, **side, **({"sets": list(variant)} if variant else {}))
                append_row(args.rows, row)
                print(
                    f"{method:13s} {side_name:8s} k-NN {_fmt(side['knn_top1']):>6s}  {side['images_per_s']:7.1f} img/s  train {side['wall_s']:7.1f} s  "
                    + (f"FAILED at {side['failure']}  " if side.get("failure") else "")
                    + f"(with scoring {time.perf_counter() - t0:.0f} s)",
                    flush=True,
                )
    readme.parent.mkdir(parents=True, exist_ok=True)
    readme.write_text(render_readme(read_rows(args.rows), read_rows(profile_rows)))
    print(f"wrote {readme}")


if __name__ == "__main__":
    main()
