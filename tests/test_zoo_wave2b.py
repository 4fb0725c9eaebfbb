"""The zoo's second wave, part b (issue 29): W-MSE, LeJEPA and ReSSL.

- Each loss equals an independent float64 implementation of its paper's formula, value and
  gradient, on random inputs of several shapes: W-MSE's Cholesky whitening written as the
  Cholesky-Banachiewicz recursion and forward substitution; LeJEPA's Epps-Pulley statistic as the
  trapezoid rule over the whole interval [-t_max, t_max] of the complex characteristic functions;
  ReSSL's relation cross-entropy one queue entry at a time.
- The methods use their losses as the papers do: the whitening's sub-batches are a permutation
  drawn from the samples' counter-based uniforms; SIGReg's directions are a pure function of
  (seed, step); ReSSL's teacher sees a weak view and its keys enter the queue after the loss.
- One training step of each method (settings that exercise its global state: several whitening
  sub-batches and splits, local views, a queue that wraps) split over 2 gloo processes with
  synchronised BatchNorm computes the loss, the gradients and the queue of one process.
- A killed and resumed run of each method ends with the weights and buffers of an unbroken one.

Through the whole trainer at the methods' defaults: tests/test_multiprocess.py (2 processes = 1),
tests/test_no_collapse.py, tests/test_methods_contract.py, tests/test_host_sync.py,
tests/test_vit_multisize.py (all parametrised over the registry).
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
from sslbench.core.method import Batch, default_views
from sslbench.core.registry import get_method
from sslbench.methods.lejepa import LeJEPALoss, slice_directions
from sslbench.methods.ressl import ReSSLLoss
from sslbench.methods.wmse import WMSELoss, whiten

WAVE = ["wmse", "lejepa", "ressl"]
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
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Independent float64 references, written from the papers' formulas


def ref_cholesky(a: list[list[Tensor]]) -> list[list[Tensor]]:
    """Cholesky-Banachiewicz: the lower-triangular L with L L^T = a, one entry at a time."""
    d = len(a)
    zero = a[0][0] * 0
    low = [[zero for _ in range(d)] for _ in range(d)]
    for i in range(d):
        for j in range(i + 1):
            s = sum((low[i][k] * low[j][k] for k in range(j)), zero)
            low[i][j] = torch.sqrt(a[i][i] - s) if i == j else (a[i][j] - s) / low[j][j]
    return low


def ref_whiten(x: Tensor, eps: float) -> list[list[Tensor]]:
    """Ermolov et al. 2021, Eq. 4: ``W (x_b - mean)`` with ``W^T W = Cov^-1``, ``W = L^-1`` for the
    Cholesky factor L of the (shrunk) unbiased covariance, by forward substitution per sample."""
    n, d = x.shape
    mean = [sum(x[b, i] for b in range(n)) / n for i in range(d)]
    xc = [[x[b, i] - mean[i] for i in range(d)] for b in range(n)]
    cov = [[(1 - eps) * sum(xc[b][i] * xc[b][j] for b in range(n)) / (n - 1) + (eps if i == j else 0.0) for j in range(d)] for i in range(d)]
    low = ref_cholesky(cov)
    out = []
    for b in range(n):
        w: list[Tensor] = []
        for i in range(d):
            w.append((xc[b][i] - sum((low[i][k] * w[k] for k in range(i)), xc[b][i] * 0)) / low[i][i])
        out.append(w)
    return out


def ref_wmse(z: Tensor, perms: Tensor, w_size: int, eps: float) -> Tensor:
    """W-MSE (Ermolov et al. 2021, Eq. 5 and Algorithm 1): per split of the batch into
    max(1, N // w_size) sub-batches (sizes differing by at most one, the larger first), the
    squared distance of the L2-normalised whitened positives, averaged over samples, pairs of
    views and splits."""
    v, n, _ = z.shape
    k = max(1, n // w_size)
    sizes = [n // k + (1 if g < n % k else 0) for g in range(k)]
    total, count = z.new_zeros(()), 0
    for perm in perms.tolist():
        start = 0
        for size in sizes:
            idx = perm[start : start + size]
            start += size
            white = [ref_whiten(z[a, idx], eps) for a in range(v)]
            for a in range(v):
                for b in range(a + 1, v):
                    for s in range(size):
                        wa, wb = torch.stack(white[a][s]), torch.stack(white[b][s])
                        total = total + ((wa / wa.norm() - wb / wb.norm()) ** 2).sum()
        count += n * v * (v - 1) // 2
    return total / count


def ref_lejepa(z: Tensor, num_global: int, directions: Tensor, lambd: float, knots: int, t_max: float) -> Tensor:
    """LeJEPA (Balestriero & LeCun 2025): ``lambd * SIGReg + (1 - lambd) * prediction``. SIGReg:
    for each view and direction a, the Epps-Pulley statistic
    ``N * int_{-t_max}^{t_max} |phi_N(t) - exp(-t^2/2)|^2 exp(-t^2/2) dt`` of the projections
    ``z_i . a`` (phi_N the empirical characteristic function), by the trapezoid rule on 2 knots - 1
    points, averaged over directions and views. Prediction: the mean squared difference of every
    view to the mean of the global views."""
    v, n, d = z.shape
    t = torch.linspace(-t_max, t_max, 2 * knots - 1, dtype=torch.float64)
    stats = []
    for view in range(v):
        for m in range(directions.shape[1]):
            x = z[view] @ directions[:, m]  # (N,)
            ecf = torch.stack([torch.exp(1j * tk * x).mean() for tk in t])
            integrand = (ecf - torch.exp(-(t**2) / 2)).abs() ** 2 * torch.exp(-(t**2) / 2)
            stats.append(n * torch.trapezoid(integrand, t))
    sigreg = torch.stack(stats).mean()
    centre = [sum(z[g, i] for g in range(num_global)) / num_global for i in range(n)]
    prediction = sum(((centre[i] - z[view, i]) ** 2).sum() for view in range(v) for i in range(n)) / (v * n * d)
    return lambd * sigreg + (1 - lambd) * prediction


def ref_ressl(q: Tensor, k: Tensor, queue: Tensor, tq: float, tk: float) -> Tensor:
    """ReSSL (Zheng et al. 2021, Eq. 3-4): the cross-entropy of the student's relation to the
    queue (temperature tq) against the teacher's (tk, no gradient), per image, averaged."""
    q, k = q / q.norm(dim=1, keepdim=True), (k / k.norm(dim=1, keepdim=True)).detach()
    kq = queue / queue.norm(dim=1, keepdim=True)
    total = q.new_zeros(())
    for i in range(q.shape[0]):
        tea = torch.stack([torch.exp(k[i] @ kq[j] / tk) for j in range(kq.shape[0])])
        stu = torch.stack([q[i] @ kq[j] / tq for j in range(kq.shape[0])])
        total = total - ((tea / tea.sum()) * (stu - torch.logsumexp(stu, 0))).sum()
    return total / q.shape[0]


# --------------------------------------------------------------------------------------------
# The losses against the references


@pytest.mark.parametrize("v,n,d,w_size,iters,eps", [(2, 8, 3, 8, 1, 0.0), (2, 12, 2, 5, 2, 0.0), (3, 9, 4, 4, 1, 1e-4), (2, 6, 8, 128, 1, 1e-2)])
def test_wmse_loss_matches_formula(v, n, d, w_size, iters, eps):
    """Sub-batches of exactly w_size, uneven ones (12 // 5 = 2 of 6), three views, and a batch
    smaller than w_size and than D (one shrunk sub-batch, the contract tests' case)."""
    z = _rand(v, n, d, seed=n + d)
    perms = torch.stack([torch.randperm(n, generator=torch.Generator().manual_seed(s)) for s in range(iters)])
    got = _grads(lambda x: WMSELoss(w_size, eps)(x.float(), perms), z)
    want = _grads(lambda x: ref_wmse(x, perms, w_size, eps), z)
    _close(got, want)


def test_whitening_is_the_cholesky_one():
    """The whitened rows have identity covariance, and W is lower-triangular (Cholesky, not ZCA):
    the first coordinate is the centred first input over its standard deviation."""
    x = _rand(40, 5, seed=1) @ _rand(5, 5, seed=2)
    w = whiten(x)
    wc = w - w.mean(0)
    torch.testing.assert_close(wc.T @ wc / 39, torch.eye(5, dtype=torch.float64))
    torch.testing.assert_close(w[:, 0], (x[:, 0] - x[:, 0].mean()) / x[:, 0].std())
    constant = _rand(6, 3, seed=3)
    constant[:, 1] = 2.0  # a dimension without variance: Cov is singular
    assert torch.isnan(whiten(constant)).all()  # without shrinkage: NaN (the trainer stops), no exception or host sync
    assert torch.isfinite(whiten(constant, eps=1e-4)).all()


@pytest.mark.parametrize("v,g,n,d,m,lambd", [(2, 2, 6, 3, 4, 0.05), (4, 4, 5, 2, 3, 0.02), (5, 2, 7, 4, 2, 0.5)])
def test_lejepa_loss_matches_formula(v, g, n, d, m, lambd):
    z = _rand(v, n, d, seed=v * n + d)
    a = _rand(d, m, seed=m)
    a = a / a.norm(dim=0)
    got = _grads(lambda x: LeJEPALoss(lambd, 17, 3.0)(x.float(), g, a.float())[0], z)
    want = _grads(lambda x: ref_lejepa(x, g, a, lambd, 17, 3.0), z)
    _close(got, want)


@pytest.mark.parametrize("n,d,k,tq,tk", [(4, 3, 5, 0.1, 0.04), (7, 6, 16, 0.1, 0.04), (3, 4, 9, 0.2, 0.07)])
def test_ressl_loss_matches_formula(n, d, k, tq, tk):
    q, key, queue = _rand(n, d, seed=n), _rand(n, d, seed=d), _rand(k, d, seed=k)
    queue = queue / queue.norm(dim=1, keepdim=True)
    got = _grads(lambda x: ReSSLLoss(tq, tk)(F.normalize(x, dim=1).float(), F.normalize(key, dim=1).float(), queue.float()), q)
    want = _grads(lambda x: ref_ressl(x, key, queue, tq, tk), q)
    _close(got, want)
    q_leaf, k_leaf = q.float().requires_grad_(True), key.float().requires_grad_(True)
    ReSSLLoss(tq, tk)(F.normalize(q_leaf, dim=1), F.normalize(k_leaf, dim=1), queue.float()).backward()
    assert q_leaf.grad is not None and k_leaf.grad is None  # the teacher's relation is a target


# --------------------------------------------------------------------------------------------
# The methods around their losses


def _tiny(name: str, **cfg: Any) -> Any:
    cls = get_method(name)
    torch.manual_seed(0)
    method = cls(create_backbone("resnet18", 16, channels=(8, 16, 32, 64)), cls.Config(**cfg))
    return method.train()


def _views(method: Any, b: int, seed: int = 0) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, 3, s.size, s.size, generator=g) for s in default_views(method, AugmentConfig(), 16)]


def test_wmse_whitens_sub_batches_drawn_from_the_samples_counter_based_uniforms():
    m = _tiny("wmse", proj_dim=4, proj_hidden_dim=16, w_size=6, w_iter=3)
    views = _views(m, 12)
    batch = make_batch(views, step=2, index=torch.arange(40, 52))
    loss, _ = m.training_step(batch)
    z = torch.stack(m.projector(torch.cat([m.encoder(x) for x in views])).chunk(2))
    perms = batch.uniform(0, 3).T.argsort(dim=1)
    torch.testing.assert_close(loss, WMSELoss(6, m.cfg.eps)(z, perms))
    # the split is a function of (seed, epoch, sample index): the halves' uniforms are the whole's
    halves = [Batch([v[s] for v in views], batch.index[s], batch.info).uniform(0, 3) for s in (slice(0, 6), slice(6, 12))]
    torch.testing.assert_close(torch.cat(halves), batch.uniform(0, 3))
    assert not torch.equal(perms[0], perms[1])  # each split is its own permutation


def test_lejepa_directions_depend_on_seed_and_step_only():
    a = slice_directions(step_info(5, seed=1), 8, 32, torch.device("cpu"))
    torch.manual_seed(99)  # torch's global random state plays no part
    assert torch.equal(a, slice_directions(step_info(5, seed=1), 8, 32, torch.device("cpu")))
    assert not torch.equal(a, slice_directions(step_info(6, seed=1), 8, 32, torch.device("cpu")))
    assert not torch.equal(a, slice_directions(step_info(5, seed=2), 8, 32, torch.device("cpu")))
    torch.testing.assert_close(a.norm(dim=0), torch.ones(32))


def test_lejepa_views_and_its_loss_on_the_methods_projections():
    m = _tiny("lejepa", local_views=2, local_crop_size=8, global_views=2, num_slices=8)
    specs = default_views(m, AugmentConfig(), 16)
    assert [s.size for s in specs] == [16, 16, 8, 8] and specs[2].aug.crop_scale == (0.05, 0.3)
    assert [s.size for s in default_views(_tiny("lejepa"), AugmentConfig(), 16)] == [16] * 4  # MINIMAL.md: V=4
    views = _views(m, 6)
    batch = make_batch(views, step=4)
    loss, logs = m.training_step(batch)
    h = [m.encoder(torch.cat(views[:2])), m.encoder(torch.cat(views[2:]))]
    z = torch.stack(m.projector(torch.cat(h)).chunk(4))
    want, terms = LeJEPALoss(m.cfg.lambd)(z, 2, slice_directions(batch.info, m.cfg.proj_dim, 8, z.device))
    torch.testing.assert_close(loss, want)
    assert set(logs) >= {"loss", "prediction", "sigreg"}


def test_ressl_teacher_sees_the_weak_view_and_keys_enter_the_queue_after_the_loss():
    m = _tiny("ressl", queue_size=8, proj_dim=4, proj_hidden_dim=16)
    strong, weak = (s.aug for s in default_views(m, AugmentConfig(), 16))
    assert strong == AugmentConfig()
    assert (weak.jitter_p, weak.grayscale_p, weak.blur_p, weak.solarize_p) == (0, 0, 0, 0)
    assert (weak.crop_scale, weak.flip_p) == (strong.crop_scale, strong.flip_p)
    views = _views(m, 5)
    before = m.bank.rows.clone()
    loss, _ = m.training_step(make_batch(views))
    q = F.normalize(m.projector(m.encoder(views[0])), dim=1)
    k = F.normalize(m.momentum_projector(m.momentum_encoder(views[1])), dim=1)
    torch.testing.assert_close(loss, ReSSLLoss()(q, k, before))
    torch.testing.assert_close(m.bank.rows[:5], k.detach())  # the keys, in the oldest rows
    assert torch.equal(m.bank.rows[5:], before[5:]) and int(m.bank.ptr) == 5
    assert m.momentum_at(step_info(0, 10)) == pytest.approx(0.99) and m.momentum_at(step_info(10, 10)) == pytest.approx(1.0)


# --------------------------------------------------------------------------------------------
# One step on two gloo processes against one

STEP_SETS: dict[str, dict[str, Any]] = {
    "wmse": {"proj_dim": 4, "proj_hidden_dim": 32, "w_size": 8, "w_iter": 2},  # 2 sub-batches of 8, 2 splits
    "lejepa": {"proj_dim": 8, "proj_hidden_dim": 32, "global_views": 2, "local_views": 2, "local_crop_size": 8, "num_slices": 16},
    "ressl": {"proj_dim": 8, "proj_hidden_dim": 32, "queue_size": 12},  # 16 keys pushed into 12 rows: wraps
}
BATCH = 16


def _step(name: str, rank: int, world: int) -> dict[str, Any]:
    """One training step of ``name`` (STEP_SETS) on this process's share of a fixed global batch:
    the loss, the parameters' gradients and the buffers after the step."""
    m = sdist.convert_sync_batchnorm(_tiny(name, **STEP_SETS[name]))
    views = _views(m, BATCH, seed=5)
    share = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    batch = Batch([v[share] for v in views], torch.arange(100, 100 + BATCH)[share], step_info(3, seed=7))
    loss, _ = m.training_step(batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    return {"loss": loss.detach(), "grads": grads, "buffers": {n: b.clone() for n, b in m.named_buffers()}}


def _step_worker(rank: int, port: int, out: Path) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=300))
    try:
        torch.save({name: _step(name, rank, WORLD) for name in WAVE}, out / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_one_step_on_two_processes_equals_one(tmp_path):
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
            [sys.executable, __file__, "--step-worker", str(r), str(port), str(tmp_path)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(WORLD)
    ]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    for name in WAVE:
        one = _step(name, 0, 1)
        # DDP's convention: the mean of the processes' losses and of their gradients is one process's
        torch.testing.assert_close(sum(r[name]["loss"] for r in ranks) / WORLD, one["loss"], rtol=1e-5, atol=1e-6, msg=name)
        assert all(r[name]["grads"].keys() == one["grads"].keys() for r in ranks)
        for key, g in one["grads"].items():
            both = sum(r[name]["grads"][key] for r in ranks) / WORLD
            torch.testing.assert_close(both, g, rtol=1e-4, atol=1e-5 * max(g.abs().max().item(), 1e-2), msg=f"{name}: gradient of {key}")
        for key, b in one["buffers"].items():  # BatchNorm statistics (global), the queue (gathered)
            for r in ranks:
                torch.testing.assert_close(r[name]["buffers"][key], b, rtol=1e-5, atol=1e-6, msg=f"{name}: buffer {key}")


# --------------------------------------------------------------------------------------------
# Kill and resume

RESUME_SETS = {"wmse": ["w_size=8", "w_iter=2"], "lejepa": [], "ressl": ["queue_size=32"]}


def _args(data: Path, method: str, out: Path) -> list[str]:
    args = ["train", "--method", method, "--data", f"imagefolder:{data}", "--steps", "6", *TINY, "--output", str(out)]
    for s in ("deterministic=true", "checkpoint_every=2", "log_every=1", "quick_knn=false", *RESUME_SETS[method]):
        args += ["--set", s]
    return args


@pytest.mark.slow
def test_a_killed_and_resumed_run_of_each_method_equals_an_unbroken_one(tmp_path):
    """64 images, batch 16, 6 steps; killed after step 3, resumed from the checkpoint of step 2:
    W-MSE's splits (2 sub-batches of 8, 2 splits a step) and LeJEPA's directions are drawn again
    from (seed, epoch, index) and (seed, step), ReSSL's queue (32 rows, wrapping at step 2) and
    momentum encoder come back with the checkpoint."""
    data = make_image_folder(tmp_path / "data")
    env = child_env(tmp_path / "cache")
    children = {}
    for m in WAVE:
        children[m, "ref"] = fork_cli(_args(data, m, tmp_path / f"{m}-ref"), env)
        children[m, "killed"] = fork_cli(_args(data, m, tmp_path / f"{m}-killed"), {**env, "SSLBENCH_TEST_KILL_AT": "step:3"})
    for (_, kind), child in children.items():
        res = child.wait()
        assert res.returncode == (0 if kind == "ref" else -9), res.describe()
    resumed = {m: fork_cli(["train", "--output", str(tmp_path / f"{m}-killed"), "--resume", "--quiet"], env) for m in WAVE}
    for m, child in resumed.items():
        res = child.wait()
        assert res.returncode == 0 and "from step 2" in res.stderr, res.describe()
        assert_same_weights(tmp_path / f"{m}-ref", tmp_path / f"{m}-killed")


def test_configs_reject_bad_values():
    from sslbench.core.errors import UserError

    bad = {
        "wmse": [{"w_size": 1}, {"eps": 1.0}, {"num_views": 1}],
        "lejepa": [{"lambd": 1.5}, {"knots": 1}, {"local_crop_scale": (0.5, 0.2)}],
        "ressl": [{"temperature_k": 0.0}, {"queue_size": 0}, {"base_momentum": 1.5}],
    }
    for name, changes in bad.items():
        for change in changes:
            with pytest.raises(UserError):
                get_method(name).Config(**change).validate()
    assert math.isclose(get_method("lejepa").Config().lambd, 0.02)


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "--step-worker":
    torch.set_num_threads(1)
    _step_worker(int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
