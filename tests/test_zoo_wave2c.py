"""The zoo's second wave, part c (issue 29): DeepCluster v2 and All4One.

- Each loss equals an independent float64 implementation of the official formula, value and
  gradient, on random inputs: DeepCluster v2's cross-entropy of the prototype scores against the
  cluster of each sample, head by head; All4One's three terms one row and one correlation entry at
  a time, with the positional table written out entry by entry.
- The spherical k-means equals a float64 loop of the official ``cluster_memory`` from the same
  initial rows, and recovers well-separated clusters as scikit-learn's KMeans does.
- The methods use them as the codes do: DeepCluster v2 clusters its bank at an epoch's first step
  (centroids become the prototypes, assignments the targets, the bank empties), and fills it with
  every sample's projections and index; All4One's neighbours come from the support set before the
  step, and the momentum projections enter it after.
- One training step of each method split over 2 gloo processes with synchronised BatchNorm computes
  the loss, the gradients and the buffers of one process (DeepCluster v2 across an epoch boundary,
  so the k-means runs on the gathered bank).
- A killed and resumed run of each method ends with the weights and buffers of an unbroken one
  (DeepCluster v2's resumed part crosses an epoch boundary and clusters).

Through the whole trainer at the methods' defaults: tests/test_multiprocess.py,
tests/test_methods_contract.py, tests/test_testing_kit.py, tests/test_resume.py (parametrised
over the registry).
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
from _steps import info as step_info
from torch import Tensor

from sslbench.backbones import create_backbone
from sslbench.core import dist as sdist
from sslbench.core.augment import AugmentConfig
from sslbench.core.method import Batch, default_views
from sslbench.core.registry import get_method
from sslbench.methods.all4one import All4OneLoss, slot_encoding
from sslbench.methods.deepclusterv2 import deepcluster_loss, spherical_kmeans

WAVE = ["deepclusterv2", "all4one"]
WORLD = 2


def _rand(*shape: int, seed: int) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _grads(fn: Any, *xs: Tensor) -> tuple[Tensor, list[Tensor]]:
    leaves = [x.detach().clone().requires_grad_(True) for x in xs]
    out = fn(*leaves)
    return out.detach(), list(torch.autograd.grad(out, leaves))


def _close(got: tuple[Tensor, list[Tensor]], want: tuple[Tensor, list[Tensor]]) -> None:
    """The losses compute in float32: values to 1e-5 relative, gradients to 1e-4."""
    torch.testing.assert_close(got[0].double(), want[0], rtol=1e-5, atol=1e-6)
    for g, w in zip(got[1], want[1]):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Independent float64 references, from the official formulas


def ref_deepcluster(scores: list[Tensor], targets: Tensor, tau: float) -> Tensor:
    """``main_deepclusterv2.py``: per head, ``CrossEntropyLoss(scores / tau, targets repeated
    over the crops)``, then the mean over heads; one row at a time."""
    n = targets.shape[1]
    total = scores[0].new_zeros(())
    for h, s in enumerate(scores):
        rows = [-(s[r, int(targets[h, r % n])] / tau - torch.logsumexp(s[r] / tau, 0)) for r in range(s.shape[0])]
        total = total + torch.stack(rows).mean()
    return total / len(scores)


def ref_row_contrast(a: Tensor, b: Tensor, tau: float) -> Tensor:
    """solo-learn's ``nnclr_loss_func``: the cross-entropy of row i of unit a against every unit b, label i."""
    a, b = a / a.norm(dim=1, keepdim=True), b / b.norm(dim=1, keepdim=True)
    terms = []
    for i in range(a.shape[0]):
        logits = torch.stack([a[i] @ b[k] / tau for k in range(b.shape[0])])
        terms.append(torch.logsumexp(logits, 0) - logits[i])
    return torch.stack(terms).mean()


def ref_all4one(nn1, nn2, p1, p2, c1, c2, s1, s2, m1, m2, z1, z2, tau, tau_c, w):  # type: ignore[no-untyped-def]
    """solo-learn's ``All4One.training_step``: ``0.5 att + 0.5 nnclr + 0.5 * w * (on + off) / 2``."""
    nnclr = (ref_row_contrast(nn1, p2, tau) + ref_row_contrast(nn2, p1, tau)) / 2
    att = (ref_row_contrast(c1, s2, tau_c) + ref_row_contrast(c2, s1, tau_c)) / 2
    d = z1.shape[1]

    def corr(m: Tensor, z: Tensor) -> list[list[Tensor]]:
        mn = [m[:, j] / m[:, j].norm() for j in range(d)]
        zn = [z[:, j] / z[:, j].norm() for j in range(d)]
        return [[mn[j] @ zn[k] for k in range(d)] for j in range(d)]

    r1, r2 = corr(m1, z2), corr(m2, z1)
    on = sum(((r[j][j] - 1) ** 2 for r in (r1, r2) for j in range(d)), z1.new_zeros(())) / (2 * d)
    off = sum((r[j][k] ** 2 for r in (r1, r2) for j in range(d) for k in range(d) if j != k), z1.new_zeros(())) / (2 * d * (d - 1))
    return 0.5 * att + 0.5 * nnclr + 0.5 * w * (on.sqrt() + off.sqrt()) / 2


def ref_kmeans(x: Tensor, init: list[int], iters: int) -> tuple[Tensor, list[int]]:
    """``cluster_memory``: E step (largest dot product), M step (the normalised mean of each
    non-empty cluster's rows, one row at a time), ``iters`` times, then a final E step."""
    cent = [x[i].clone() for i in init]
    for it in range(iters + 1):
        assign = [max(range(len(cent)), key=lambda c: float(x[r] @ cent[c])) for r in range(x.shape[0])]
        if it == iters:
            return torch.stack(cent), assign
        for c in range(len(cent)):
            rows = [x[r] for r in range(x.shape[0]) if assign[r] == c]
            if rows:
                mean = torch.stack(rows).sum(0) / len(rows)
                cent[c] = mean / mean.norm()
    raise AssertionError


# --------------------------------------------------------------------------------------------
# The losses and the k-means against the references


@pytest.mark.parametrize("v,n,ks,tau", [(2, 5, (4,), 0.1), (2, 7, (3, 6, 5), 0.1), (3, 4, (8, 2), 0.5)])
def test_deepcluster_loss_matches_formula(v, n, ks, tau):
    z = _rand(v * n, 6, seed=n)
    protos = [F.normalize(_rand(k, 6, seed=k), dim=1) for k in ks]
    targets = torch.stack([torch.randint(0, k, (n,), generator=torch.Generator().manual_seed(k + 1)) for k in ks])
    got = _grads(lambda x: deepcluster_loss([x.float() @ p.float().T for p in protos], targets, tau), z)
    want = _grads(lambda x: ref_deepcluster([x @ p.T for p in protos], targets, tau), z)
    _close(got, want)


@pytest.mark.parametrize("n,d", [(4, 8), (6, 16)])
def test_all4one_loss_matches_formula(n, d):
    xs = [_rand(n, d, seed=10 * n + i) for i in range(12)]
    xs[8], xs[9] = F.normalize(xs[8], dim=1), F.normalize(xs[9], dim=1)  # momentum projections: unit rows, no gradient

    def ours(*t: Tensor) -> Tensor:
        return All4OneLoss(0.2, 0.1, 10.0)(*(x.float() for x in t))[0]

    got = _grads(ours, *xs)
    want = _grads(lambda *t: ref_all4one(*t, 0.2, 0.1, 10.0), *xs)
    _close(got, want)


def test_slot_encoding_is_the_permuted_sinusoid():
    """``[s, d] = sin(d f_{s//2})`` (s even), ``cos(d f_{s//2})`` (s odd), ``f_i = 10000^(-2i/6)`` for 5 slots."""
    table = slot_encoding(5, 7)
    for s in range(5):
        for d in range(7):
            f = 10000 ** (-2 * (s // 2) / 6)
            want = math.sin(d * f) if s % 2 == 0 else math.cos(d * f)
            assert table[s, d].item() == pytest.approx(want, abs=1e-6)


def test_kmeans_matches_the_official_loop_and_recovers_separated_clusters():
    x = F.normalize(_rand(40, 5, seed=3), dim=1)
    g = torch.Generator().manual_seed(7)
    init = torch.randperm(40, generator=torch.Generator().manual_seed(7))[:6].tolist()
    cent, assign = spherical_kmeans(x, 6, 4, g)
    want_cent, want_assign = ref_kmeans(x, init, 4)
    assert assign.tolist() == want_assign
    torch.testing.assert_close(cent, want_cent)
    # more centroids than rows: the permutation cycles, duplicates stay empty
    few = spherical_kmeans(x[:3], 5, 2, torch.Generator().manual_seed(0))[1]
    assert sorted(few.tolist()) == [0, 1, 2]  # each row its own centroid (first of equal ones)

    # three tight blobs on the sphere: the partition is the blobs', as scikit-learn's KMeans finds
    sklearn = pytest.importorskip("sklearn.cluster")
    centres = torch.eye(3, 6, dtype=torch.float64)
    pts = F.normalize(centres.repeat_interleave(10, 0) + 0.05 * _rand(30, 6, seed=4), dim=1)
    truth = torch.arange(3).repeat_interleave(10)
    ours = spherical_kmeans(pts, 3, 10, torch.Generator().manual_seed(1))[1]
    theirs = torch.as_tensor(sklearn.KMeans(3, n_init=10, random_state=0).fit_predict(pts.numpy()))
    for labels in (ours, theirs):
        pairs = labels[:, None] == labels[None, :]
        assert torch.equal(pairs, truth[:, None] == truth[None, :])


# --------------------------------------------------------------------------------------------
# The methods around their losses


def _tiny(name: str, **cfg: Any) -> Any:
    cls = get_method(name)
    torch.manual_seed(0)
    return cls(create_backbone("resnet18", 16, channels=(8, 16, 32, 64)), cls.Config(**cfg)).train()


def _views(method: Any, b: int, seed: int = 0) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, 3, s.size, s.size, generator=g) for s in default_views(method, AugmentConfig(), 16)]


def _batch(views: list[Tensor], index: Tensor, step: int, spe: int, seed: int = 0) -> Batch:
    return Batch(views, index, step_info(step, 100, steps_per_epoch=spe, seed=seed))


DC = {"num_prototypes": (3, 5), "proj_dim": 8, "proj_hidden_dim": 16, "memory_size": 24, "kmeans_iters": 3}


def test_deepcluster_clusters_its_bank_at_an_epochs_first_step():
    m = _tiny("deepclusterv2", **DC)
    first = _views(m, 12, seed=1)
    m.training_step(_batch(first, torch.arange(100, 112), step=1, spe=2))  # epoch 0: fills the bank
    z = [F.normalize(m.projector(m.encoder(x)), dim=1).detach() for x in first]
    assert torch.equal(m.memory_index[:12], torch.arange(100, 112)) and int(m.bank.ptr) == 12
    torch.testing.assert_close(m.bank.rows[:12], torch.cat(z, dim=1))
    bank = m.bank.rows[:12].clone()
    views = _views(m, 6, seed=2)
    index = torch.tensor([103, 100, 111, 105, 200, 107])  # 200 was never in the bank
    loss, _ = m.training_step(_batch(views, index, step=2, spe=2, seed=5))  # epoch 1: clusters first
    protos = []
    for h, k in enumerate((3, 5)):
        g = torch.Generator().manual_seed(((5 * 1_000_003 + 1) * 101 + h) % (1 << 63))
        c, a = spherical_kmeans(bank.chunk(2, dim=1)[h % 2], k, 3, g)
        protos.append(c)
        assert torch.equal(m.assignments[h, :12], a)  # the bank's rows are in index order already
    torch.testing.assert_close(m.centroids, torch.cat(protos))
    z2 = [F.normalize(m.projector(m.encoder(x)), dim=1) for x in views]
    rows = torch.tensor([3, 0, 11, 5, 0, 7])
    targets = torch.stack([m.assignments[h, rows] for h in range(2)])
    targets[:, 4] = torch.stack([(z2[h % 2][4].detach() @ p.T).argmax() for h, p in enumerate(protos)])  # unseen: nearest centroid
    want = deepcluster_loss([torch.cat(z2) @ p.T for p in protos], targets, m.cfg.temperature)
    torch.testing.assert_close(loss, want)
    assert torch.equal(m.memory_index[:6], index) and (m.memory_index[6:] == -1).all()  # emptied, then this step's


def test_all4one_neighbours_come_from_the_support_set_before_the_step():
    m = _tiny("all4one", proj_dim=8, proj_hidden_dim=16, pred_hidden_dim=16, queue_size=10, transformer_layers=1)
    views = _views(m, 6)
    before = m.bank.rows.clone()
    loss, logs = m.training_step(_batch(views, torch.arange(6), step=0, spe=10))
    with torch.no_grad():
        m1, m2 = (F.normalize(m.momentum_projector(m.momentum_encoder(x)), dim=1) for x in views)
    z1, z2 = (m.projector(m.encoder(x)) for x in views)
    nn1, nn2 = (before[(mm @ before.T).argsort(dim=1, descending=True)[:, :5]] for mm in (m1, m2))
    s1 = torch.cat([m.predictor2(z1)[:, None], nn1[:, :4]], 1)
    s2 = torch.cat([m.predictor2(z2)[:, None], nn2[:, :4]], 1)
    tok = [m.transformer(s + m.slots)[:, 0] for s in (nn1, nn2, s1, s2)]
    want, _ = All4OneLoss(0.2, 0.1, 10.0)(nn1[:, 0], nn2[:, 0], m.predictor(z1), m.predictor(z2), *tok, m1, m2, z1, z2)
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(m.bank.rows[:6], m1)  # the momentum projections of view 1, after the loss
    assert set(logs) >= {"loss", "nnclr", "centroid", "feature"}
    groups = m.param_groups([{"params": list(m.parameters())}])
    scales = {id(p): g.get("lr_scale", 1.0) for g in groups for p in g["params"]}
    assert all(scales[id(p)] == 0.1 for p in m.transformer.parameters()) and scales[id(m.predictor2[0].weight)] == 1.0


# --------------------------------------------------------------------------------------------
# One step on two gloo processes against one

STEP_SETS: dict[str, dict[str, Any]] = {
    "deepclusterv2": DC | {"memory_size": 20},  # 16 rows of epoch 0, then k-means at epoch 1's first step
    "all4one": {"proj_dim": 8, "proj_hidden_dim": 32, "pred_hidden_dim": 32, "queue_size": 12, "transformer_layers": 2},
}
BATCH = 16


def _step(name: str, rank: int, world: int) -> dict[str, Any]:
    """A step of epoch 0 (fills the bank), then the first step of epoch 1, on this process's share
    of fixed global batches: the second step's loss and gradients, the buffers after it."""
    m = sdist.convert_sync_batchnorm(_tiny(name, **STEP_SETS[name]))
    share = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    for step in (1, 2):
        views = _views(m, BATCH, seed=5 + step)
        index = torch.randperm(40, generator=torch.Generator().manual_seed(step))[:BATCH]
        m.zero_grad()
        loss, _ = m.training_step(Batch([v[share] for v in views], index[share], step_info(step, 10, steps_per_epoch=2, seed=7)))
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
        torch.testing.assert_close(sum(r[name]["loss"] for r in ranks) / WORLD, one["loss"], rtol=1e-5, atol=1e-6, msg=name)
        assert all(r[name]["grads"].keys() == one["grads"].keys() for r in ranks)
        for key, g in one["grads"].items():
            both = sum(r[name]["grads"][key] for r in ranks) / WORLD
            torch.testing.assert_close(both, g, rtol=1e-4, atol=1e-5 * max(g.abs().max().item(), 1e-2), msg=f"{name}: gradient of {key}")
        for key, b in one["buffers"].items():  # BatchNorm statistics, the banks, centroids and assignments
            for r in ranks:
                torch.testing.assert_close(r[name]["buffers"][key], b, rtol=1e-5, atol=1e-6, msg=f"{name}: buffer {key}")
    assert (ranks[0]["deepclusterv2"]["buffers"]["assignments"] > 0).any()  # the k-means ran


# --------------------------------------------------------------------------------------------
# Kill and resume

RESUME_SETS = {
    "deepclusterv2": ["num_prototypes=4,6", "memory_size=80", "proj_dim=16", "proj_hidden_dim=32"],
    "all4one": ["queue_size=32", "proj_dim=16", "proj_hidden_dim=32", "pred_hidden_dim=32", "transformer_layers=1"],
}


def _args(data: Path, method: str, out: Path) -> list[str]:
    args = ["train", "--method", method, "--data", f"imagefolder:{data}", "--steps", "6", *TINY, "--output", str(out)]
    for s in ("deterministic=true", "checkpoint_every=2", "log_every=1", "quick_knn=false", *RESUME_SETS[method]):
        args += ["--set", s]
    return args


@pytest.mark.slow
def test_a_killed_and_resumed_run_of_each_method_equals_an_unbroken_one(tmp_path):
    """64 images, batch 16 (4 steps an epoch), 6 steps; killed after step 3, resumed from the
    checkpoint of step 2: DeepCluster v2's bank comes back and the resumed part clusters it at
    step 4; All4One's support set and momentum networks come back."""
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
        "deepclusterv2": [{"num_prototypes": ()}, {"num_prototypes": (3, 0)}, {"temperature": 0.0}, {"memory_size": 0}],
        "all4one": [{"proj_dim": 12}, {"queue_size": 4}, {"transformer_lr_scale": 0.0}, {"base_momentum": 1.5}],
    }
    for name, changes in bad.items():
        for change in changes:
            with pytest.raises(UserError):
                get_method(name).Config(**change).validate()


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "--step-worker":
    torch.set_num_threads(1)
    _step_worker(int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
