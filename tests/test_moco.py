"""MoCo v2 (queue, InfoNCE, momentum key encoder) and MoCo v3 (in-batch, symmetrised, 2 tau).

The last tests start this file as a script in two gloo processes (``python tests/test_moco.py
--worker ...``) and compare with one process on the whole batch: every rank's queue must be the
single-process queue, and the losses and gradients must agree.
"""

from __future__ import annotations

import collections
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from _gloo import run_gloo_workers
from _steps import batch as make_batch
from _steps import info as step_info
from torch import Tensor, nn

from sslbench.core.memory import MemoryBank
from sslbench.methods.moco import InfoNCELoss, MoCo, MoCoConfig
from sslbench.methods.mocov3 import MoCoV3, MoCoV3Config, MoCoV3Loss

WORLD = 2
N = 8  # global batch of the 2-process comparison


class ToyBackbone(nn.Sequential):
    """A small backbone with BatchNorm and ``num_features``: (B, 3, 4, 4) -> (B, 16)."""

    def __init__(self) -> None:
        super().__init__(nn.Flatten(), nn.Linear(48, 16), nn.BatchNorm1d(16), nn.ReLU())
        self.num_features = 16


def small_moco(**kw: Any) -> MoCo:
    torch.manual_seed(0)
    return MoCo(ToyBackbone(), MoCoConfig(**{"queue_size": 12, "proj_hidden_dim": 32, "proj_dim": 8, **kw}))


def small_mocov3() -> MoCoV3:
    torch.manual_seed(0)
    return MoCoV3(ToyBackbone(), MoCoV3Config(hidden_dim=32, proj_dim=8))


def views(n: int = N, seed: int = 1) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 4, 4, generator=g)
    return [x + 0.1 * torch.randn(x.shape, generator=g), x + 0.1 * torch.randn(x.shape, generator=g)]


# --------------------------------------------------------------------------------------------
# Losses against plain references


def reference_infonce(q: Tensor, k: Tensor, queue: Tensor, tau: float) -> Tensor:
    """MoCo Eq. 1, one query at a time: -log exp(q.k+/tau) / (exp(q.k+/tau) + sum_j exp(q.n_j/tau))."""
    total = q.new_zeros(())
    for i in range(q.shape[0]):
        qi = q[i] / q[i].norm()
        pos = torch.exp(qi @ (k[i] / k[i].norm()) / tau)
        neg = sum(torch.exp(qi @ queue[j] / tau) for j in range(queue.shape[0]))
        total = total - torch.log(pos / (pos + neg))
    return total / q.shape[0]


@pytest.mark.parametrize("n,d,k,tau", [(1, 3, 1, 0.2), (5, 8, 7, 0.07), (8, 4, 16, 1.0)])
def test_infonce_matches_reference_loss_and_grads(n, d, k, tau):
    g = torch.Generator().manual_seed(n + d + k)
    q = torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True)
    key = torch.randn(n, d, generator=g, dtype=torch.float64)
    queue = F.normalize(torch.randn(k, d, generator=g, dtype=torch.float64), dim=1)
    got = InfoNCELoss(tau)(q, key, queue)
    (gq,) = torch.autograd.grad(got, q)
    q2 = q.detach().clone().requires_grad_()
    want = reference_infonce(q2, key, queue, tau)
    (wq,) = torch.autograd.grad(want, q2)
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-6)  # float32 inside
    assert torch.allclose(gq.double(), wq, rtol=1e-4, atol=1e-6)


def test_infonce_positive_is_at_index_zero():
    # k = q and a one-key queue u: loss_i = -log(e^(1/tau) / (e^(1/tau) + e^(q_i.u/tau)))
    q = F.normalize(torch.randn(4, 5), dim=1)
    u = F.normalize(torch.randn(1, 5), dim=1)
    tau = 0.5
    want = torch.log1p(torch.exp((q @ u[0] - 1) / tau)).mean()
    assert torch.allclose(InfoNCELoss(tau)(q, q.clone(), u), want, atol=1e-6)


def reference_mocov3(q: Tensor, k: Tensor, tau: float) -> Tensor:
    """ctr(q, k) of MoCo v3's Algorithm 1, row by row, times 2 tau."""
    qn, kn = F.normalize(q, dim=1), F.normalize(k, dim=1)
    total = q.new_zeros(())
    for i in range(q.shape[0]):
        logits = torch.stack([qn[i] @ kn[j] / tau for j in range(k.shape[0])])
        total = total - (logits[i] - torch.logsumexp(logits, 0))
    return total / q.shape[0] * 2 * tau


@pytest.mark.parametrize("n,d,tau", [(2, 3, 0.2), (6, 8, 1.0), (9, 4, 0.1)])
def test_mocov3_loss_matches_reference(n, d, tau):
    g = torch.Generator().manual_seed(n * d)
    q = torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(n, d, generator=g, dtype=torch.float64)
    got = MoCoV3Loss(tau)(q, k)
    (gq,) = torch.autograd.grad(got, q)
    q2 = q.detach().clone().requires_grad_()
    want = reference_mocov3(q2, k, tau)
    (wq,) = torch.autograd.grad(want, q2)
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-6)
    assert torch.allclose(gq.double(), wq, rtol=1e-4, atol=1e-6)


def test_mocov3_step_is_symmetrised_ctr_with_momentum_keys():
    m = small_mocov3()
    v = views()
    loss, _ = m.training_step(make_batch(v))
    # one forward pass per view (BatchNorm statistics of each view alone), as the official MoCo.forward
    z = [m.predictor(m.projector(m.encoder(x))) for x in v]
    with torch.no_grad():
        k = [m.momentum_projector(m.momentum_encoder(x)) for x in v]
    want = reference_mocov3(z[0], k[1], 0.2) + reference_mocov3(z[1], k[0], 0.2)
    assert torch.allclose(loss, want, rtol=1e-5, atol=1e-6)


def test_mocov3_momentum_schedule_endpoints():
    m = small_mocov3()
    assert m.momentum_at(step_info(0, 100)) == 0.99
    assert m.momentum_at(step_info(100, 100)) == 1.0
    ms = [m.momentum_at(step_info(s, 100)) for s in range(101)]
    assert all(a <= b for a, b in zip(ms, ms[1:]))
    assert abs(m.momentum_at(step_info(50, 100)) - 0.995) < 1e-12  # half-way on the cosine


# --------------------------------------------------------------------------------------------
# MoCo v2: queue, keys, momentum


def test_queue_is_a_fifo_that_wraps_around():
    m = small_moco()  # K = 12
    assert isinstance(m.bank, MemoryBank) and m.bank.rows is m.queue and m.bank.ptr is m.queue_ptr
    fifo: collections.deque[Tensor] = collections.deque(list(m.queue.clone()), maxlen=12)
    ptr = 0
    for n in (5, 5, 5, 1, 12, 7, 20, 3):  # K not a multiple of n, a full queue's worth, more than K
        keys = F.normalize(torch.randn(n, m.cfg.proj_dim), dim=1)
        m.bank.push(keys)
        fifo.extend(list(keys))
        ptr = (ptr + min(n, 12)) % 12  # the pointer moves past the keys written
        assert int(m.queue_ptr) == ptr
        oldest_first = torch.roll(m.queue, -ptr, dims=0)
        assert torch.equal(oldest_first, torch.stack(list(fifo))), f"after enqueueing {n}"


def test_oldest_keys_are_replaced_first():
    m = small_moco()  # K = 12
    first = F.normalize(torch.randn(8, 8), dim=1)
    second = F.normalize(torch.randn(8, 8), dim=1)
    m.bank.push(first)
    m.bank.push(second)  # rows 8..11 then 0..3: overwrites the random init first, then first[0:4]
    assert torch.equal(m.queue[8:], second[:4]) and torch.equal(m.queue[:4], second[4:])
    assert torch.equal(m.queue[4:8], first[4:])  # the newer half of the first batch survives
    assert int(m.queue_ptr) == 4


def test_step_uses_the_old_queue_then_enqueues_normalised_keys():
    m = small_moco()
    v = views()
    old = m.queue.clone()
    with torch.no_grad():
        k = F.normalize(m.key_projector(m.key_encoder(v[1])), dim=1)
        q = m.projector(m.encoder(v[0]))
    loss, _ = m.training_step(make_batch(v))
    assert torch.allclose(loss, reference_infonce(q, k, old, 0.2), rtol=1e-5, atol=1e-6)
    assert torch.allclose(m.queue[:N], k, atol=1e-6)
    assert torch.allclose(m.queue.norm(dim=1), torch.ones(12), atol=1e-6)
    assert torch.equal(m.queue[N:], old[N:])
    assert int(m.queue_ptr) == N
    loss.backward()  # the in-place enqueue did not break the graph
    assert all(p.grad is None for p in m.key_encoder.parameters())


def test_symmetric_option_averages_both_directions_and_enqueues_both_keys():
    m = small_moco(symmetric=True, queue_size=20)
    v = views()
    old = m.queue.clone()
    with torch.no_grad():
        k = F.normalize(m.key_projector(m.key_encoder(torch.cat(v))), dim=1)
        q = m.projector(m.encoder(torch.cat(v)))
    loss, _ = m.training_step(make_batch(v))
    want = (reference_infonce(q[:N], k[N:], old, 0.2) + reference_infonce(q[N:], k[:N], old, 0.2)) / 2
    assert torch.allclose(loss, want, rtol=1e-5, atol=1e-6)
    assert torch.allclose(m.queue[: 2 * N], k, atol=1e-6) and int(m.queue_ptr) == 2 * N


def test_key_encoder_starts_as_a_frozen_copy_and_momentum_is_constant():
    m = small_moco()
    for online, target in m.momentum_pairs():
        assert online is not target
        for a, b in zip(online.parameters(), target.parameters()):
            assert torch.equal(a, b) and a.data_ptr() != b.data_ptr() and not b.requires_grad
    assert m.momentum_at(step_info(0, 100)) == m.momentum_at(step_info(99, 100)) == m.momentum_at(step_info(100, 100)) == 0.99
    assert MoCo(ToyBackbone(), MoCoConfig(momentum=0.999)).momentum_at(step_info(5, 10)) == 0.999


def test_projector_is_mocov2_mlp_without_bn():
    m = MoCo(ToyBackbone())
    linears = [mod for mod in m.projector if isinstance(mod, nn.Linear)]
    assert [(l.in_features, l.out_features) for l in linears] == [(16, 2048), (2048, 128)]
    assert not any(isinstance(mod, nn.BatchNorm1d) for mod in m.projector)
    assert tuple(m.queue.shape) == (4096, 128)


# --------------------------------------------------------------------------------------------
# Two processes: identical queues, and the single-process losses and gradients


def _worker(rank: int, world: int, port: int, out_dir: Path) -> None:
    from sslbench.core.dist import convert_sync_batchnorm

    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        n = N // world
        res: dict[str, Any] = {}
        m = convert_sync_batchnorm(small_moco())
        losses = []
        index = torch.arange(rank * n, (rank + 1) * n)  # this rank's share of the global batch
        for step, seed in enumerate((1, 2)):  # two steps: 16 keys through a queue of 12 (wraps)
            v = [x[rank * n : (rank + 1) * n] for x in views(seed=seed)]
            losses.append(m.training_step(make_batch(v, step=step, index=index))[0].detach())
        res["moco_losses"] = torch.stack(losses)
        res["queue"], res["ptr"] = m.queue.clone(), m.queue_ptr.clone()
        m3 = convert_sync_batchnorm(small_mocov3())
        v = [x[rank * n : (rank + 1) * n] for x in views()]
        loss, _ = m3.training_step(make_batch(v, index=index))
        loss.backward()
        res["v3_loss"] = loss.detach()
        res["v3_grads"] = [p.grad.clone() for p in m3.parameters() if p.requires_grad]
        torch.save(res, out_dir / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return run_gloo_workers(__file__, WORLD, tmp_path_factory.mktemp("moco_dist"))


def test_two_processes_keep_identical_queues_equal_to_one_process(ranks):
    m = small_moco()
    losses = torch.stack([m.training_step(make_batch(views(seed=s), step=step))[0].detach() for step, s in enumerate((1, 2))])
    for r in ranks:
        assert torch.equal(r["queue"], ranks[0]["queue"]) and int(r["ptr"]) == int(m.queue_ptr) == 4
        assert torch.allclose(r["queue"], m.queue, atol=1e-5)
    mean_loss = sum(r["moco_losses"] for r in ranks) / WORLD
    assert torch.allclose(mean_loss, losses, rtol=1e-4, atol=1e-5)


def test_two_processes_mocov3_loss_and_grads_equal_one_process(ranks):
    m3 = small_mocov3()
    loss, _ = m3.training_step(make_batch(views()))
    loss.backward()
    want = [p.grad for p in m3.parameters() if p.requires_grad]
    assert torch.allclose(sum(r["v3_loss"] for r in ranks) / WORLD, loss.detach(), rtol=1e-4, atol=1e-5)
    for i, w in enumerate(want):  # DDP averages the ranks' gradients
        got = sum(r["v3_grads"][i] for r in ranks) / WORLD
        assert torch.allclose(got, w, rtol=1e-3, atol=1e-5), i


if __name__ == "__main__" and len(sys.argv) == 6 and sys.argv[1] == "--worker":
    _worker(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), Path(sys.argv[5]))
