"""VICRegL (methods/vicregl.py) against a float64 transcription of the official formulas
(facebookresearch/VICRegL at 803ae4c: ``_location_to_NxN_grid``, ``neirest_neighbores``,
``_vicreg_loss``, ``_local_loss``, ``local_loss``, ``global_loss``), written with loops; then a
resumed run equals an unbroken one and a few steps on the default data stay finite."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from methods.vicregl import VICRegL, VICRegLConfig, grid_locations, nearest_matches, vicregl_loss
from sslbench.api import UserError
from sslbench.testing import check_resume_equals_unbroken, check_trains

N_SIDE = 4  # a 4x4 feature map: 16 positions


def ref_grid(box: list[float], n: int) -> list[list[float]]:
    """Official ``_location_to_NxN_grid`` on a box in fractions: cell centres, row-major; a flip
    swaps columns l and n - 1 - l."""
    i, j, h, w, flip = box
    grid = [[[i + (k + 0.5) * h / n, j + (m + 0.5) * w / n] for m in range(n)] for k in range(n)]
    if flip > 0.5:
        grid = [row[::-1] for row in grid]
    return [cell for row in grid for cell in row]


def ref_matches(inp: list[list[float]], cand: list[list[float]], k: int | None) -> tuple[list[int], list[int]]:
    """For each input its nearest candidate (first on ties), then the k inputs nearest to theirs
    (lower index on ties), in input order."""
    near, dist = [], []
    for a in inp:
        d = [math.dist(a, b) for b in cand]
        near.append(min(range(len(cand)), key=lambda m: (d[m], m)))
        dist.append(d[near[-1]])
    k = len(inp) if k is None else k
    keep = sorted(sorted(range(len(inp)), key=lambda n: (dist[n], n))[:k])
    return keep, [near[n] for n in keep]


def ref_vicreg_local(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Official ``_vicreg_loss`` on (B, k, D), one process: 25 mse + 25 var + 1 cov."""
    b, k, d = x.shape
    inv = ((x - y) ** 2).mean()
    var = cov = x.new_zeros(())
    for z in (x, y):
        z = z - z.mean(dim=0)
        var = var + torch.relu(1 - torch.sqrt(z.var(dim=0) + 1e-4)).mean() / 2
        per_pos = []
        for p in range(k):
            c = z[:, p].T @ z[:, p] / (b - 1)
            per_pos.append(sum(c[i, j] ** 2 for i in range(d) for j in range(d) if i != j) / d)
        cov = cov + torch.stack(per_pos).mean() / 2
    return 25 * inv + 25 * var + cov


def ref_loss(z, maps, boxes, num_matches, alpha):  # type: ignore[no-untyped-def]
    """The official VICRegL loss with two crops, float64."""
    inv = ((z[0] - z[1]) ** 2).mean()
    var = cov = z[0].new_zeros(())
    for e in z:
        e = e - e.mean(dim=0)
        var = var + torch.relu(1 - torch.sqrt(e.var(dim=0) + 1e-4)).mean() / 2
        c = e.T @ e / (e.shape[0] - 1)
        cov = cov + (c.pow(2).sum() - c.diagonal().pow(2).sum()) / e.shape[1] / 2
    global_loss = 25 * inv + 25 * var + cov
    grids = [[ref_grid(bx.tolist(), N_SIDE) for bx in view] for view in boxes]
    local = z[0].new_zeros(())
    for a, b in ((0, 1), (1, 0)):  # official local_loss: i in range(2), j != i
        for use_location in (False, True):  # _local_loss: feature matching (all), then location (num_matches)
            for src, dst, k in ((a, b, num_matches[0]), (b, a, num_matches[1])):
                xs, ys = [], []
                for s in range(maps[0].shape[0]):
                    if use_location:
                        keep, near = ref_matches(grids[src][s], grids[dst][s], k)
                    else:
                        keep, near = ref_matches(maps[src][s].tolist(), maps[dst][s].tolist(), None)
                    xs.append(maps[src][s, keep])
                    ys.append(maps[dst][s, near])
                local = local + ref_vicreg_local(torch.stack(xs), torch.stack(ys)) / 2
    return alpha * global_loss + (1 - alpha) * local / 2


def _boxes(g: torch.Generator, b: int) -> torch.Tensor:
    hw = 0.3 + 0.7 * torch.rand(b, 2, generator=g, dtype=torch.float64)
    tl = torch.rand(b, 2, generator=g, dtype=torch.float64) * (1 - hw)
    return torch.cat([tl, hw, (torch.rand(b, 1, generator=g) < 0.5).double()], dim=1)


def test_loss_and_gradient_equal_the_official_formulas_in_float64() -> None:
    g = torch.Generator().manual_seed(0)
    b, d, dm, cfg = 6, 5, 3, VICRegLConfig(match_fraction=(7 / 16, 3 / 16), alpha=0.75)
    z = [torch.randn(b, d, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    maps = [torch.randn(b, N_SIDE**2, dm, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    boxes = [_boxes(g, b), _boxes(g, b)]
    locations = [grid_locations(bx, N_SIDE, N_SIDE) for bx in boxes]
    got, logs = vicregl_loss((z[0], z[1]), (maps[0], maps[1]), (locations[0], locations[1]), cfg)
    assert cfg.num_matches(16) == (7, 3) and VICRegLConfig().num_matches(49) == (20, 4)  # the official counts of a 7x7 map
    want = ref_loss(z, maps, boxes, (7, 3), cfg.alpha)
    leaves = [*z, *maps]
    g_got = torch.autograd.grad(got, leaves)
    g_want = torch.autograd.grad(want, leaves)
    assert torch.allclose(got.double(), want, rtol=1e-5), (got, want)
    for a, w in zip(g_got, g_want):
        assert torch.allclose(a.double(), w, rtol=1e-4, atol=1e-6)
    assert float(logs["local_invariance"]) > 0 and float(logs["local_covariance"]) > 0


def test_location_matching_equals_brute_force_on_a_known_geometry() -> None:
    # view 1: the top-left quarter; view 2: the centre half, flipped; view 3: view 1 flipped.
    boxes = torch.tensor([[0.0, 0.0, 0.5, 0.5, 0.0], [0.25, 0.25, 0.5, 0.5, 1.0], [0.0, 0.0, 0.5, 0.5, 1.0]], dtype=torch.float64)
    loc = grid_locations(boxes, N_SIDE, N_SIDE)
    assert torch.allclose(loc, torch.tensor([ref_grid(bx.tolist(), N_SIDE) for bx in boxes], dtype=torch.float64))
    for a, b in ((0, 1), (1, 0), (0, 2)):
        for k in (None, 1, 5, 16):
            keep, near = nearest_matches(torch.cdist(loc[a : a + 1], loc[b : b + 1]), k)
            want_keep, want_near = ref_matches(loc[a].tolist(), loc[b].tolist(), k)
            assert keep[0].tolist() == want_keep and near[0].tolist() == want_near, (a, b, k)
    # The same crop, flipped: position (r, c) sits where the flipped view's (r, 3 - c) does.
    _, near = nearest_matches(torch.cdist(loc[0:1], loc[2:3]), None)
    assert near[0].tolist() == [4 * r + 3 - c for r in range(4) for c in range(4)]


def test_resumed_equals_unbroken(tmp_path: Path) -> None:
    check_resume_equals_unbroken("vicregl", workdir=tmp_path)
    metrics = [json.loads(line) for line in (tmp_path / "unbroken").rglob("metrics*.jsonl").__next__().read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)  # 6 steps on the default data (digits), finite


def test_trains_on_the_tiny_backbones() -> None:
    check_trains(VICRegL)


def test_config_rejects_bad_values() -> None:
    for change in ({"alpha": 1.5}, {"match_fraction": (0.0, 0.1)}, {"var_weight": -1.0}, {"maps_dim": 0}):
        with pytest.raises(UserError, match="method_cfg"):
            VICRegLConfig(**change).validate()  # type: ignore[arg-type]
