"""I-JEPA and SimMIM (issue 28, the ViT generation): losses against float64 implementations of the
official formulas, masks (shapes, counts, a pure function of (seed, epoch, sample)), the frozen
target encoder, the refusal of non-ViT backbones and a short CLI run each. Two processes = one,
resume and the contract are the registry-wide tests (tests/test_multiprocess.py, test_resume.py,
test_methods_contract.py, test_testing_kit.py with ``-k 'ijepa or simmim'``)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from _backbones import VIT, VIT_KWARGS
from _steps import batch as make_batch
from safetensors.torch import load_file

from sslbench.backbones import create_backbone
from sslbench.commands.cli import main
from sslbench.core.errors import UserError
from sslbench.core.method import EMBEDDING_LOG, Batch, StepInfo
from sslbench.methods.ijepa import IJEPA, IJEPAConfig, ijepa_loss, multiblock_masks
from sslbench.methods.mae import patchify
from sslbench.methods.simmim import SimMIM, SimMIMConfig, mask_unit, simmim_loss, simmim_mask

SIZE = 32  # 4 px patches: an 8 x 8 grid


def _vit(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_backbone(VIT, SIZE, **VIT_KWARGS)


def _batch(index: list[int], epoch: int = 0, seed: int = 0) -> Batch:
    info = StepInfo(step=epoch * 10, epoch=epoch, steps_per_epoch=10, total_steps=100, progress=epoch / 10, seed=seed)
    return Batch([torch.zeros(len(index), 3, SIZE, SIZE)], torch.tensor(index), info)


# ---- losses: float64 implementations of the official formulas, value and gradient


def _smooth_l1_64(d: float) -> float:
    return 0.5 * d * d if abs(d) < 1 else abs(d) - 0.5  # torch's smooth_l1_loss with beta 1


def test_ijepa_loss_is_the_official_smooth_l1_averaged_over_blocks() -> None:
    g = torch.Generator().manual_seed(1)
    b, k, lt, d = 3, 4, 5, 6
    pred = (2 * torch.randn(b, k, lt, d, generator=g)).requires_grad_()
    target = torch.randn(b, k, lt, d, generator=g)
    counts = torch.randint(1, lt + 1, (b, k), generator=g)
    valid = torch.arange(lt) < counts[..., None]
    loss = ijepa_loss(pred, target, valid)
    loss.backward()
    p64, t64 = pred.detach().double(), target.double()
    ref, grad = 0.0, torch.zeros(b, k, lt, d, dtype=torch.float64)
    for i in range(b):
        for j in range(k):
            n = int(counts[i, j])
            block = sum(_smooth_l1_64(float(p64[i, j, t, c] - t64[i, j, t, c])) for t in range(n) for c in range(d)) / (n * d)
            ref += block / (b * k)
            for t in range(n):
                for c in range(d):
                    diff = float(p64[i, j, t, c] - t64[i, j, t, c])
                    grad[i, j, t, c] = (diff if abs(diff) < 1 else math.copysign(1.0, diff)) / (n * d * b * k)
    assert loss.item() == pytest.approx(ref, rel=1e-6)
    assert pred.grad is not None
    torch.testing.assert_close(pred.grad.double(), grad, rtol=1e-5, atol=1e-9)


def test_simmim_loss_is_the_official_masked_l1() -> None:
    g = torch.Generator().manual_seed(2)
    b, p, grid = 2, 4, (3, 3)
    images = torch.randn(b, 3, grid[0] * p, grid[1] * p, generator=g, dtype=torch.float64)
    x_rec = torch.randn(b, 3, grid[0] * p, grid[1] * p, generator=g, dtype=torch.float64, requires_grad=True)
    mask = (torch.rand(b, grid[0] * grid[1], generator=g) < 0.6).double()
    # The official SimMIM.forward, in float64 on the image layout.
    pix = mask.view(b, *grid).repeat_interleave(p, 1).repeat_interleave(p, 2).unsqueeze(1)
    ref = ((images - x_rec).abs() * pix).sum() / (pix.sum() + 1e-5) / 3
    ref.backward()
    pred = patchify(x_rec.detach().float(), p).requires_grad_()
    loss = simmim_loss(pred, patchify(images.float(), p), mask.float())
    loss.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    assert pred.grad is not None and x_rec.grad is not None
    torch.testing.assert_close(pred.grad.double(), patchify(x_rec.grad, p), rtol=1e-5, atol=1e-9)


# ---- I-JEPA: masks, the target encoder


def _official_size(u: float, n: tuple[int, int], scale: tuple[float, float], aspect: tuple[float, float]) -> tuple[int, int]:
    """multiblock.MaskCollator._sample_block_size in plain Python."""
    keep = int(n[0] * n[1] * (scale[0] + u * (scale[1] - scale[0])))
    ar = aspect[0] + u * (aspect[1] - aspect[0])
    h, w = int(round(math.sqrt(keep * ar))), int(round(math.sqrt(keep / ar)))
    while h >= n[0]:
        h -= 1
    while w >= n[1]:
        w -= 1
    return h, w


def _box(mask: torch.Tensor, grid: tuple[int, int]) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a boolean (H * W) mask that must be one filled rectangle."""
    m = mask.view(*grid)
    rows, cols = m.any(1).nonzero().flatten(), m.any(0).nonzero().flatten()
    top, left, h, w = int(rows[0]), int(cols[0]), len(rows), len(cols)
    assert int(m.sum()) == h * w and bool(m[top : top + h, left : left + w].all()), "a target block is not a rectangle"
    return top, left, h, w


def test_ijepa_blocks_follow_the_official_sizes_and_ranges() -> None:
    cfg, grid = IJEPAConfig(), (8, 8)
    batch = _batch(list(range(64)))
    context, targets = multiblock_masks(batch, grid, cfg)
    u = batch.uniform(0, 2).double()
    for i in range(64):
        th, tw = _official_size(float(u[i, 0]), grid, cfg.target_scale, cfg.target_aspect)
        ch, _ = _official_size(float(u[i, 1]), grid, cfg.context_scale, (1.0, 1.0))
        for j in range(cfg.num_targets):
            top, left, h, w = _box(targets[i, j], grid)
            assert (h, w) == (th, tw)
            assert top + h < grid[0] and left + w < grid[1]  # the official corner: randint(0, side - h)
            # Within the official ranges, up to the rounding of each side to whole patches.
            assert cfg.target_scale[0] * 64 - h - w <= h * w <= cfg.target_scale[1] * 64 + h + w
            assert (h - 0.5) / (w + 0.5) <= cfg.target_aspect[1] and (h + 0.5) / (w - 0.5) >= cfg.target_aspect[0]
        n = int(context[i].sum())
        assert n > cfg.min_keep
        assert ch == 7  # 0.85-1 of 64 patches -> 7 or 8 per side, below the grid's 8
        rows, cols = context[i].view(grid).any(1).nonzero().flatten(), context[i].view(grid).any(0).nonzero().flatten()
        assert int(rows[-1] - rows[0]) < ch and int(cols[-1] - cols[0]) < ch  # inside one ch x ch block
        if not (context[i] & targets[i].any(0)).any():
            continue
        # Overlap only when the official relaxation dropped targets: then the last ones overlap.
        assert not (context[i] & targets[i, 0]).any() or n > cfg.min_keep


def test_ijepa_masks_are_a_pure_function_of_seed_epoch_and_sample() -> None:
    grid, cfg = (8, 8), IJEPAConfig()
    c1, t1 = multiblock_masks(_batch([5, 9, 2, 40]), grid, cfg)
    c2, t2 = multiblock_masks(_batch([40, 7, 5, 11, 2, 9]), grid, cfg)  # other batch, other positions
    for i, j in [(0, 2), (1, 5), (2, 4), (3, 0)]:
        assert torch.equal(c1[i], c2[j]) and torch.equal(t1[i], t2[j])
    c3, t3 = multiblock_masks(_batch([5, 9, 2, 40], epoch=1), grid, cfg)
    assert not torch.equal(t1, t3)
    c4, t4 = multiblock_masks(_batch([5, 9, 2, 40], seed=1), grid, cfg)
    assert not torch.equal(t1, t4)


def test_ijepa_loss_of_a_sample_does_not_depend_on_its_batch() -> None:
    """Padding to the batch's longest context / target is hidden from attention."""
    m = IJEPA(_vit())
    images = torch.randn(6, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    full = make_batch([images], index=torch.arange(6))
    pred, target, valid, _ = m.forward_masked(full)
    for i in range(6):
        one = make_batch([images[i : i + 1]], index=torch.tensor([i]))
        p1, t1, v1, _ = m.forward_masked(one)
        n = v1.shape[-1]
        assert torch.equal(valid[i, :, :n], v1[0])
        torch.testing.assert_close(pred[i, :, :n][v1[0]], p1[0][v1[0]], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(target[i, :, :n][v1[0]], t1[0][v1[0]], rtol=1e-4, atol=1e-5)


def test_ijepa_target_encoder_gets_no_gradient_and_follows_the_linear_ema() -> None:
    m = IJEPA(_vit())
    images = torch.randn(4, 3, SIZE, SIZE)
    loss, logs = m.training_step(make_batch([images]))
    loss.backward()
    assert logs[EMBEDDING_LOG].shape == (4, VIT_KWARGS["embed_dim"])
    assert all(p.grad is None and not p.requires_grad for p in m.target_encoder.parameters())
    assert all(p.grad is not None for p in m.predictor.parameters())
    assert m.encoder.patch_embed.proj.weight.grad is not None  # type: ignore[union-attr]
    assert m.encoder.blocks[0].attn.qkv.weight.grad is not None  # type: ignore[index, union-attr]
    info = StepInfo(step=25, epoch=0, steps_per_epoch=100, total_steps=100, progress=0.25, seed=0)
    assert m.momentum_at(info) == pytest.approx(0.996 + 0.004 * 0.25)  # the official linear schedule
    with torch.no_grad():
        m.encoder.patch_embed.proj.weight.add_(1.0)  # type: ignore[union-attr]
    before = m.target_encoder.patch_embed.proj.weight.clone()  # type: ignore[union-attr]
    m.after_optimizer_step(info)
    mom = 0.996 + 0.004 * 0.25
    expected = mom * before + (1 - mom) * m.encoder.patch_embed.proj.weight  # type: ignore[union-attr]
    torch.testing.assert_close(m.target_encoder.patch_embed.proj.weight, expected)  # type: ignore[union-attr]


def test_ijepa_predictor_defaults_follow_the_vit_h_ratios() -> None:
    m = IJEPA(create_backbone("vit_tiny_patch16_224", SIZE))  # 192 wide, 12 blocks, 3 heads
    assert len(m.predictor.blocks) == 4  # round(12 * 12 / 32)
    assert m.predictor.embed.out_features == 60  # 192 * 384 / 1280 = 57.6, up to a multiple of 12
    assert all("predictor" not in k and "target" not in k for k in m.encoder.state_dict())


# ---- SimMIM: masks, the mask unit


@pytest.mark.parametrize(("size", "patch", "unit"), [(224, 16, 32), (192, 16, 32), (192, 4, 32), (32, 4, 4), (64, 4, 8), (96, 8, 16)])
def test_simmim_mask_unit_is_the_official_fraction_of_the_image(size: int, patch: int, unit: int) -> None:
    assert mask_unit(size, patch, None) == unit


def test_simmim_mask_unit_given_must_tile() -> None:
    assert mask_unit(32, 4, 8) == 8
    with pytest.raises(UserError, match="mask_patch_size 6 px must be a multiple"):
        mask_unit(32, 4, 6)


def test_simmim_masks_count_units_and_purity() -> None:
    m = SimMIM(_vit(), SimMIMConfig(mask_patch_size=8))  # 2 x 2 patches per unit: 4 x 4 units
    assert (m.scale, m.units) == (2, (4, 4))
    b1, b2 = _batch([3, 8, 1]), _batch([8, 0, 1, 3])
    k1 = simmim_mask(b1.uniform(0, 16), m.units, m.scale, 0.6)
    k2 = simmim_mask(b2.uniform(0, 16), m.units, m.scale, 0.6)
    assert torch.equal(k1.sum(1), torch.full((3,), math.ceil(16 * 0.6) * 4.0))  # the official ceil(units * ratio)
    units = k1.view(3, 4, 2, 4, 2)
    assert torch.equal(units, units[:, :, :1, :, :1].expand_as(units))  # whole 2 x 2 units
    assert torch.equal(k1[0], k2[3]) and torch.equal(k1[1], k2[0]) and torch.equal(k1[2], k2[2])
    assert not torch.equal(k1, simmim_mask(_batch([3, 8, 1], epoch=1).uniform(0, 16), m.units, m.scale, 0.6))


def test_simmim_masked_patches_enter_as_the_mask_token() -> None:
    m = SimMIM(_vit())
    images = torch.randn(2, 3, SIZE, SIZE)
    batch = make_batch([images])
    loss, _ = m.training_step(batch)
    loss.backward()
    assert m.mask_token.grad is not None and m.mask_token.grad.abs().sum() > 0
    # What a masked patch held does not reach the prediction: change only masked pixels.
    pred, mask, _, _ = m._forward(batch)
    changed = patchify(images, m.patch) + 5 * mask.unsqueeze(-1)
    from sslbench.methods.mae import unpatchify

    pred2, _, _, _ = m._forward(make_batch([unpatchify(changed, m.patch, m.grid)]))
    torch.testing.assert_close(pred, pred2)


# ---- both


@pytest.mark.parametrize("name", ["ijepa", "simmim"])
def test_a_resnet_is_refused_in_one_line(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cls = {"ijepa": IJEPA, "simmim": SimMIM}[name]
    with pytest.raises(UserError, match=rf"{name} needs a vision transformer, got resnet18 .*vit_\* or deit_\*"):
        cls(create_backbone("resnet18", SIZE))
    rc = main(["train", "--method", name, "--backbone", "resnet18", "--steps", "1", "--output", str(tmp_path / "r"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and f"{name} needs a vision transformer" in err[0], err


@pytest.mark.parametrize("name", ["ijepa", "simmim"])
def test_cli_trains_and_exports_the_plain_vit(name: str, tmp_path: Path) -> None:
    out = tmp_path / "run"
    argv = ["train", "--method", name, "--backbone", VIT, "--image-size", str(SIZE), "--steps", "4", "--batch-size", "16"]
    argv += [a for k, v in VIT_KWARGS.items() for a in ("--set", f"backbone_kwargs.{k}={v}")]
    argv += ["--precision", "no", "--set", "quick_knn=false", "--output", str(out), "--quiet"]
    assert main(argv) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses and all(math.isfinite(x) for x in losses)
    keys = set(load_file(str(out / "encoder.safetensors")))
    assert keys == set(create_backbone(VIT, SIZE, **VIT_KWARGS).state_dict())  # the plain ViT: no predictor, head or mask token


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ijepa", "simmim"])
def test_a_stopped_and_resumed_run_equals_an_unbroken_one(name: str, tmp_path: Path) -> None:
    """Masks come from (seed, epoch, sample) and the EMA target is a parameter: a run stopped after
    step 3 and resumed ends bit for bit where an unbroken one does (sslbench.testing's check)."""
    from sslbench.testing import check_resume_equals_unbroken

    check_resume_equals_unbroken(name, workdir=tmp_path, env={"SSLBENCH_CACHE": str(tmp_path / "cache")})


def test_padding_entries_are_hidden_from_the_encoder() -> None:
    """encode_patches with a key mask: the real tokens of a padded row equal the row encoded alone."""
    from sslbench.api import encode_patches

    vit = _vit().eval()
    images = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    ids = torch.tensor([[3, 9, 20, 41, 50], [7, 8, 30, 0, 0]])
    valid = torch.tensor([[True] * 5, [True, True, True, False, False]])
    with torch.no_grad():
        padded = encode_patches(vit, images, ids=ids, valid=valid)
        alone = encode_patches(vit, images[1:], ids=ids[1:, :3])
    prefix = int(vit.num_prefix_tokens)
    torch.testing.assert_close(padded[1, : prefix + 3], alone[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("grid", [(2, 2), (4, 4), (8, 8), (14, 14)])
def test_the_static_pad_lengths_bound_every_block(grid: tuple[int, int]) -> None:
    """I-JEPA pads its context and target indices to a length known from the config (no host sync
    per step): every block size drawn, the ends of the uniform's range included, fits in it."""
    from sslbench.methods.ijepa import block_sizes, max_block

    u = torch.cat([torch.rand(20000, dtype=torch.float64), torch.tensor([0.0, 1.0 - 2**-53])])
    for scale, aspect in [((0.15, 0.2), (0.75, 1.5)), ((0.85, 1.0), (1.0, 1.0)), ((0.3, 0.9), (0.5, 2.0))]:
        h, w = block_sizes(u, grid, scale, aspect)
        assert int((h * w).max()) <= max_block(grid, scale, aspect)
