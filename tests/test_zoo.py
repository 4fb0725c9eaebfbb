"""The modern zoo (SwAV, Barlow Twins, VICReg, NNCLR): each loss equals an independent float64
implementation of its paper's formula (value and gradient); Sinkhorn-Knopp gives the prescribed
marginals; the support set's nearest neighbour is the brute-force one; the method-specific hooks
(SwAV's prototypes, freeze and queue; Barlow Twins' bias lr) do what the papers' code does; the
losses on 2 processes (gloo) compute what one computes; a killed and resumed run of each method
ends with the weights and queues of an unbroken one.

Two processes through the whole trainer: tests/test_multiprocess.py (parametrised over the
registry; SwAV runs there with local crops and its queue in use, NNCLR with a full support set).
No collapse: tests/test_no_collapse.py (registry-wide).
"""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from _reliability import TINY, assert_same_weights, child_env, fork_cli, make_image_folder
from _steps import batch as make_batch
from _steps import info as step_info
from torch import Tensor

from sslbench.backbones import create_backbone
from sslbench.core import dist as sdist
from sslbench.core.augment import AugmentConfig
from sslbench.core.losses import BarlowTwinsLoss, NNCLRLoss, SwAVLoss, VICRegLoss, sinkhorn_knopp
from sslbench.core.memory import MemoryBank
from sslbench.core.optim import build_optimizer, param_groups
from sslbench.core.registry import get_method
from sslbench.train.run_setup import apply_schedules

ZOO = ["swav", "barlow_twins", "vicreg", "nnclr"]
WORLD = 2


def _rand(*shape: int, seed: int) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _grads(fn: Any, *xs: Tensor) -> tuple[Tensor, list[Tensor]]:
    """Value and gradients of ``fn`` at fresh leaf copies of ``xs``."""
    leaves = [x.detach().clone().requires_grad_(True) for x in xs]
    out = fn(*leaves)
    return out.detach(), list(torch.autograd.grad(out, leaves))


def _close(got: tuple[Tensor, list[Tensor]], want: tuple[Tensor, list[Tensor]]) -> None:
    """The losses compute in float32: values to 1e-5 relative, gradients to 1e-4."""
    torch.testing.assert_close(got[0].double(), want[0], rtol=1e-5, atol=1e-6)
    for g, w in zip(got[1], want[1]):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Independent float64 references, written from the papers' formulas


def ref_standardise(z: Tensor, eps: float = 1e-5) -> Tensor:
    n = z.shape[0]
    mean = sum(z[b] for b in range(n)) / n
    var = sum((z[b] - mean) ** 2 for b in range(n)) / n  # biased, as BatchNorm
    return (z - mean) / torch.sqrt(var + eps)


def ref_barlow(z1: Tensor, z2: Tensor, lambd: float) -> Tensor:
    """Zbontar et al. 2021, Eq. 1 and 2, one entry at a time."""
    a, c = ref_standardise(z1), ref_standardise(z2)
    n, d = a.shape
    corr = [[sum(a[b, i] * c[b, j] for b in range(n)) / n for j in range(d)] for i in range(d)]
    on = sum((1 - corr[i][i]) ** 2 for i in range(d))
    off = sum(corr[i][j] ** 2 for i in range(d) for j in range(d) if i != j)
    return on + lambd * off


def ref_vicreg(z1: Tensor, z2: Tensor, lam: float = 25.0, mu: float = 25.0, nu: float = 1.0) -> Tensor:
    """Bardes et al. 2022: s = MSE; v = mean_j relu(1 - sqrt(Var_j + 1e-4)) (unbiased), averaged over
    the views as the official code; c = sum_{i != j} Cov_ij^2 / D per view, summed."""
    n, d = z1.shape
    s = sum((z1[b, j] - z2[b, j]) ** 2 for b in range(n) for j in range(d)) / (n * d)

    def v(z: Tensor) -> Tensor:
        mean = z.mean(dim=0)
        var = [sum((z[b, j] - mean[j]) ** 2 for b in range(n)) / (n - 1) for j in range(d)]
        return sum(torch.clamp(1 - torch.sqrt(var[j] + 1e-4), min=0) for j in range(d)) / d

    def c(z: Tensor) -> Tensor:
        zc = z - z.mean(dim=0)
        cov = [[sum(zc[b, i] * zc[b, j] for b in range(n)) / (n - 1) for j in range(d)] for i in range(d)]
        return sum(cov[i][j] ** 2 for i in range(d) for j in range(d) if i != j) / d

    return lam * s + mu * (v(z1) + v(z2)) / 2 + nu * (c(z1) + c(z2))


def ref_nnclr(nn1: Tensor, nn2: Tensor, p1: Tensor, p2: Tensor, tau: float) -> Tensor:
    """Dwibedi et al. 2021, Eq. 2 (rows) plus its symmetric column term, both view orders."""
    n = p1.shape[0]

    def cos(x: Tensor, y: Tensor) -> Tensor:
        return (x * y).sum() / (x.norm() * y.norm())

    def two_terms(nn: Tensor, p: Tensor) -> Tensor:
        rows = sum(-(cos(nn[i], p[i]) / tau - torch.logsumexp(torch.stack([cos(nn[i], p[k]) / tau for k in range(n)]), 0)) for i in range(n))
        cols = sum(-(cos(nn[i], p[i]) / tau - torch.logsumexp(torch.stack([cos(nn[k], p[i]) / tau for k in range(n)]), 0)) for i in range(n))
        return (rows + cols) / n

    return (two_terms(nn1.detach(), p2) + two_terms(nn2.detach(), p1)) / 4


def ref_sinkhorn(scores: Tensor, eps: float, iters: int) -> Tensor:
    """Caron et al. 2020, Sec. 3.1: alternate row (prototype, 1/K) and column (sample, 1/B) scaling."""
    b, k = scores.shape
    q = [[math.exp(float(scores[i, j]) / eps) for i in range(b)] for j in range(k)]  # K x B
    total = sum(map(sum, q))
    q = [[x / total for x in row] for row in q]
    for _ in range(iters):
        q = [[x / sum(row) / k for x in row] for row in q]
        cols = [sum(q[j][i] for j in range(k)) for i in range(b)]
        q = [[q[j][i] / cols[i] / b for i in range(b)] for j in range(k)]
    return torch.tensor([[q[j][i] * b for j in range(k)] for i in range(b)], dtype=torch.float64)


def ref_swav(scores: list[Tensor], tau: float, eps: float, iters: int, queue: list[Tensor] | None = None) -> Tensor:
    """Swapped prediction (Caron et al. 2020, Eq. 1-2): codes of views 0 and 1, predicted by every other view."""
    n, views = scores[0].shape[0], len(scores)
    total = scores[0].new_zeros(())
    for s in range(2):
        src = scores[s].detach() if queue is None else torch.cat([queue[s], scores[s].detach()])
        q = ref_sinkhorn(src, eps, iters)[-n:]
        for v in range(views):
            if v != s:
                logp = scores[v] / tau - torch.logsumexp(scores[v] / tau, dim=1, keepdim=True)
                total = total - sum((q[b] * logp[b]).sum() for b in range(n)) / n / (views - 1)
    return total / 2


# --------------------------------------------------------------------------------------------
# The losses against the references


@pytest.mark.parametrize("n,d,lambd", [(4, 3, 0.0051), (9, 5, 0.5), (16, 6, 0.02)])
def test_barlow_twins_loss_matches_formula(n, d, lambd):
    z1, z2 = _rand(n, d, seed=n) * 3 + 1, _rand(n, d, seed=n + 1)
    _close(_grads(BarlowTwinsLoss(lambd), z1, z2), _grads(lambda a, b: ref_barlow(a, b, lambd), z1, z2))


@pytest.mark.parametrize("n,d,scale", [(4, 3, 0.3), (9, 5, 1.0), (12, 6, 2.0)])
def test_vicreg_loss_matches_formula(n, d, scale):
    # scale < 1: every std under the hinge; > 1: most above it (the hinge's both sides)
    z1, z2 = _rand(n, d, seed=n) * scale, _rand(n, d, seed=n + 1) * scale
    _close(_grads(lambda a, b: VICRegLoss()(a, b)[0], z1, z2), _grads(ref_vicreg, z1, z2))
    _, terms = VICRegLoss()(z1, z2)
    assert set(terms) == {"invariance", "variance", "covariance"}


@pytest.mark.parametrize("n,d,tau", [(3, 4, 0.1), (8, 5, 0.5), (6, 16, 0.07)])
def test_nnclr_loss_matches_formula(n, d, tau):
    nn1, nn2, p1, p2 = (_rand(n, d, seed=10 * n + i) for i in range(4))
    got = _grads(lambda a, b: NNCLRLoss(tau)(nn1, nn2, a, b), p1, p2)
    _close(got, _grads(lambda a, b: ref_nnclr(nn1, nn2, a, b, tau), p1, p2))
    # the neighbours carry no gradient
    leaf = nn1.clone().requires_grad_(True)
    NNCLRLoss(tau)(leaf, nn2, p1.clone().requires_grad_(True), p2).backward()
    assert leaf.grad is None


@pytest.mark.parametrize("views,n,k,with_queue", [(2, 5, 7, False), (4, 6, 5, False), (3, 4, 6, True)])
def test_swav_loss_matches_formula(views, n, k, with_queue):
    scores = [F.normalize(_rand(n, 8, seed=v), dim=1) @ F.normalize(_rand(k, 8, seed=99), dim=1).T for v in range(views)]
    queue = [F.normalize(_rand(10, 8, seed=50 + s), dim=1) @ F.normalize(_rand(k, 8, seed=99), dim=1).T for s in range(2)] if with_queue else None
    got = _grads(lambda *s: SwAVLoss(0.1, 0.05, 3)(list(s), queue), *scores)
    _close(got, _grads(lambda *s: ref_swav(list(s), 0.1, 0.05, 3, queue), *scores))


def test_sinkhorn_matches_reference_and_has_the_prescribed_marginals():
    b, k = 12, 5
    scores = F.normalize(_rand(b, 6, seed=1), dim=1) @ F.normalize(_rand(k, 6, seed=2), dim=1).T
    q = sinkhorn_knopp(scores, 0.05, 3)
    torch.testing.assert_close(q.double(), ref_sinkhorn(scores, 0.05, 3), rtol=1e-5, atol=1e-7)
    # after the last (column) step each sample's code sums to 1 exactly, whatever the iterations
    torch.testing.assert_close(q.sum(dim=1), torch.ones(b), rtol=0, atol=1e-6)
    # converged, every prototype receives B/K of the mass: the equipartition constraint
    q = sinkhorn_knopp(scores, 0.1, 500)
    torch.testing.assert_close(q.sum(dim=1), torch.ones(b), rtol=0, atol=1e-5)
    torch.testing.assert_close(q.sum(dim=0), torch.full((k,), b / k), rtol=1e-4, atol=1e-4)
    assert (q >= 0).all()


def test_nearest_neighbour_is_the_brute_force_one():
    owner = torch.nn.Module()
    bank = MemoryBank(owner, "support", 50, 8)
    bank.push(F.normalize(torch.randn(50, 8), dim=1))
    queries = torch.randn(20, 8) * 5
    got = bank.nearest(queries)
    for i in range(20):
        q = queries[i].double()
        sims = [float(q @ bank.rows[j].double() / q.norm() / bank.rows[j].double().norm()) for j in range(50)]
        assert torch.equal(got[i], bank.rows[max(range(50), key=sims.__getitem__)])


# --------------------------------------------------------------------------------------------
# The methods' own hooks


def _method(name: str, **cfg: Any) -> Any:
    cls = get_method(name)
    torch.manual_seed(0)
    return cls(create_backbone("resnet18", 32, channels=(8, 16, 32, 64)), cls.Config(**cfg))


def test_swav_views_are_two_global_and_the_local_crops():
    m = _method("swav", num_local_crops=3, local_crop_scale=(0.1, 0.4))
    specs = m.views(AugmentConfig(crop_scale=(0.2, 1.0)), 32)
    assert [s.size for s in specs] == [32, 32, 18, 18, 18]
    assert [s.aug.crop_scale for s in specs] == [(0.2, 1.0)] * 2 + [(0.1, 0.4)] * 3
    assert [s.size for s in _method("swav", local_crop_size=96).views(AugmentConfig(), 224)] == [224] * 2 + [96] * 6


def test_swav_normalises_the_prototypes_and_freezes_them_first():
    m = _method("swav", num_local_crops=1, queue_size=0, freeze_prototypes_epochs=0.5)
    with torch.no_grad():
        m.prototypes.weight.mul_(3.0)
    views = [torch.randn(4, 3, s.size, s.size) for s in m.views(AugmentConfig(), 32)]
    loss, _ = m.training_step(make_batch(views))
    torch.testing.assert_close(m.prototypes.weight.norm(dim=1), torch.ones(m.cfg.num_prototypes))
    loss.backward()
    assert m.prototypes.weight.grad is not None
    m.after_backward(step_info(4, 100, steps_per_epoch=10))  # epoch 0.4 < 0.5: frozen
    assert m.prototypes.weight.grad is None
    m.training_step(make_batch(views))[0].backward()
    m.after_backward(step_info(5, 100, steps_per_epoch=10))  # epoch 0.5: trained
    assert m.prototypes.weight.grad is not None and m.prototypes.weight.grad.abs().sum() > 0


def test_swav_queue_fills_from_its_epoch_and_is_used_once_full():
    m = _method("swav", queue_size=20, epoch_queue_starts=1, proj_dim=4, num_prototypes=3)
    used = []
    for step in range(9):  # 2 steps per epoch: fills from step 2; 20 rows / batch 8 -> used from step 2 + 3
        z = F.normalize(torch.randn(8, 8), dim=1)
        used.append(m._queue_scores(step_info(step, 100, steps_per_epoch=2), z) is not None)
        if step == 1:
            assert not m.bank.rows.any()
    assert used == [False] * 5 + [True] * 4
    assert int(m.bank.ptr) == (7 * 8) % 20 and m.bank.rows.abs().sum(dim=1).gt(0).all()
    with torch.no_grad():  # the scores of both global crops' halves of the queue, as it was before the push
        want = [m.prototypes(m.bank.rows[:, :4]), m.prototypes(m.bank.rows[:, 4:])]
    z = F.normalize(torch.randn(8, 8), dim=1)
    scores = m._queue_scores(step_info(9, 100, steps_per_epoch=2), z)
    assert scores is not None and [s.shape for s in scores] == [(20, 3), (20, 3)]
    for got, w in zip(scores, want):
        torch.testing.assert_close(got, w)
    assert torch.equal(m.bank.rows[(16 + torch.arange(8)) % 20], z)  # the newest rows, wrapped around the end


def test_barlow_twins_biases_and_norms_take_the_papers_smaller_lr():
    m = _method("barlow_twins")
    groups = m.param_groups(param_groups(m, 1.5e-6))
    opt = build_optimizer("lars", groups, 0.2, weight_decay=1.5e-6)
    apply_schedules(opt, {"lr": lambda info: 0.4}, step_info(3, 10))
    lrs = {g["lars_exclude"]: g["lr"] for g in opt.param_groups}
    assert lrs == {False: 0.4, True: pytest.approx(0.4 * 0.024)}
    assert all(p.ndim <= 1 for g in opt.param_groups if g["lars_exclude"] for p in g["params"])
    last = m.projector[-1]
    assert isinstance(last, torch.nn.Linear) and last.bias is None and last.out_features == 2048


def test_nnclr_pushes_view_one_and_takes_neighbours_from_before_the_push():
    m = _method("nnclr", queue_size=16)
    views = [torch.randn(8, 3, 32, 32) for _ in range(2)]
    before = m.bank.rows.clone()
    seen = []
    m.bank.nearest = lambda q: (seen.append(m.bank.rows.clone()), MemoryBank.nearest(m.bank, q))[1]  # type: ignore[method-assign]
    m.training_step(make_batch(views))
    assert len(seen) == 2 and all(torch.equal(s, before) for s in seen)  # both neighbours from the old set
    assert torch.equal(m.bank.rows[8:], before[8:]) and not torch.equal(m.bank.rows[:8], before[:8])
    torch.testing.assert_close(m.bank.rows[:8].norm(dim=1), torch.ones(8))
    assert int(m.bank.ptr) == 8


def test_nnclr_runs_one_forward_pass_per_view():
    """Each view through backbone, projector and predictor on its own (BatchNorm statistics per
    view), as lightly's and solo-learn's NNCLR; the loss is NNCLRLoss of the old set's neighbours."""
    m = _method("nnclr", queue_size=16)
    g = torch.Generator().manual_seed(3)
    views = [torch.randn(8, 3, 32, 32, generator=g) for _ in range(2)]
    before = m.bank.rows.clone()
    loss, _ = m.training_step(make_batch(views))
    m.bank.rows.copy_(before)
    z1, z2 = (m.projector(m.encoder(x)) for x in views)
    nn1, nn2 = (m.bank.nearest(F.normalize(z.detach(), dim=1)) for z in (z1, z2))
    want = NNCLRLoss(m.cfg.temperature)(nn1, nn2, m.predictor(z1), m.predictor(z2))
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# The losses on two processes (gloo) against one


def _problem() -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(7)
    return {name: torch.randn(8, 6, generator=g) for name in ("z1", "z2", "nn1", "nn2", "p1", "p2")} | {
        "scores": torch.randn(8, 5, generator=g).tanh(),
        "queue": torch.randn(6, 5, generator=g).tanh(),
    }


def _losses(x: dict[str, Tensor], sl: slice, queue: Tensor) -> dict[str, Any]:
    """Each loss on rows ``sl`` of the problem: its value and the gradients of those rows."""
    out: dict[str, Any] = {}
    leaves = {k: v[sl].clone().requires_grad_(True) for k, v in x.items() if k != "queue"}
    fns = {
        "barlow": lambda: BarlowTwinsLoss(0.1)(leaves["z1"], leaves["z2"]),
        "vicreg": lambda: VICRegLoss()(leaves["z1"], leaves["z2"])[0],
        "nnclr": lambda: NNCLRLoss(0.2)(leaves["nn1"], leaves["nn2"], leaves["p1"], leaves["p2"]),
        "swav": lambda: SwAVLoss(0.1, 0.05, 3)([leaves["scores"], leaves["z1"][:, :5].tanh(), leaves["z2"][:, :5].tanh()], [queue, queue]),
    }
    for name, fn in fns.items():
        for v in leaves.values():
            v.grad = None
        loss = fn()
        loss.backward()
        out[name] = (loss.detach(), {k: v.grad.clone() for k, v in leaves.items() if v.grad is not None})
    out["codes"] = sinkhorn_knopp(torch.cat([queue, x["scores"][sl]]), 0.05, 3)[-(sl.stop - sl.start) :]
    return out


def _loss_worker(rank: int, port: int, out: Path) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=120))
    try:
        x = _problem()
        queue = x["queue"].tensor_split(WORLD)[rank]  # each process scores its share of the queue
        torch.save(_losses(x, slice(4 * rank, 4 * rank + 4), queue), out / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_losses_on_two_processes_equal_one(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), str(Path(sdist.__file__).resolve().parents[1])]),
    }
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--loss-worker", str(r), str(port), str(tmp_path)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(WORLD)
    ]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    x = _problem()
    one = _losses(x, slice(0, 8), x["queue"])
    for name in ("barlow", "vicreg", "nnclr", "swav"):
        # DDP's convention: the processes' mean loss is the one-process loss, and each process's
        # input gradient divided by W is the one-process gradient of its rows
        torch.testing.assert_close(sum(r[name][0] for r in ranks) / WORLD, one[name][0], rtol=1e-5, atol=1e-6)
        for key, g in one[name][1].items():
            both = torch.cat([r[name][1][key] for r in ranks]) / WORLD
            torch.testing.assert_close(both, g, rtol=1e-4, atol=1e-6, msg=f"{name}: gradient of {key}")
    torch.testing.assert_close(torch.cat([r["codes"] for r in ranks]), one["codes"], rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Kill and resume: the queues and support sets come back with the weights

ZOO_SETS = {
    "swav": ["queue_size=32", "epoch_queue_starts=0", "freeze_prototypes_epochs=0.25", "num_local_crops=2", "local_crop_size=8"],
    "nnclr": ["queue_size=32"],
    "barlow_twins": [],
    "vicreg": [],
}


def _zoo_args(data: Path, method: str, out: Path) -> list[str]:
    args = ["train", "--method", method, "--data", f"imagefolder:{data}", "--steps", "6", *TINY, "--output", str(out)]
    for s in ("deterministic=true", "checkpoint_every=2", "log_every=1", "quick_knn=false", *ZOO_SETS[method]):
        args += ["--set", s]
    return args


@pytest.mark.slow
def test_a_killed_and_resumed_run_of_each_zoo_method_equals_an_unbroken_one(tmp_path):
    """64 images, batch 16: 4 steps an epoch, 6 steps. The kill after step 3 resumes from the
    checkpoint of step 2: SwAV's queue (32 rows) has filled in steps 0 and 1 and is in use from
    step 2 on, its prototypes train from step 1; NNCLR's support set (32 rows) is full of real
    projections from step 2 on."""
    data = make_image_folder(tmp_path / "data")
    env = child_env(tmp_path / "cache")
    children = {}
    for m in ZOO:
        children[m, "ref"] = fork_cli(_zoo_args(data, m, tmp_path / f"{m}-ref"), env)
        children[m, "killed"] = fork_cli(_zoo_args(data, m, tmp_path / f"{m}-killed"), {**env, "SSLBENCH_TEST_KILL_AT": "step:3"})
    for (_, kind), child in children.items():
        res = child.wait()
        assert res.returncode == (0 if kind == "ref" else -9), res.describe()
    resumed = {m: fork_cli(["train", "--output", str(tmp_path / f"{m}-killed"), "--resume", "--quiet"], env) for m in ZOO}
    for m, child in resumed.items():
        res = child.wait()
        assert res.returncode == 0 and "from step 2" in res.stderr, res.describe()
        assert_same_weights(tmp_path / f"{m}-ref", tmp_path / f"{m}-killed")  # queue, support set and ptrs included


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "--loss-worker":
    torch.set_num_threads(1)
    _loss_worker(int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
