"""Tests for sslbench.core.dist: single-process fallbacks and a real 2-process gloo run.

The 2-process run starts this file as a script (``python tests/test_dist.py --worker ...``) in
two subprocesses that meet over a TCP store on a free local port. Each worker holds its half of
a batch generated from a fixed seed, runs every distributed scenario once and saves what it
computed; the tests then compare with plain single-process torch on the whole batch.
"""

from __future__ import annotations

import copy
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
import torch.nn.functional as F
from _gloo import run_gloo_workers
from timm.layers import BatchNormAct2d
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from sslbench.core import dist as sdist
from sslbench.core.dist import (
    SyncBatchNorm,
    SyncBatchNormAct2d,
    all_reduce_mean,
    convert_sync_batchnorm,
    gather_no_grad,
    gather_with_grad,
)

WORLD = 2
N_PAIRS = 8  # images in the global NT-Xent batch (4 per rank)
BN_SIZES = (5, 3)  # unequal local batch sizes for the BatchNorm1d scenario
WORKER_TIMEOUT_S = 300  # generous: the machine may be shared
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


# --------------------------------------------------------------------------------------------
# Shared problem definitions: used by the workers and by the single-process references.


def nt_xent(z0: Tensor, z1: Tensor, temperature: float = 0.5) -> Tensor:
    """NT-Xent over local anchors against all gathered candidates.

    ``z0``, ``z1``: (n, D) local views; returns the mean over the 2n local anchors. In one process
    it is the usual SimCLR loss on the whole batch.
    """
    n = z0.shape[0]
    local = F.normalize(torch.cat([z0, z1]), dim=1)  # (2n, D)
    z0_all, z1_all = gather_with_grad(local[:n]), gather_with_grad(local[n:])  # (N, D) each
    big_n = z0_all.shape[0]
    logits = local @ torch.cat([z0_all, z1_all]).T / temperature  # (2n, 2N)
    offset = sdist.get_rank() * n
    idx = torch.arange(n, device=logits.device)
    own = torch.cat([idx, idx + big_n]) + offset
    twin = torch.cat([idx + big_n, idx]) + offset
    logits = logits.clone()
    logits[torch.arange(2 * n, device=logits.device), own] = float("-inf")
    return F.cross_entropy(logits, twin)


def ntxent_problem() -> tuple[nn.Module, Tensor, Tensor]:
    """An encoder and the global two-view batch: (N_PAIRS, 6) each."""
    g = torch.Generator().manual_seed(0)
    enc = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4))
    with torch.no_grad():
        for p in enc.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    x0 = torch.randn(N_PAIRS, 6, generator=g)
    x1 = x0 + 0.3 * torch.randn(N_PAIRS, 6, generator=g)
    return enc, x0, x1


def bn2d_problem() -> tuple[nn.BatchNorm2d, Tensor, Tensor]:
    """A BatchNorm2d with non-trivial affine parameters, a (8, 3, 4, 4) batch far from zero mean
    (exercises the variance numerics) and per-element targets for a linear loss."""
    g = torch.Generator().manual_seed(1)
    bn = nn.BatchNorm2d(3, momentum=0.3)
    with torch.no_grad():
        bn.weight.copy_(1 + torch.rand(3, generator=g))
        bn.bias.copy_(torch.randn(3, generator=g))
    x = 100.0 + 3.0 * torch.randn(8, 3, 4, 4, generator=g)
    t = torch.randn(8, 3, 4, 4, generator=g)
    return bn, x, t


def bn1d_problem() -> tuple[nn.BatchNorm1d, Tensor, Tensor]:
    """BatchNorm1d with cumulative running averages (momentum=None), a (8, 4) batch, targets."""
    g = torch.Generator().manual_seed(2)
    bn = nn.BatchNorm1d(4, momentum=None)
    with torch.no_grad():
        bn.weight.copy_(torch.randn(4, generator=g))
        bn.bias.copy_(torch.randn(4, generator=g))
    x = torch.randn(sum(BN_SIZES), 4, generator=g) * torch.tensor([1.0, 5.0, 0.1, 2.0]) - 2.0
    t = torch.randn(sum(BN_SIZES), 4, generator=g)
    return bn, x, t


def bnact_problem() -> tuple[BatchNormAct2d, Tensor, Tensor]:
    """timm's BatchNormAct2d (BN + ReLU) on a (6, 2, 3, 3) batch, with targets."""
    g = torch.Generator().manual_seed(3)
    bn = BatchNormAct2d(2, act_layer=nn.ReLU)
    with torch.no_grad():
        bn.bias.copy_(torch.tensor([0.3, -0.2]))
    x = torch.randn(6, 2, 3, 3, generator=g)
    t = torch.randn(6, 2, 3, 3, generator=g)
    return bn, x, t


def _slice(rank: int, sizes: tuple[int, ...]) -> slice:
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def _bn_train(bn: nn.Module, x: Tensor, t: Tensor, device: str, mean_loss: bool) -> dict[str, Tensor]:
    """Two training steps (the first without backward) and an eval forward, as a dict of results.

    The loss is ``(y * t).sum()`` divided by the local batch size when ``mean_loss``.
    """
    bn = bn.to(device).train()
    x, t = x.to(device), t.to(device)
    with torch.no_grad():
        bn(x * 0.5 + 1.0)
    xg = x.clone().requires_grad_(True)
    y = bn(xg)
    loss = (y * t).sum() / (x.shape[0] if mean_loss else 1)
    loss.backward()
    bn.eval()
    with torch.no_grad():
        y_eval = bn(x)
    out = {
        "y": y.detach(),
        "x_grad": xg.grad,
        "y_eval": y_eval,
        "running_mean": bn.running_mean,
        "running_var": bn.running_var,
        "num_batches_tracked": bn.num_batches_tracked,
    }
    if bn.affine:
        out |= {"weight_grad": bn.weight.grad, "bias_grad": bn.bias.grad}
    return {k: v.detach().cpu() for k, v in out.items()}


# --------------------------------------------------------------------------------------------
# Worker (one per rank)


def _worker(rank: int, world: int, port: int, out_dir: Path, device: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=120))
    try:
        res: dict[str, Any] = {
            "rank": sdist.get_rank(),
            "world": sdist.get_world_size(),
            "is_distributed": sdist.is_distributed(),
            "mean": all_reduce_mean(torch.tensor([float(rank), 10.0 * rank], device=device)).cpu(),
            "mean_int": all_reduce_mean(torch.tensor(rank + 1, device=device)).cpu(),
            "gathered": gather_no_grad(torch.full((2, 3), float(rank), device=device)).cpu(),
        }

        # NT-Xent through gather_with_grad.
        enc, x0, x1 = ntxent_problem()
        n = N_PAIRS // world
        enc = enc.to(device)
        x0 = x0[rank * n : (rank + 1) * n].to(device).requires_grad_(True)
        x1 = x1[rank * n : (rank + 1) * n].to(device)
        z_local = enc(x0)
        z_all = gather_with_grad(z_local)
        res["gather_shape"] = tuple(z_all.shape)
        res["gather_rows_are_local"] = torch.equal(z_all[rank * n : (rank + 1) * n], z_local)
        loss = nt_xent(z_local, enc(x1))
        loss.backward()
        res["ntxent_loss"] = loss.detach().cpu()
        res["ntxent_x0_grad"] = x0.grad.cpu()
        res["ntxent_param_grads"] = [p.grad.cpu() for p in enc.parameters()]

        # SyncBatchNorm: 2d with mean loss and equal halves; 1d with sum loss, unequal sizes.
        bn, x, t = bn2d_problem()
        s = _slice(rank, (x.shape[0] // world,) * world)
        res["bn2d"] = _bn_train(convert_sync_batchnorm(bn), x[s], t[s], device, mean_loss=True)
        bn, x, t = bn1d_problem()
        s = _slice(rank, BN_SIZES)
        res["bn1d"] = _bn_train(convert_sync_batchnorm(bn), x[s], t[s], device, mean_loss=False)
        bn, x, t = bnact_problem()
        s = _slice(rank, (x.shape[0] // world,) * world)
        sync = convert_sync_batchnorm(bn)
        res["bnact_type"] = type(sync).__name__
        res["bnact"] = _bn_train(sync, x[s], t[s], device, mean_loss=True)
        torch.save(res, out_dir / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module", params=DEVICES)
def ranks(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Results of the 2-process run (gloo; on CUDA both ranks share device 0)."""
    return run_gloo_workers(__file__, WORLD, tmp_path_factory.mktemp(f"dist_{request.param}"), request.param, timeout=WORKER_TIMEOUT_S)


# --------------------------------------------------------------------------------------------
# Single process


def test_single_process_fallbacks() -> None:
    assert sdist.get_rank() == 0 and sdist.get_world_size() == 1 and not sdist.is_distributed()
    x = torch.randn(3, 4, requires_grad=True)
    assert gather_with_grad(x) is x
    assert torch.equal(gather_no_grad(x), x) and not gather_no_grad(x).requires_grad
    m = all_reduce_mean(x)
    assert torch.equal(m, x) and m.data_ptr() != x.data_ptr() and not m.requires_grad
    assert all_reduce_mean(torch.tensor(3)).dtype == torch.float32


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("shape", [(6, 3, 5, 5), (7, 3), (5, 3, 4)])
def test_sync_bn_single_process_equals_batchnorm(shape: tuple[int, ...], momentum: float | None, device: str) -> None:
    cls = {4: nn.BatchNorm2d, 2: nn.BatchNorm1d, 3: nn.BatchNorm1d}[len(shape)]
    ref = cls(3, momentum=momentum, device=device)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.normal_()
    sync = convert_sync_batchnorm(copy.deepcopy(ref))
    assert type(sync) is SyncBatchNorm
    for step in range(3):
        x = torch.randn(shape, device=device) * 4 + step
        t = torch.randn(shape, device=device)
        outs = []
        for m in (ref, sync):
            xg = x.clone().requires_grad_(True)
            y = m(xg)
            (y * t).sum().backward()
            outs.append((y, xg.grad))
        assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    for name in ("weight", "bias"):
        assert torch.equal(getattr(ref, name).grad, getattr(sync, name).grad)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(ref, name), getattr(sync, name))
    ref.eval(), sync.eval()
    x = torch.randn(shape, device=device)
    assert torch.equal(ref(x), sync(x))


def test_sync_bn_eval_without_running_stats_uses_batch_stats() -> None:
    ref = nn.BatchNorm2d(2, track_running_stats=False).eval()
    sync = convert_sync_batchnorm(copy.deepcopy(ref))
    x = torch.randn(4, 2, 3, 3)
    assert sync.running_mean is None
    assert torch.equal(ref(x), sync(x))


def test_convert_keeps_tensors_and_timm_activation() -> None:
    model = timm.create_model("test_efficientnet", num_classes=0).train()
    bn_acts = [m for m in model.modules() if isinstance(m, BatchNormAct2d)]
    assert bn_acts, "test_efficientnet should use timm's BatchNormAct2d"
    ref = copy.deepcopy(model)
    params_before = {n: p for n, p in model.named_parameters()}
    keys_before = list(model.state_dict())
    sync = convert_sync_batchnorm(model)
    bns = [m for m in sync.modules() if isinstance(m, _BatchNorm)]
    assert bns and all(isinstance(m, SyncBatchNorm) for m in bns)
    assert sum(isinstance(m, SyncBatchNormAct2d) for m in bns) == len(bn_acts)
    assert list(sync.state_dict()) == keys_before
    assert all(p is params_before[n] for n, p in sync.named_parameters())
    x = torch.randn(4, 3, 32, 32)
    assert torch.equal(ref(x), sync(x))  # training mode: activations applied, stats updated alike
    for (n, a), (_, b) in zip(ref.named_buffers(), sync.named_buffers()):
        assert torch.equal(a, b), n
    ref.eval(), sync.eval()
    assert torch.equal(ref(x), sync(x))


def test_convert_plain_resnet_and_root_bn() -> None:
    model = timm.create_model("test_resnet", num_classes=0)
    sync = convert_sync_batchnorm(model)
    assert sync is model
    assert not any(type(m) in (nn.BatchNorm2d, BatchNormAct2d) for m in sync.modules())
    root = nn.BatchNorm1d(3).eval()
    converted = convert_sync_batchnorm(root)
    assert type(converted) is SyncBatchNorm and not converted.training and converted.weight is root.weight


# --------------------------------------------------------------------------------------------
# Two processes


def test_helpers_two_processes(ranks: list[dict[str, Any]]) -> None:
    for r, res in enumerate(ranks):
        assert (res["rank"], res["world"], res["is_distributed"]) == (r, WORLD, True)
        assert torch.equal(res["mean"], torch.tensor([0.5, 5.0]))
        assert torch.equal(res["mean_int"], torch.tensor(1.5))
        assert torch.equal(res["gathered"], torch.tensor([0.0] * 6 + [1.0] * 6).view(4, 3))


def test_gather_with_grad_matches_single_process_ntxent(ranks: list[dict[str, Any]]) -> None:
    enc, x0, x1 = ntxent_problem()
    x0 = x0.clone().requires_grad_(True)
    loss = nt_xent(enc(x0), enc(x1))  # one process: all 2N anchors
    loss.backward()
    n = N_PAIRS // WORLD
    for r, res in enumerate(ranks):
        assert res["gather_shape"] == (N_PAIRS, 4) and res["gather_rows_are_local"]
        # Input gradients: each rank's backward gives W * d(global mean)/dx_local (DDP divides by W).
        torch.testing.assert_close(res["ntxent_x0_grad"] / WORLD, x0.grad[r * n : (r + 1) * n], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sum(res["ntxent_loss"] for res in ranks) / WORLD, loss.detach())
    for i, p in enumerate(enc.parameters()):
        ddp_grad = sum(res["ntxent_param_grads"][i] for res in ranks) / WORLD
        torch.testing.assert_close(ddp_grad, p.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "name, problem, sizes, mean_loss",
    [
        ("bn2d", bn2d_problem, (4, 4), True),
        ("bn1d", bn1d_problem, BN_SIZES, False),
        ("bnact", bnact_problem, (3, 3), True),
    ],
)
def test_sync_bn_two_processes_match_full_batch(
    ranks: list[dict[str, Any]], name: str, problem: Any, sizes: tuple[int, int], mean_loss: bool
) -> None:
    bn, x, t = problem()
    # One process on the whole batch; the objective DDP optimises is the mean of the local losses.
    with torch.no_grad():
        bn.train()(x * 0.5 + 1.0)
    xg = x.clone().requires_grad_(True)
    y = bn(xg)
    slices = [_slice(r, sizes) for r in range(WORLD)]
    per_rank = [(y[s] * t[s]).sum() / (sizes[r] if mean_loss else 1) for r, s in enumerate(slices)]
    (sum(per_rank) / WORLD).backward()
    bn.eval()
    with torch.no_grad():
        y_eval = bn(x)
    tol = dict(rtol=1e-5, atol=1e-5)
    for r, res in enumerate(ranks):
        out = res[name]
        s = _slice(r, sizes)
        torch.testing.assert_close(out["y"], y.detach()[s], **tol)
        torch.testing.assert_close(out["x_grad"] / WORLD, xg.grad[s], **tol)
        torch.testing.assert_close(out["y_eval"], y_eval[s], **tol)
        torch.testing.assert_close(out["running_mean"], bn.running_mean, **tol)
        torch.testing.assert_close(out["running_var"], bn.running_var, **tol)
        assert torch.equal(out["num_batches_tracked"], bn.num_batches_tracked)
    for p in ("weight", "bias"):
        ddp_grad = sum(res[name][f"{p}_grad"] for res in ranks) / WORLD
        torch.testing.assert_close(ddp_grad, getattr(bn, p).grad, **tol)
    if name == "bnact":
        assert all(res["bnact_type"] == "SyncBatchNormAct2d" for res in ranks)
        assert (y >= 0).all() and (y == 0).any()  # the ReLU is really there


if __name__ == "__main__" and len(sys.argv) == 7 and sys.argv[1] == "--worker":
    torch.set_num_threads(1)
    _worker(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), Path(sys.argv[5]), sys.argv[6])
