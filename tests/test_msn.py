"""MSN and PMSN (methods/msn.py): the loss (me-max, with and without Sinkhorn, and PMSN's power-law
prior) against an independent float64 implementation of the official/lightly formulas, value and
gradient; the masked anchor through the student's blocks with only its kept patches; masks that are
a pure function of (seed, epoch, sample); a target encoder without gradient; the views, recipe,
momentum and parameter groups; a refused ResNet. 1 vs 2 processes, resume and the contract are the
registry-wide tests (tests/test_multiprocess.py, tests/test_resume.py, tests/test_methods_contract.py,
tests/test_testing_kit.py with ``-k msn``)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from _backbones import VIT, VIT_KWARGS
from _reliability import child_env, fork_cli, make_image_folder
from _steps import batch as make_batch
from safetensors.torch import load_file

from sslbench.backbones import create_backbone
from sslbench.commands.cli import main
from sslbench.config import TrainConfig
from sslbench.core.errors import UserError
from sslbench.core.method import Batch, StepInfo, default_views
from sslbench.core.optim import param_groups
from sslbench.methods.msn import MSN, MSNConfig, MSNLoss

SIZE = 32  # 4 px patches: an 8 x 8 grid of N = 64 patches
SMALL = {"hidden_dim": 32, "output_dim": 16, "num_prototypes": 12, "focal_views": 2}


def tiny_msn(**cfg) -> MSN:
    torch.manual_seed(0)
    return MSN(create_backbone(VIT, SIZE, **VIT_KWARGS), MSNConfig(**{**SMALL, **cfg}))


def info(step=0, epoch=0, seed=0, total=100):
    return StepInfo(step=step, epoch=epoch, steps_per_epoch=10, total_steps=total, progress=step / total, seed=seed)


# ---------------------------------------------------------------------------------------------
# The loss against the official formulas, written out in float64


def _official_sinkhorn(q, num_itr=3):
    """``distributed_sinkhorn`` of facebookresearch/msn src/losses.py, one process."""
    q = q.T.clone()
    b, k = q.shape[1], q.shape[0]
    q /= q.sum()
    for _ in range(num_itr):
        q /= q.sum(dim=1, keepdim=True)
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= b
    return (q * b).T


def _reference(anchors, targets, prototypes, tau=0.1, T=0.25, sinkhorn=False, lam=1.0, ent=0.0, prior=None):
    """The official ``init_msn_loss`` (snn with one-hot prototype labels, ``sharpen``, the
    cross-entropy ``mean(sum(log(probs ** -targets)))``, me-max ``-sum(log(avg ** -avg)) + log K``,
    entropy ``mean(sum(log(probs ** -probs)))``), or lightly's PMSN regulariser
    ``kl_div(log avg, P, reduction=sum)``, in float64."""
    k = prototypes.shape[0]
    labels = torch.eye(k, dtype=torch.float64)
    norm = torch.nn.functional.normalize
    probs = torch.softmax(norm(anchors) @ norm(prototypes).T / tau, dim=1) @ labels
    with torch.no_grad():
        t = torch.softmax(norm(targets) @ norm(prototypes).T / tau, dim=1) @ labels
        t = t ** (1.0 / T)
        t = t / t.sum(dim=1, keepdim=True)
        if sinkhorn:
            t = _official_sinkhorn(t)
        t = torch.cat([t] * (anchors.shape[0] // targets.shape[0]))
    loss = torch.mean(torch.sum(torch.log(probs ** (-t)), dim=1))
    avg = probs.mean(dim=0)
    if prior is None:
        reg = -torch.sum(torch.log(avg ** (-avg))) + math.log(k)
    else:
        p = torch.tensor([j**-prior for j in range(1, k + 1)], dtype=torch.float64)
        p = p / p.sum()
        reg = sum(p[j] * (math.log(p[j]) - torch.log(avg[j])) for j in range(k))
    return loss + lam * reg + ent * torch.mean(torch.sum(torch.log(probs ** (-probs)), dim=1))


@pytest.mark.parametrize(
    "cfg",
    [
        {"use_sinkhorn": False},
        {"use_sinkhorn": True},
        {"use_sinkhorn": True, "prior": "power_law"},
        {"use_sinkhorn": False, "prior": "power_law", "power_law_exponent": 0.5, "memax_weight": 3.0},
        {"use_sinkhorn": False, "ent_weight": 0.5, "temperature": 0.2, "sharpen": 0.5},
    ],
)
def test_the_loss_and_its_gradient_equal_the_official_formula_in_float64(cfg):
    g = torch.Generator().manual_seed(3)
    views, b, d, k = 3, 5, 8, 7
    a = torch.randn(views * b, d, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(b, d, generator=g, dtype=torch.float64)
    q = torch.randn(k, d, generator=g, dtype=torch.float64, requires_grad=True)
    c = MSNConfig(num_prototypes=k, **cfg)
    loss, _, _ = MSNLoss(c)(a, t, q)
    ga, gq = torch.autograd.grad(loss, [a, q])
    a2, q2 = a.detach().clone().requires_grad_(), q.detach().clone().requires_grad_()
    prior = c.power_law_exponent if c.prior == "power_law" else None
    ref = _reference(a2, t, q2, c.temperature, c.sharpen, c.use_sinkhorn, c.memax_weight, c.ent_weight, prior)
    ra, rq = torch.autograd.grad(ref, [a2, q2])
    # float64 throughout, except sslbench's Sinkhorn, which runs in float32
    tol = 1e-6 if c.use_sinkhorn else 1e-12
    assert loss.item() == pytest.approx(ref.item(), rel=tol)
    torch.testing.assert_close(ga, ra, rtol=tol, atol=tol)
    torch.testing.assert_close(gq, rq, rtol=tol, atol=tol)


def test_the_regularisers_are_zero_at_their_prior_and_positive_elsewhere():
    """me-max is KL(mean p || U): zero when the mean prediction is uniform; PMSN's KL(P || mean p) is
    not (the uniform mean is not the power law) and is smaller at the power law than at uniform."""
    k, d = 6, 6
    q = torch.eye(k, d, dtype=torch.float64)
    a = torch.eye(k, d, dtype=torch.float64)  # one anchor on each prototype: the mean prediction is uniform
    assert MSNLoss(MSNConfig(num_prototypes=k, use_sinkhorn=False))(a, a, q)[2]["reg"].item() == pytest.approx(0.0, abs=1e-12)
    assert MSNLoss(MSNConfig(num_prototypes=k, use_sinkhorn=False, prior="power_law"))(a, a, q)[2]["reg"].item() > 1e-3


# ---------------------------------------------------------------------------------------------
# Masks and the masked forward


def test_masks_are_a_pure_function_of_seed_epoch_and_sample_and_keep_floor_n_times_one_minus_ratio():
    msn = tiny_msn(mask_ratio=0.3)
    idx = torch.tensor([7, 3, 250, 11, 42, 5])
    x = torch.zeros(len(idx), 3, SIZE, SIZE)

    def keep(index, seed=0, epoch=0):
        return msn.keep_ids(Batch([x[: len(index)]] * 2, index, info(epoch * 10, epoch, seed)), x)

    full = keep(idx)
    assert full.shape == (6, math.floor(64 * 0.7)) == (6, 44)  # the official T_H = floor(N * (1 - patch_drop))
    assert torch.equal(torch.cat([keep(idx[:3]), keep(idx[3:])]), full)  # two processes' halves
    assert torch.equal(keep(idx[[4, 1]]), full[[4, 1]])
    assert not torch.equal(keep(idx, epoch=1), full) and not torch.equal(keep(idx, seed=1), full)
    assert all(len(set(r.tolist())) == 44 for r in full)  # distinct patches
    with pytest.raises(UserError, match="keeps none"):
        tiny_msn(mask_ratio=0.99).keep_ids(Batch([x] * 2, idx, info()), x)


def test_the_masked_forward_is_timms_forward_and_the_blocks_see_only_the_kept_patches():
    msn = tiny_msn().eval()
    vit = msn.encoder
    x = torch.randn(3, 3, SIZE, SIZE)
    every = torch.arange(64).expand(3, 64)
    with torch.no_grad():
        torch.testing.assert_close(msn.masked_features(x, every), vit(x), rtol=1e-5, atol=1e-6)
        seen = []
        hook = vit.blocks[0].register_forward_hook(lambda m, i, o: seen.append(i[0].shape))
        ids = msn.keep_ids(Batch([x, x], torch.arange(3), info()), x)
        msn.masked_features(x, ids)
        hook.remove()
    assert seen == [torch.Size([3, 1 + math.floor(64 * 0.85), 32])]


def test_the_target_encoder_gets_no_gradient_and_the_student_and_prototypes_do():
    msn = tiny_msn()
    views = [torch.randn(4, 3, SIZE, SIZE), torch.randn(4, 3, SIZE, SIZE), *[torch.randn(4, 3, 16, 16)] * 2]
    loss, logs = msn.training_step(make_batch(views))
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in [*msn.target_encoder.parameters(), *msn.target_head.parameters()])
    assert all(p.grad is not None for p in [*msn.encoder.parameters(), *msn.head.parameters(), msn.prototypes.weight])
    assert torch.isfinite(loss) and logs["embedding"].shape == (4, 16) and 0 < logs["teacher_entropy_frac"] <= 1


# ---------------------------------------------------------------------------------------------
# Views, recipe, momentum, parameter groups, refused backbones


def test_views_recipe_and_momentum():
    msn = tiny_msn(focal_views=3)
    sizes = [v.size for v in default_views(msn, TrainConfig().aug, SIZE)]
    assert sizes == [32, 32, 16, 16, 16]
    vit224 = MSN(create_backbone(VIT, 224, **{**VIT_KWARGS, "patch_size": 16}), MSNConfig(**SMALL))
    assert [v.size for v in default_views(vit224, TrainConfig().aug, 224)] == [224, 224, 96, 96]  # the official 224 / 96
    with pytest.raises(UserError, match="focal_size 10 px must be a multiple"):
        default_views(tiny_msn(focal_size=10), TrainConfig().aug, SIZE)
    r = MSN.recipe(224, "vit")
    assert (r.optimizer, r.lr * 1024 / 256, r.weight_decay, r.weight_decay_end, r.grad_clip) == ("adamw", 1e-3, 0.04, 0.4, 3.0)
    assert msn.momentum_at(info(0)) == 0.996
    assert msn.momentum_at(info(100)) == pytest.approx(0.996 + 0.004 / 1.25)  # the official schedule spans 1.25 x the steps
    assert msn.momentum_at(info(50)) == pytest.approx(0.996 + 0.002 / 1.25)


def test_the_prototypes_get_no_weight_decay():
    msn = tiny_msn()
    groups = msn.param_groups(param_groups(msn, 0.04))
    protos = [g for g in groups if any(p is msn.prototypes.weight for p in g["params"])]
    assert len(protos) == 1 and protos[0]["weight_decay"] == 0.0 and protos[0]["fixed_weight_decay"]
    assert sum(len(g["params"]) for g in groups) == len([p for p in msn.parameters() if p.requires_grad])
    assert any(g["weight_decay"] == 0.04 for g in groups)


def test_a_non_vit_backbone_and_a_bad_prior_are_one_line_errors(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SSLBENCH_CACHE", str(tmp_path / "cache"))
    with pytest.raises(UserError, match=r"msn needs a vision transformer, got resnet18 .*vit_\* or deit_\*"):
        MSN(create_backbone("resnet18", SIZE, channels=(8, 16, 32, 64)))
    rc = main(["train", "--method", "msn", "--backbone", "resnet18", "--steps", "1", "--output", str(tmp_path / "r"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "vit_tiny_patch16_224" in err[0], err
    with pytest.raises(UserError, match="prior must be 'uniform'"):
        MSNConfig(prior="powerlaw").validate()


# ---------------------------------------------------------------------------------------------
# Through the trainer: a killed and resumed run draws the masks and crops an unbroken one draws


def _args(out, data):
    args = ["train", "--method", "msn", "--backbone", VIT, "--steps", "5", "--batch-size", "8", "--image-size", "16"]
    args += ["--precision", "no", "--data", f"imagefolder:{data}", "--seed", "2", "--quiet", "--output", str(out)]
    sets = [f"backbone_kwargs.{k}={v}" for k, v in VIT_KWARGS.items()] + [f"{k}={v}" for k, v in SMALL.items()]
    for s in (*sets, "checkpoint_every=2", "quick_knn=false", "log_every=1", "deterministic=true"):
        args += ["--set", s]
    return args


@pytest.mark.slow
def test_a_killed_and_resumed_msn_run_equals_an_unbroken_one(tmp_path):
    """Killed at step 3 (after the checkpoint of step 2) and resumed: the weights, the target
    networks, the prototypes and every step's loss equal the unbroken run's, bit for bit."""
    data = make_image_folder(tmp_path / "data")
    env = child_env(tmp_path / "cache")
    ref = fork_cli(_args(tmp_path / "ref", data), env)
    killed = fork_cli(_args(tmp_path / "killed", data), {**env, "SSLBENCH_TEST_KILL_AT": "step:3"})
    assert ref.wait().returncode == 0, ref.wait().describe()
    assert killed.wait().returncode == -9, killed.wait().describe()
    resumed = fork_cli(["train", "--output", str(tmp_path / "killed"), "--resume", "--quiet"], env).wait()
    assert resumed.returncode == 0 and "from step 2" in resumed.stderr, resumed.describe()
    a, b = load_file(str(tmp_path / "ref" / "method.safetensors")), load_file(str(tmp_path / "killed" / "method.safetensors"))
    assert any(k.startswith("target_encoder.") for k in a) and "prototypes.weight" in a
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "resumed MSN run differs from the unbroken one"
    losses = [[json.loads(x)["loss"] for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()] for run in ("ref", "killed")]
    assert losses[0] == losses[1] and len(losses[0]) == 5
