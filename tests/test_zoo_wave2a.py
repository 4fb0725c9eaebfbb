"""The zoo's second wave, part one (issue 29): DCL and DCLW, TiCo, MMCR.

- Each loss equals an independent float64 implementation of its paper's formula, written below one
  sample (or one pair) at a time (value and gradient, random inputs, several shapes); the same
  comparison rejects deliberately wrong losses (NT-Xent for DCL, DCLW's weight without its batch
  mean, TiCo with last step's covariance, MMCR without the view average).
- TiCo's covariance follows its recursion over steps, moves once per optimizer step (not per
  forward: the gradient cache computes a step twice) and lives in the method's buffers.
- On two processes (gloo) each loss computes what one computes: DDP's mean of the processes'
  losses and their input gradients, TiCo's covariance on every process.
- A killed and resumed run of each method ends with the weights (and TiCo's covariance) of an
  unbroken one.

Two processes through the whole trainer: tests/test_multiprocess.py (parametrised over the
registry); no collapse: tests/test_no_collapse.py; the contract, host syncs, ViTs, gradient
cache: the registry-parametrised tests.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
from _reliability import TINY, assert_same_weights, child_env, fork_cli, make_image_folder
from _steps import batch as make_batch
from _steps import info as step_info
from torch import Tensor

from sslbench.core import dist as sdist
from sslbench.core.losses import DCLLoss, NTXentLoss
from sslbench.core.registry import get_method
from sslbench.methods.mmcr import MMCRLoss
from sslbench.methods.tico import TiCoLoss

WAVE = ["dcl", "dclw", "tico", "mmcr"]
WORLD = 2


def _rand(*shape: int, seed: int) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _grads(fn: Any, *xs: Tensor) -> tuple[Tensor, list[Tensor]]:
    """Value and gradients of the scalar ``fn`` at fresh leaf copies of ``xs``."""
    leaves = [x.detach().clone().requires_grad_(True) for x in xs]
    out = fn(*leaves)
    return out.detach(), list(torch.autograd.grad(out, leaves))


def _close(got: tuple[Tensor, list[Tensor]], want: tuple[Tensor, list[Tensor]]) -> None:
    """float64 in, float64 out: values and gradients to 1e-9 relative."""
    torch.testing.assert_close(got[0], want[0], rtol=1e-9, atol=1e-12)
    for g, w in zip(got[1], want[1]):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)


def _unit(v: Tensor) -> Tensor:
    return v / torch.sqrt((v * v).sum())


# --------------------------------------------------------------------------------------------
# Independent float64 references, written from the papers' formulas


def ref_dcl(z1: Tensor, z2: Tensor, tau: float, sigma: float | None = None, *, weight_mean: bool = True) -> Tensor:
    """Yeh et al. 2022, Eq. 6, one anchor at a time: for image i and view k,
    ``-w_i <u_i^1, u_i^2> / tau + log sum_{l, j != i} exp(<u_i^k, u_j^l> / tau)``, averaged over the
    2N anchors; ``w_i = 1`` (DCL) or ``2 - exp(s_i / sigma) / mean_j exp(s_j / sigma)`` with the
    positive similarities s taken as constants (DCLW). ``weight_mean=False`` drops the weight's
    batch mean (a wrong DCLW)."""
    n = z1.shape[0]
    u = [[_unit(z1[i]) for i in range(n)], [_unit(z2[i]) for i in range(n)]]
    s = [float((u[0][i] * u[1][i]).sum().detach()) for i in range(n)]
    total = torch.zeros((), dtype=torch.float64)
    for i in range(n):
        if sigma is None:
            w = 1.0
        else:
            mean = sum(torch.exp(torch.tensor(s[j] / sigma, dtype=torch.float64)) for j in range(n)) / (n if weight_mean else 1)
            w = 2 - torch.exp(torch.tensor(s[i] / sigma, dtype=torch.float64)) / mean
        for k in range(2):
            pos = (u[0][i] * u[1][i]).sum() / tau
            neg = sum(torch.exp((u[k][i] * u[m][j]).sum() / tau) for m in range(2) for j in range(n) if j != i)
            total = total - w * pos + torch.log(neg)
    return total / (2 * n)


def ref_tico(za: Tensor, zb: Tensor, c_prev: Tensor, beta: float, rho: float, *, use_prev: bool = False) -> tuple[Tensor, Tensor]:
    """Zhu et al. 2022 (as lightly's TiCoLoss computes it), sample by sample: the new
    covariance ``C = beta C_prev + (1 - beta) (1/N) sum_i a_i a_i^T`` (a constant) and the loss
    ``-(1/N) sum_i <a_i, b_i> + rho (1/N) sum_i a_i^T C a_i`` of the unit rows. ``use_prev``: the
    contrast against C_prev (a wrong TiCo)."""
    n, d = za.shape
    a = [_unit(za[i]) for i in range(n)]
    b = [_unit(zb[i]) for i in range(n)]
    second = torch.zeros(d, d, dtype=torch.float64)
    for i in range(n):
        ai = a[i].detach()
        second = second + torch.outer(ai, ai) / n
    c = beta * c_prev + (1 - beta) * second
    cc = c_prev if use_prev else c
    loss = sum(-(a[i] * b[i]).sum() / n + rho * (a[i] @ cc @ a[i]) / n for i in range(n))
    return loss, c


def _nuclear(m: Tensor) -> Tensor:
    """Sum of singular values as the sum of square roots of the eigenvalues of the smaller Gram
    matrix (no SVD)."""
    gram = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m
    return torch.sqrt(torch.linalg.eigvalsh(gram)).sum()


def ref_mmcr(z: Tensor, lambd: float, *, average: bool = True) -> Tensor:
    """Yerxa et al. 2023 with the official code's local term: ``-||C||_* + lambda (1/N) sum_i
    ||Z_i||_*``, C the rows ``c_i = (1/k) sum_v u_iv`` of unit views. ``average=False``: centroids
    of the raw (unnormalised) views (a wrong MMCR)."""
    n, k, _ = z.shape
    views = [[_unit(z[i, v]) if average else z[i, v] for v in range(k)] for i in range(n)]
    centroids = torch.stack([sum(views[i]) / k for i in range(n)])
    local = sum(_nuclear(torch.stack(views[i])) for i in range(n)) / n
    return -_nuclear(centroids) + lambd * local


# --------------------------------------------------------------------------------------------
# The losses against the references


@pytest.mark.parametrize(("n", "d", "tau"), [(2, 3, 0.1), (5, 4, 0.5), (9, 6, 0.2), (16, 8, 0.1)])
@pytest.mark.parametrize("sigma", [None, 0.5, 1.3])
def test_dcl_loss_matches_formula(n, d, tau, sigma):
    z1, z2 = _rand(n, d, seed=n), _rand(n, d, seed=n + 100)
    _close(_grads(DCLLoss(tau, sigma), z1, z2), _grads(lambda a, b: ref_dcl(a, b, tau, sigma), z1, z2))


def test_dclw_weights_average_to_one_and_favour_hard_positives():
    z1, z2 = _rand(10, 5, seed=1), _rand(10, 5, seed=2)
    u1, u2 = torch.nn.functional.normalize(z1, dim=1), torch.nn.functional.normalize(z2, dim=1)
    w = DCLLoss(0.1, 0.5).weights(u1, u2)
    torch.testing.assert_close(w.mean(), torch.ones((), dtype=torch.float64))
    s = (u1 * u2).sum(dim=1)
    assert torch.equal(w.argsort(), (-s).argsort())  # the less similar the pair, the larger its weight


@pytest.mark.parametrize(("n", "d", "rho"), [(2, 3, 8.0), (7, 5, 8.0), (12, 4, 2.5)])
def test_tico_loss_matches_formula(n, d, rho):
    za, zb, c_prev = _rand(n, d, seed=n), _rand(n, d, seed=n + 1), _rand(d, d, seed=n + 2)
    c_prev = c_prev @ c_prev.T / d  # a symmetric PSD previous covariance
    loss = TiCoLoss(d, 0.9, rho).double()
    loss.covariance.copy_(c_prev)
    _close(_grads(lambda a, b: loss(a, b)[0], za, zb), _grads(lambda a, b: ref_tico(a, b, c_prev, 0.9, rho)[0], za, zb))
    torch.testing.assert_close(loss.pending, ref_tico(za, zb, c_prev, 0.9, rho)[1], rtol=1e-12, atol=1e-14)


def test_tico_covariance_follows_its_recursion_once_per_committed_step():
    """Three steps from C_0 = 0: each forward computes C_t from the committed C_{t-1}; forwarding
    a step twice (the gradient cache) changes nothing; only commit_ moves the buffer."""
    d, beta, rho = 4, 0.9, 8.0
    loss = TiCoLoss(d, beta, rho).double()
    c = torch.zeros(d, d, dtype=torch.float64)
    for t in range(3):
        za, zb = _rand(6, d, seed=10 + t), _rand(6, d, seed=20 + t)
        want, c_new = ref_tico(za, zb, c, beta, rho)
        before = loss.covariance.clone()
        first, _ = loss(za, zb)
        again, _ = loss(za, zb)
        assert torch.equal(first, again) and torch.equal(loss.covariance, before)
        torch.testing.assert_close(first, want, rtol=1e-12, atol=1e-14)
        loss.commit_()
        c = c_new
        torch.testing.assert_close(loss.covariance, c, rtol=1e-12, atol=1e-14)
    loss.commit_()  # nothing pending: a no-op
    torch.testing.assert_close(loss.covariance, c, rtol=1e-12, atol=1e-14)


def test_tico_method_commits_its_covariance_after_the_optimizer_step_and_saves_it():
    m = get_method("tico")(_tiny(), get_method("tico").Config(proj_dim=16, proj_hidden_dim=32))
    m.train()
    g = torch.Generator().manual_seed(0)
    views = [torch.randn(4, 3, 16, 16, generator=g) for _ in range(2)]
    assert "criterion.covariance" in m.state_dict() and not m.criterion.covariance.any()
    m.training_step(make_batch(views))
    assert not m.criterion.covariance.any()  # pending until the step is applied
    pending = m.criterion.pending.clone()
    m.after_optimizer_step(step_info(0, 10))
    assert torch.equal(m.criterion.covariance, pending) and m.criterion.pending is None
    assert torch.allclose(m.criterion.covariance.trace(), torch.tensor(0.1))  # (1 - beta) trace of unit rows' second moment


@pytest.mark.parametrize(("n", "k", "d"), [(3, 2, 5), (6, 4, 4), (8, 3, 10), (5, 8, 3)])
@pytest.mark.parametrize("lambd", [0.0, 0.005, 0.3])
def test_mmcr_loss_matches_formula(n, k, d, lambd):
    z = _rand(n, k, d, seed=7 * n + k)
    _close(_grads(lambda x: MMCRLoss(lambd)(x)[0], z), _grads(lambda x: ref_mmcr(x, lambd), z))


def test_the_comparison_rejects_deliberately_wrong_losses():
    """Each reference tells its loss from a near miss: the comparison above would fail on these."""
    z1, z2 = _rand(6, 4, seed=1), _rand(6, 4, seed=2)
    wrong = [
        # NT-Xent: the positive pair in the denominator (the coupling DCL removes)
        (_grads(NTXentLoss(0.2), z1, z2), _grads(lambda a, b: ref_dcl(a, b, 0.2), z1, z2)),
        # DCLW's weight without the batch mean (a published implementation's slip)
        (_grads(DCLLoss(0.2, 0.5), z1, z2), _grads(lambda a, b: ref_dcl(a, b, 0.2, 0.5, weight_mean=False), z1, z2)),
        # DCL for DCLW
        (_grads(DCLLoss(0.2), z1, z2), _grads(lambda a, b: ref_dcl(a, b, 0.2, 0.5), z1, z2)),
    ]
    c_prev = _rand(4, 4, seed=3)
    c_prev = c_prev @ c_prev.T
    tico = TiCoLoss(4, 0.9, 8.0).double()
    tico.covariance.copy_(c_prev)
    wrong.append((_grads(lambda a, b: tico(a, b)[0], z1, z2), _grads(lambda a, b: ref_tico(a, b, c_prev, 0.9, 8.0, use_prev=True)[0], z1, z2)))
    z = _rand(5, 3, 4, seed=4)
    wrong.append((_grads(lambda x: MMCRLoss(0.0)(x)[0], z), _grads(lambda x: ref_mmcr(x, 0.0, average=False), z)))
    wrong.append((_grads(lambda x: MMCRLoss(0.0)(x)[0], z), _grads(lambda x: ref_mmcr(x, 0.1), z)))
    for got, want in wrong:
        with pytest.raises(AssertionError):
            _close(got, want)


def _tiny() -> torch.nn.Module:
    from sslbench.backbones import create_backbone

    return create_backbone("resnet18", 16, channels=(8, 16, 32, 64))


def test_mmcr_trains_on_its_views_in_one_backbone_pass():
    m = get_method("mmcr")(_tiny(), get_method("mmcr").Config(num_views=3))
    from sslbench.core.augment import AugmentConfig

    assert len(m.views(AugmentConfig(), 16)) == 3
    calls = []
    m.encoder.register_forward_hook(lambda mod, inp, out: calls.append(inp[0].shape[0]))
    loss, logs = m.training_step(make_batch([torch.randn(4, 3, 16, 16) for _ in range(3)]))
    assert calls == [12] and loss.ndim == 0
    torch.testing.assert_close(loss, -logs["centroid_nuclear_norm"])  # lambda 0: the centroids' term alone


@pytest.mark.parametrize(
    ("name", "change"),
    [
        ("dcl", {"temperature": 0.0}),
        ("dclw", {"sigma": -0.5}),
        ("tico", {"beta": 1.0}),
        ("tico", {"rho": -1.0}),
        ("tico", {"base_momentum": 1.5}),
        ("mmcr", {"num_views": 1}),
        ("mmcr", {"lambd": -0.1}),
    ],
)
def test_configs_reject_bad_values(name, change):
    from dataclasses import replace

    from sslbench.core.errors import UserError

    cfg = replace(get_method(name).Config(), **change)
    with pytest.raises(UserError, match=next(iter(change))):
        cfg.validate()


# --------------------------------------------------------------------------------------------
# The losses on two processes (gloo) against one


def _problem() -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(7)
    return {
        "z1": torch.randn(8, 6, generator=g),
        "z2": torch.randn(8, 6, generator=g),
        "views": torch.randn(8, 3, 6, generator=g),
        "cov": torch.randn(6, 6, generator=g) / 6,
    }


def _losses(x: dict[str, Tensor], sl: slice) -> dict[str, Any]:
    """Each loss on rows ``sl`` of the problem: its value and the gradients of those rows (and
    TiCo's new covariance)."""
    out: dict[str, Any] = {}
    tico = TiCoLoss(6, 0.9, 8.0)
    tico.covariance.copy_(x["cov"] @ x["cov"].T)
    fns = {
        "dcl": (("z1", "z2"), lambda a, b: DCLLoss(0.2)(a, b)),
        "dclw": (("z1", "z2"), lambda a, b: DCLLoss(0.2, 0.5)(a, b)),
        "tico": (("z1", "z2"), lambda a, b: tico(a, b)[0]),
        "mmcr": (("views",), lambda v: MMCRLoss(0.0)(v)[0]),
        "mmcr_local": (("views",), lambda v: MMCRLoss(0.3)(v)[0]),
    }
    for name, (keys, fn) in fns.items():
        leaves = [x[k][sl].clone().requires_grad_(True) for k in keys]
        loss = fn(*leaves)
        loss.backward()
        out[name] = (loss.detach(), {k: v.grad.clone() for k, v in zip(keys, leaves)})
    tico.commit_()
    out["tico_cov"] = tico.covariance.clone()
    return out


def _loss_worker(rank: int, port: int, out: Path) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=120))
    try:
        torch.save(_losses(_problem(), slice(4 * rank, 4 * rank + 4)), out / f"rank{rank}.pt")
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
    one = _losses(_problem(), slice(0, 8))
    for name in ("dcl", "dclw", "tico", "mmcr", "mmcr_local"):
        # DDP's convention: the processes' mean loss is the one-process loss, and each process's
        # input gradient divided by W is the one-process gradient of its rows
        torch.testing.assert_close(sum(r[name][0] for r in ranks) / WORLD, one[name][0], rtol=1e-5, atol=1e-6)
        for key, g in one[name][1].items():
            both = torch.cat([r[name][1][key] for r in ranks]) / WORLD
            torch.testing.assert_close(both, g, rtol=1e-4, atol=1e-6, msg=f"{name}: gradient of {key}")
    for r in ranks:  # every process holds the covariance of the global batch
        torch.testing.assert_close(r["tico_cov"], one["tico_cov"], rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------------------------
# Kill and resume: TiCo's covariance comes back with the weights

WAVE_SETS = {"mmcr": ["num_views=3"]}


def _wave_args(data: Path, method: str, out: Path) -> list[str]:
    args = ["train", "--method", method, "--data", f"imagefolder:{data}", "--steps", "6", *TINY, "--output", str(out)]
    for s in ("deterministic=true", "checkpoint_every=2", "log_every=1", "quick_knn=false", *WAVE_SETS.get(method, [])):
        args += ["--set", s]
    return args


@pytest.mark.slow
def test_a_killed_and_resumed_run_of_each_method_equals_an_unbroken_one(tmp_path):
    """64 images, batch 16: 4 steps an epoch, 6 steps. The kill after step 3 resumes from the
    checkpoint of step 2; TiCo's covariance of steps 0-1 must come back with it."""
    data = make_image_folder(tmp_path / "data")
    env = child_env(tmp_path / "cache")
    children = {}
    for m in WAVE:
        children[m, "ref"] = fork_cli(_wave_args(data, m, tmp_path / f"{m}-ref"), env)
        children[m, "killed"] = fork_cli(_wave_args(data, m, tmp_path / f"{m}-killed"), {**env, "SSLBENCH_TEST_KILL_AT": "step:3"})
    for (_, kind), child in children.items():
        res = child.wait()
        assert res.returncode == (0 if kind == "ref" else -9), res.describe()
    resumed = {m: fork_cli(["train", "--output", str(tmp_path / f"{m}-killed"), "--resume", "--quiet"], env) for m in WAVE}
    for m, child in resumed.items():
        res = child.wait()
        assert res.returncode == 0 and "from step 2" in res.stderr, res.describe()
        assert_same_weights(tmp_path / f"{m}-ref", tmp_path / f"{m}-killed")  # TiCo's covariance included
    from safetensors.torch import load_file

    cov = load_file(str(tmp_path / "tico-ref" / "method.safetensors"))["criterion.covariance"]
    assert cov.abs().sum() > 0  # it moved, so the comparison above covers it


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "--loss-worker":
    torch.set_num_threads(1)
    _loss_worker(int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
