"""Two processes compute what one process computes, for every registered method.

For each method in ``METHODS.names()`` (so a method added later is covered), the CLI trains 3
optimizer steps twice: in one process with global batch B, and in two CPU processes
(``torchrun --standalone --nproc_per_node 2 -m sslbench train``, gloo) with the same global batch B,
the same seed, fp32 and SyncBatchNorm (``sync_bn`` default true). The per-step losses in
``metrics.jsonl`` and every tensor of ``encoder.safetensors`` and ``method.safetensors`` (weights,
heads, momentum networks, BatchNorm running statistics, MoCo's queue) must agree to 1e-5
relative: per tensor ``max|a - b| <= 1e-5 * max(max|b|, 0.1) + 1e-7``.

Why the scale is floored at 0.1 (the scale of the network's weights): fp32 rounding differs
between the runs (convolutions on 8 vs 16 images, SyncBatchNorm's two-pass statistics vs ATen's
kernel) and after 3 steps leaves a difference of ~1e-7..2e-7 *absolute* in every tensor, whatever
its size. Tensors that start at zero and have moved only by three small updates (timm's zero-init
last BatchNorm weight of each residual block, biases; max ~1e-3) would fail a purely relative test
on rounding alone, while any real error (a wrong gradient average, unsynchronised statistics, a
wrong data split) changes them by the size of an update (>= 1e-4). Evidence that it is rounding
only: the same two runs in float64 (default dtype float64) agree to ~1e-14 absolute in every
tensor (checked for MoCo v2, the tightest case), and after one step the fp32 runs agree to
2e-7 everywhere. The ``1e-7`` floor covers tensors that are zero in exact arithmetic (the running
mean of a BatchNorm fed by a BatchNorm without affine parameters holds ~1e-8 rounding noise).

What makes this hold (and what these tests would catch if it broke): each process gets the
contiguous half of the global batch and views that are a pure function of (seed, epoch, index,
view); contrastive losses gather negatives with gradients and offset labels by rank; DDP averages
gradients; every BatchNorm (heads' BatchNorm1d, timm's BatchNormAct2d) is synchronised; momentum
updates run identically on every rank; MoCo enqueues the gathered keys; only the main process
writes the run files and runs the k-NN; the logged loss is the mean over processes.

DINO trains with SGD here: AdamW divides each gradient element by
its own running RMS, so an element whose gradient is zero up to rounding gets a step of up to the
lr in a direction rounding decides, and after 3 steps 2 processes differ from 1 by a fraction of
the lr in such elements (measured for DINO: 4e-6 in its head's first layer, against a tolerance
of 1e-6), although their gradients agree (with SGD every tensor agrees to the tolerance). The
optimizer is torch's; what this test checks is the gradients, statistics and state that reach it.
(MAE, also AdamW, agrees to the tolerance with its own recipe.) W-MSE and LeJEPA (AdamW recipes)
train with SGD here for the same reason, measured (seed 3): with AdamW, W-MSE's last projector
layer differs by 8.6e-6 (7.8x the tolerance) in 7 of its 65,536 elements, all in the columns of
7 hidden units, and LeJEPA's first projector layer by 9.0e-6 (6.6x); with SGD every tensor of
both is within 0.25x (W-MSE) and 0.03x (LeJEPA) of the tolerance. Their method settings stay at
their defaults (W-MSE: one whitening sub-batch of 16 rows in 64 dimensions, shrunk by eps).
MSN (AdamW recipe) trains with SGD here too, measured (seed 3): with AdamW the ViT's final
``norm.bias`` differs by 2.3e-5 (21x the tolerance, as large as the tensor itself): its gradient is
zero in exact arithmetic (it shifts every sample's [CLS] feature by the same vector, which the
projector's first BatchNorm removes; measured 4e-8 against 1e-2 for ``norm.weight``), so AdamW's
steps there have the sign rounding gives them. iBOT and DINOv2 (AdamW recipes) train with SGD here
for the same reason, measured for DINOv2 (seed 3): with AdamW the first block's qkv bias (zero at
the start, max |1 proc| 8.1e-4 after 3 steps) differs by 1.1e-5 (10x the tolerance); with SGD
every tensor of both methods agrees to the tolerance.

DCL, DCLW and MMCR train with smaller steps here, for the same kind of measured reason (seed 3,
every other setting at the method's defaults). At their small-image recipes 2 processes differ from
1 after 3 steps by up to 45x (DCL, SGD lr 0.12 at temperature 0.1: ``layer1.0.bn1.running_var``),
93x (MMCR, Adam: a BatchNorm bias, DINO's case above) and 68x to 1700x (MMCR with SGD at lr 0.005
to 0.05) the tolerance, while the same pairs of runs in float64 (default dtype float64, views cast
to it) agree to 2e-13 (DCL, DCLW) and 5e-12 (MMCR) in every tensor, so no process computes anything
another would not. Two sources of amplification: large SGD steps on gradients sharpened by a low
temperature (SimCLR with the same SGD and temperature 0.1 differs by 240x the tolerance; at its
LARS recipe 0.55x), and MMCR's nuclear norm, whose gradient ``U V^T`` turns with the singular
vectors of nearly equal singular values, so a rounding-size change of the centroids moves it by
far more than rounding. With DCL's and DCLW's SGD at lr 0.03 the largest difference is 0.20x and
0.48x the tolerance; MMCR with its ImageNet-size recipe (LARS, lr 0.8 x B/256: steps of about
lr x 0.001 of each weight's norm) 0.05x.

Every method also runs at its default views (``<method>@default``, without METHOD_SETS) where
those settings change its views: SwAV with its 6 local crops (its queue and prototype freeze then
stay off for 3 steps, as at the start of a default run). There the tensor scale floor is 1.0 instead
of 0.1 (tolerance 1e-5 + 1e-7 absolute for the small tensors), for this measured reason (seed 3):
without it the last residual BatchNorm of the ResNet (``layer4.1.bn2``, weight and bias) differs by
3.5e-6 (3.2x the 0.1-floor tolerance) in exactly one channel (55; every other channel of it
<= 5e-10). Cause: at step 2, in the local crops' pass, one element of that channel's block output
before its ReLU is -1.8e-10 in one process and +1.5e-11 in two (hooked on ``act2``). timm starts
that BatchNorm's weight and bias at zero, so where the shortcut is a dead ReLU (exactly 0) the
pre-activation is ``w * xhat + b`` with both terms ~1e-4 and nearly cancelling, and fp32 rounding
(which differs between the runs, as above) decides its sign: the ReLU passes that element's gradient
in one run and not in the other, moving that one channel by lr x one element's gradient. Not an
error of the distribution: the same two runs in float64 (parameters, activations, losses and LARS
norms float64, the float32 views cast exactly) agree to 3e-14 in every tensor, and the fp32
1-process run is within 0.05x of the float64 one while the 2-process run is the one the ReLU sent
the other way. With 0, 2 or 4 local crops, or 6 crops at 32 px, no element lands within rounding of
zero and every tensor is within 0.03x of the 0.1-floor tolerance. The floor of 1.0 admits one such
element (3.5e-6 = 0.35x) and still catches a real error, which moves every tensor by the size of an
update (>= 1e-4).

The runs use a narrow ResNet-18 (channels 8,16,32,64), or a two-block ViT for a method that trains ViTs
only (MAE; tests/_backbones.py), digits at 32 px and one thread per process.
They start in the background when the first CLI test runs: the 1-process references one after the
other in one Python process (``sslbench.commands.cli.main``; imports dominate such tiny runs), the
2-process runs in two ``torchrun`` launches (each trains half of the methods one after the other);
each test waits for its own method's pair. The runs and the
comparison are the installed check a plugin author runs, ``sslbench.testing.check_two_processes_equal_one``
(:class:`sslbench.testing.TwoProcessRuns`), which also requires both processes of a run to end with
the same parameters and buffers (DDP does not synchronise buffers).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from _backbones import VIT_ONLY, tiny, tiny_backbone
from torch.nn.modules.batchnorm import _BatchNorm

from sslbench.backbones import create_backbone
from sslbench.config import TrainConfig
from sslbench.core.dist import SyncBatchNorm, SyncBatchNormAct2d, convert_sync_batchnorm
from sslbench.core.method import default_views
from sslbench.core.registry import METHODS, get_method
from sslbench.data import ImageSplit
from sslbench.testing import MIN_SCALE, TwoProcessRun, TwoProcessRuns, child_env, run_group, train_argv
from sslbench.train.batches import data_fits_on_device, stream_batches
from sslbench.train.run_setup import make_plan

METHOD_NAMES = METHODS.names()
BATCH = 16  # global batch: 8 per process
STEPS = 3
RUN_TIMEOUT_S = 420  # one training run, on a loaded 2-core machine
PARALLEL_RUNS = 2  # torchrun launches, each training its share of the runs in turn (beside the 1-process reference runs)
KNN_METHOD = "simclr"  # also runs the end-of-training k-NN (main process only)
# Method settings that make the 3 steps exercise the method's cross-process state: SwAV with 2
# local crops, its queue (16 rows: filled by step 1, used in steps 2 and 3, each process scoring its
# half) and prototypes that train from the first step; NNCLR with a support set full of real
# projections from step 2 on. Barlow Twins with a 128-wide projector: at its default width of 2048
# against a batch of 16 the cross-correlation's gradients amplify fp32 rounding to ~2e-5 in the
# backbone's BatchNorm biases after 3 steps (17x the tolerance), while the same runs in float64
# agree to 6e-14 in every tensor (measured: all tensors float64, loss included); at width 128 fp32
# stays within 0.16x the tolerance. MoCo v3 with 256 hidden units in its projector and predictor:
# at its default 2048, at step 1 one pre-activation of the projector's second ReLU (view 2, sample
# 3, channel 1229) is -9.5e-7 in float64, and fp32 rounding decides its sign (+5.7e-7 in one process,
# -1.5e-6 in two), so that ReLU passes that element's gradient in one run only: projector.3.weight's
# gradient differs by 6.8% of its largest element at step 1, and after 3 steps
# encoder.layer2.1.bn2.weight by 1.1e-4 (102x the tolerance; SGD lr 0.05: the step-2 loss by 2.4e-5).
# The same two runs in float64 (weights cast from the same float32 initialisation, views cast
# exactly) agree to 2.5e-14 in every tensor. With 256 hidden units every tensor is within 0.03x.
METHOD_SETS = {
    "swav": ["num_local_crops=2", "queue_size=16", "epoch_queue_starts=0", "freeze_prototypes_epochs=0"],
    "nnclr": ["queue_size=16"],
    "barlow_twins": ["proj_dim=128", "proj_hidden_dim=128"],
    "mocov3": ["hidden_dim=256"],
    # All4One: a support set full of real momentum projections from step 2 on (as NNCLR's);
    # DeepCluster v2: a bank of 48 rows (3 steps of 16 fill it; its k-means, at an epoch's first
    # step, is covered by tests/test_zoo_wave2c.py) instead of 50000 in the run files.
    "all4one": ["queue_size=16"],
    "deepclusterv2": ["memory_size=48"],
}
SGD = ["--optimizer", "sgd", "--lr", "0.05"]
METHOD_ARGS = {
    "dino": SGD,  # AdamW: see the module docstring
    "wmse": SGD,
    "lejepa": SGD,
    "msn": SGD,
    "ibot": SGD,
    "dinov2": SGD,
    # DCL's SGD at lr 0.12 and MMCR's Adam (or SGD): fp32 rounding amplified (see the module docstring)
    "dcl": ["--lr", "0.03"],
    "dclw": ["--lr", "0.03"],
    "mmcr": ["--optimizer", "lars", "--lr", "0.8", "--set", "lr_scaling=linear"],
}
DEFAULT = "@default"  # a run key "<method>@default": the method without METHOD_SETS (its default views)
# SwAV at its default views (6 local crops): the tensor scale floor of the tolerance (see the module docstring).
SCALE_FLOOR = {"swav" + DEFAULT: 1.0}


def _views_of(method: str, sets: list[str]) -> list[tuple[str, int]]:
    """The views (augmentation, size) of ``method`` on the tiny backbone at 32 px with the
    ``key=value`` settings ``sets`` (cast to the type of the config field's default)."""
    cls = get_method(method)
    default = cls.Config()
    kwargs: dict[str, Any] = {}
    for item in sets:
        key, value = item.split("=", 1)
        kwargs[key] = type(getattr(default, key))(value)
    m = cls(tiny_backbone(method), cls.Config(**kwargs))
    return [(repr(v.aug), v.size) for v in default_views(m, TrainConfig().aug, 32)]


# Every method also runs at its default views where METHOD_SETS changes them (SwAV: 6 local crops).
DEFAULT_VIEW_RUNS = [m + DEFAULT for m in METHOD_NAMES if m in METHOD_SETS and _views_of(m, METHOD_SETS[m]) != _views_of(m, [])]
RUN_KEYS = [*METHOD_NAMES, *DEFAULT_VIEW_RUNS]


def _run_spec(key: str) -> TwoProcessRun:
    """The run ``key``: a method name (with its METHOD_SETS) or ``<method>@default`` (without them)."""
    method = key.removesuffix(DEFAULT)
    sets = [] if key.endswith(DEFAULT) else METHOD_SETS.get(method, [])
    return TwoProcessRun(
        key,
        method,
        tuple(sets),
        tuple(METHOD_ARGS.get(method, [])),
        backbone=tiny(method),
        knn=method == KNN_METHOD,
        min_scale=SCALE_FLOOR.get(key, MIN_SCALE),
    )


def _common_args(key: str, out: Path) -> list[str]:
    """The CLI arguments of the run ``key`` (sslbench.testing.train_argv)."""
    method = key.removesuffix(DEFAULT)
    r = _run_spec(key)
    return train_argv(method, out, backbone=tiny(method), steps=STEPS, batch=BATCH, knn=r.knn, sets=r.sets, args=r.args)


def _run(cmd: list[str], env: dict[str, str], log: Path, timeout_s: float = RUN_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    return run_group(cmd, env, timeout_s, log)


def _test_env(tmp_path: Path) -> dict[str, str]:
    """What the tests add to a CLI process's environment: a cache of their own, tests/ on the path
    and the fault injection (tests/_faults.py: inert unless SSLBENCH_TEST_* is set)."""
    return {"SSLBENCH_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(Path(__file__).parent), "SSLBENCH_CALLBACKS": "_faults:FaultInjection"}


def _group_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return child_env((), {**_test_env(tmp_path), **extra})


def _torchrun(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "sslbench", *args]


@pytest.fixture(scope="module")
def runs(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Starts the runs of the methods whose CLI test was collected (all, unless deselected)."""
    wanted = {
        item.callspec.params["run_key"]
        for item in request.session.items
        if getattr(item, "originalname", None) == "test_two_processes_equal_one" and hasattr(item, "callspec")
    }
    root = tmp_path_factory.mktemp("multiprocess")
    specs = [_run_spec(k) for k in RUN_KEYS if k in wanted]
    r = TwoProcessRuns(root, specs, env=_test_env(root), parallel=PARALLEL_RUNS, timeout_s=RUN_TIMEOUT_S)
    yield r
    r.close()


def _metrics(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


# --------------------------------------------------------------------------------------------
# The preconditions, in process (fast)


def _tiny_split(n: int = 40) -> ImageSplit:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    return ImageSplit(images, torch.arange(n) % 4, ["a", "b", "c", "d"])


def test_each_process_gets_its_half_of_the_global_batch_with_identical_views() -> None:
    """The trainer's batches on 2 ranks are the contiguous halves of the 1-process batch, with
    bit-identical augmented views, across an epoch boundary (augmentation is a pure function of
    (seed, epoch, index, view))."""
    split = _tiny_split()
    cfg = TrainConfig(batch_size=BATCH, steps=5, seed=7)  # 40 images: 2 steps per epoch, 3 epochs
    method = get_method("simclr")(create_backbone("resnet18", 32, channels=(8, 16, 32, 64)))
    specs = default_views(method, cfg.aug, 32)
    cpu = torch.device("cpu")

    def batches(world: int, rank: int) -> list[tuple[int, list[torch.Tensor]]]:
        plan = make_plan(cfg, len(split), world, 2)
        assert plan.global_batch == BATCH and plan.local_batch == BATCH // world
        items = stream_batches(split, specs, plan, seed=cfg.seed, start_step=0, rank=rank, device=cpu)
        return [(item[0], item[1], item[3]) for item in items]

    one = batches(1, 0)
    halves = [batches(2, r) for r in range(2)]
    assert [s for s, _, _ in one] == list(range(5)) == [s for s, _, _ in halves[0]] == [s for s, _, _ in halves[1]]
    for step, views, boxes in one:
        assert len(views) == 2 and views[0].shape == (BATCH, 3, 32, 32)
        assert not torch.equal(views[0], views[1])  # two different views of the same images
        for v in range(2):
            both = torch.cat([halves[0][step][1][v], halves[1][step][1][v]])
            assert torch.equal(both, views[v]), f"step {step} view {v}: 2-process views differ from the 1-process batch"
            both_boxes = torch.cat([halves[0][step][2][v], halves[1][step][2][v]])
            assert boxes[v].shape == (BATCH, 5) and torch.equal(both_boxes, boxes[v]), f"step {step} view {v}: boxes differ"
    assert not torch.equal(one[0][1][0], one[2][1][0])  # a new epoch, a new order and new views


def test_data_kept_in_host_memory_gives_the_same_batches_as_data_on_the_device() -> None:
    """In-memory data too large for the GPU stays on the host and each step's images are gathered
    there: the same indices, images and views as with the data on the device, across an epoch
    boundary (on the CPU both placements run; on a GPU the choice is data_fits_on_device)."""
    split = _tiny_split()
    cfg = TrainConfig(batch_size=BATCH, steps=5, seed=7)
    method = get_method("simclr")(create_backbone("resnet18", 32, channels=(8, 16, 32, 64)))
    specs = default_views(method, cfg.aug, 32)
    plan = make_plan(cfg, len(split), 2, 2)
    cpu = torch.device("cpu")
    for rank in range(2):
        common = dict(seed=cfg.seed, start_step=1, rank=rank, device=cpu)
        on_device = list(stream_batches(split, specs, plan, **common, data_on_device=True))
        on_host = list(stream_batches(split, specs, plan, **common, data_on_device=False))
        assert [b[0] for b in on_device] == [b[0] for b in on_host] == [1, 2, 3, 4]
        for (_, views_d, idx_d, boxes_d), (_, views_h, idx_h, boxes_h) in zip(on_device, on_host):
            assert torch.equal(idx_d, idx_h) and len(views_d) == len(views_h) == 2
            assert all(torch.equal(a, b) for a, b in zip(views_d, views_h))
            assert all(torch.equal(a, b) for a, b in zip(boxes_d, boxes_h))
    assert data_fits_on_device(10**12, cpu)  # the CPU holds whatever fits in memory
    if torch.cuda.is_available():
        gpu = torch.device("cuda")
        total = torch.cuda.get_device_properties(gpu).total_memory
        assert data_fits_on_device(total // 8, gpu) and not data_fits_on_device(total // 2, gpu)


@pytest.mark.parametrize("method_name", METHOD_NAMES)
@pytest.mark.parametrize("backbone", ["resnet18", "test_efficientnet"])
def test_sync_bn_conversion_covers_every_batchnorm(method_name: str, backbone: str) -> None:
    """What the trainer converts when world > 1: every BatchNorm of the method (backbone, heads'
    BatchNorm1d, momentum copies, timm's BatchNormAct2d) becomes a SyncBatchNorm."""
    if method_name in VIT_ONLY:
        pytest.skip(f"{method_name} trains vision transformers only: no BatchNorm to convert")
    kwargs = {"channels": (8, 16, 32, 64)} if backbone == "resnet18" else {}
    cls = get_method(method_name)
    method = cls(create_backbone(backbone, 32, **kwargs), cls.Config())
    before = sum(isinstance(m, _BatchNorm) for m in method.modules())
    bn_act = sum(type(m).__name__ == "BatchNormAct2d" for m in method.modules())
    converted = convert_sync_batchnorm(method)
    bns = [m for m in converted.modules() if isinstance(m, _BatchNorm)]
    assert before > 0 and len(bns) == before
    assert all(isinstance(m, SyncBatchNorm) for m in bns), [type(m).__name__ for m in bns if not isinstance(m, SyncBatchNorm)]
    assert sum(isinstance(m, SyncBatchNormAct2d) for m in bns) == bn_act
    if backbone == "test_efficientnet":
        assert bn_act > 0


# --------------------------------------------------------------------------------------------
# Two processes through the CLI


def test_every_method_runs_at_its_default_views() -> None:
    """The CLI runs cover each method at its default views: a method whose METHOD_SETS change its
    views (SwAV's 2 local crops) also runs without them."""
    assert DEFAULT_VIEW_RUNS == ["swav" + DEFAULT]
    for m in METHOD_NAMES:
        assert m not in METHOD_SETS or m + DEFAULT in RUN_KEYS or _views_of(m, METHOD_SETS[m]) == _views_of(m, [])
    assert len(_views_of("swav", [])) == 8  # 2 global and 6 local crops


@pytest.mark.parametrize("run_key", RUN_KEYS)
def test_two_processes_equal_one(runs: TwoProcessRuns, run_key: str) -> None:
    """sslbench.testing.assert_ranks_agree and assert_two_processes_equal_one on the run pair of
    ``run_key``: both processes end with the same parameters and buffers; one metrics record per
    step, the same lr, the loss (mean over processes) within the tolerance; every tensor of
    encoder.safetensors and method.safetensors within the tolerance (scale floor SCALE_FLOOR or
    0.1); results.json's processes and batch; for simclr the k-NN, run once on the main process."""
    runs.check(run_key)


# ---------------------------------------------------------------------------------------------
# A signal that reaches one process


def test_a_spent_time_budget_stops_every_process_at_the_next_logging_step(tmp_path: Path) -> None:
    """The processes check the time budget where they agree anyway, at logging steps: with a budget
    spent after the first step, both stop after step 3 (log_every=3) and the run finishes normally."""
    out = tmp_path / "run"
    args = [*_common_args("simclr", out), "--steps", "9", "--set", "log_every=3", "--set", "time_budget_s=0.001", "--set", "quick_knn=false"]
    proc = _run(_torchrun(args), _group_env(tmp_path), tmp_path / "2proc.log")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert [r["step"] for r in _metrics(out)] == [3]
    assert json.loads((out / "results.json").read_text())["steps"] == 3
    assert (out / "encoder.safetensors").is_file()


def test_sigterm_in_one_process_stops_every_process_after_the_same_step(tmp_path: Path) -> None:
    """A scheduler's SIGTERM reaches the processes of a run at different steps (here: only rank 1,
    after step 2). The processes agree at the next logging step (step 3, log_every=3): all save
    the checkpoint of step 3 and stop, instead of rank 1 leaving the collectives while rank 0
    waits in them for ever. Rank 0, which never got the signal, reports it."""
    out = tmp_path / "run"
    args = [*_common_args("moco", out), "--steps", "9", "--set", "log_every=3"]
    proc = _run(_torchrun(args), _group_env(tmp_path, SSLBENCH_TEST_SIGNAL_AT="2@1"), tmp_path / "2proc.log")
    assert proc.returncode != 0  # both processes exit 143: the run is not finished
    assert "SIGTERM: saved checkpoint at step 3" in proc.stderr, proc.stderr[-4000:]
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == ["step-00000003"]
    assert (out / "checkpoints" / "step-00000003" / "manifest.json").is_file()
    assert [r["step"] for r in _metrics(out)] == [3]
    assert not (out / "encoder.safetensors").exists()


def test_a_nan_in_one_process_stops_every_process_with_the_same_error(tmp_path: Path) -> None:
    """With the deferred check (the NaN flag is read at logging steps), a NaN loss in rank 1
    only, at the logging step 3: each process used to read its own flag, so rank 1 stopped while
    rank 0 went on into the next step's collectives (on NCCL: a hang). The flag is now agreed
    (the earliest bad step of any process): both stop with the same one-line error."""
    out = tmp_path / "run"
    args = [*_common_args("simclr", out), "--steps", "6", "--set", "log_every=3", "--set", "checkpoint_every=0"]
    env = _group_env(tmp_path, SSLBENCH_TEST_NAN_AT="3@1")
    proc = _run(_torchrun(args), env, tmp_path / "2proc.log")
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if "non-finite loss (NaN or inf) at step 3" in line]
    assert len(errors) == 2, proc.stderr[-4000:]  # one per process
    assert "sslbench/train/trainer.py" not in proc.stderr, proc.stderr[-4000:]  # (torchrun prints its own traceback)
    assert not (out / "encoder.safetensors").exists()


def test_the_main_process_holds_the_run_directory_for_the_group(tmp_path: Path) -> None:
    """Under torchrun the main process locks the run directory for the group (issue 20): while the
    two processes train, another `train` on the same --output is one line naming the holder; when
    the group ends the lock file is gone."""
    from _reliability import child_env, fork_cli, lines

    from sslbench.core.runlock import lock_holder

    out, gate = tmp_path / "run", tmp_path / "gate"
    args = [*_common_args("simclr", out), "--set", "quick_knn=false"]
    proc = subprocess.Popen(
        _torchrun(args),
        env=_group_env(tmp_path, SSLBENCH_TEST_GATE=str(gate)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while not (out / "config.yaml").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        holder = lock_holder(out)
        assert holder is not None and holder.pid is not None and "train" in (holder.command or ""), proc.poll()
        second = fork_cli(["train", "--output", str(out), "--steps", "1", "--quiet"], child_env(tmp_path / "cache")).wait()
        err = lines(second.stderr)
        assert second.returncode == 2 and len(err) == 1 and f"is in use by pid {holder.pid}" in err[0], second.describe()
    finally:
        gate.touch()
    try:
        _, stderr = proc.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert proc.returncode == 0, stderr[-4000:]
    assert (out / "encoder.safetensors").is_file() and not (out / "run.lock").exists()
