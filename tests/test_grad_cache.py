"""The gradient cache (``--grad-cache-chunk N``, :mod:`sslbench.train.grad_cache`): the full-batch loss and
gradient in the memory of one chunk.

* In process, float64: for every method with ``supports_grad_cache`` (``embed`` and
  ``loss_from_embeddings``), the loss and every parameter gradient equal the plain full-batch
  computation (uneven chunks; a backbone with
  GroupNorm and the heads' BatchNorm in eval mode, since chunked BatchNorm statistics are per chunk);
  a ViT with drop-path reproduces a chunked forward with a graph exactly (the RNG is replayed) and
  leaves the RNG where that forward left it; BatchNorm buffers are updated once per chunk; with one
  chunk even training-mode BatchNorm is exact.
* Through the trainer (CLI): 3 steps with ``--grad-cache-chunk 3`` on one process and on two
  (``torchrun``, DDP ``no_sync`` for all chunks but the last) end with the weights of the plain run,
  for a SimCLR variant without BatchNorm (registered by this file's driver); a method without the
  hooks is a one-line error naming those that have them.
* Peak memory of one training step, measured in fresh processes by
  ``benchmarks/grad_cache_memory.py`` (peak RSS: ``VmHWM``, or ``ru_maxrss`` off Linux; a fresh
  process's ``ru_maxrss`` on Linux starts at its parent's RSS, here pytest's), is less than half
  with the cache; the figures are printed (``pytest -s``).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from _backbones import tiny_backbone
from _reliability import run_group
from _steps import batch as make_batch
from safetensors.torch import load_file
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

import sslbench
from sslbench.backbones import create_backbone
from sslbench.core.errors import UserError
from sslbench.core.registry import METHODS, get_method
from sslbench.data import load_split
from sslbench.train.grad_cache import GradCache, make_grad_cache

ROOT = Path(__file__).resolve().parents[1]
CACHE_METHODS = [name for name, cls in METHODS.items() if cls.supports_grad_cache]
NO_CACHE_METHODS = [name for name, cls in METHODS.items() if not cls.supports_grad_cache]
TINY = {"channels": (8, 16, 32, 64), "norm_layer": "groupnorm1"}  # batch-independent normalisation
RUN_TIMEOUT_S = 420
BATCH, STEPS, CHUNK = 16, 3, 3  # chunks of 3 over 16 (1 process) or 8 (2 processes) samples: uneven
RTOL, MIN_SCALE, ATOL = 1e-5, 0.1, 1e-7  # as tests/test_multiprocess.py (see its docstring)


# --------------------------------------------------------------------------------------------
# In process


def _bn_eval(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, _BatchNorm):
            m.eval()
    return model


def _views(b: int, dtype: torch.dtype, seed: int = 0) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, 3, 32, 32, generator=g).to(dtype) for _ in range(2)]


def _grads(model: nn.Module) -> dict[str, Tensor | None]:
    return {n: (None if p.grad is None else p.grad.detach().clone()) for n, p in model.named_parameters()}


def _gc_step(model: nn.Module, views: list[Tensor], chunk: int) -> Tensor:
    gc = GradCache(model.embed, model.loss_from_embeddings, model, chunk, online_fn=lambda b: model.embed(b, targets=False))
    loss, _ = gc.forward(make_batch(views))
    loss.backward()
    gc.backward()
    return loss.detach()


def _assert_grads_equal(got: dict[str, Tensor | None], want: dict[str, Tensor | None], rtol: float) -> None:
    assert got.keys() == want.keys()
    for name, w in want.items():
        g = got[name]
        assert (g is None) == (w is None), f"{name}: gradient present in only one computation"
        if w is not None:
            assert g is not None
            err = (g - w).abs().max().item()
            scale = w.abs().max().item()
            assert err <= rtol * scale + 1e-300, f"{name}: max |cached - full| = {err:.3g} (max |full| = {scale:.3g})"


@pytest.mark.parametrize("method_name", CACHE_METHODS)
def test_loss_and_every_gradient_equal_the_full_batch_float64(method_name: str) -> None:
    cls = get_method(method_name)
    torch.manual_seed(0)
    model = _bn_eval(cls(create_backbone("resnet18", 32, **TINY), cls.Config()).double())
    ref = copy.deepcopy(model)
    views = _views(12, torch.float64)
    loss_ref, _ = ref.training_step(make_batch(views))
    loss_ref.backward()
    loss = _gc_step(model, views, chunk=5)  # chunks of 5, 5, 2
    assert torch.allclose(loss, loss_ref.detach(), rtol=1e-12, atol=0)
    grads, grads_ref = _grads(model), _grads(ref)
    assert sum(g is not None for g in grads_ref.values()) > 10
    _assert_grads_equal(grads, grads_ref, rtol=1e-9)
    for (name, b), (_, b_ref) in zip(model.named_buffers(), ref.named_buffers()):
        assert torch.equal(b, b_ref), name


def _has_target_networks(name: str) -> bool:
    """Whether the method keeps EMA target networks (BYOL's target, MoCo v3's momentum branch)."""
    cls = get_method(name)
    return bool(cls(create_backbone("resnet18", 32, **TINY), cls.Config()).momentum_pairs())


@pytest.mark.parametrize("method_name", [n for n in CACHE_METHODS if _has_target_networks(n)])
def test_the_recomputation_skips_the_target_networks(method_name: str) -> None:
    """BYOL's target and MoCo v3's momentum branch carry no gradient: the recomputation used to
    run them a second time (twice the target forwards of the chunks' first pass). Now only in the
    first pass (as many target forwards per chunk as one ``embed`` makes: one per view size for
    BYOL, one per view for MoCo v3), and the gradients are bitwise those of recomputing everything."""
    cls = get_method(method_name)
    torch.manual_seed(0)
    model = _bn_eval(cls(create_backbone("resnet18", 32, **TINY), cls.Config()).double())
    full = copy.deepcopy(model)
    target = next(m for name, m in model.named_children() if name in ("target_encoder", "momentum_encoder"))
    calls = []
    target.register_forward_hook(lambda *_: calls.append(1))
    views = _views(12, torch.float64)
    with torch.no_grad():  # BatchNorm in eval mode: this probe changes no state
        model.embed(make_batch([v[:3] for v in views]))
    per_chunk = len(calls)
    calls.clear()
    _gc_step(model, views, chunk=3)  # 4 chunks
    assert per_chunk >= 1 and len(calls) == 4 * per_chunk, (len(calls), per_chunk)
    gc = GradCache(full.embed, full.loss_from_embeddings, full, 3)  # recomputes everything
    loss, _ = gc.forward(make_batch(views))
    loss.backward()
    gc.backward()
    got, want = _grads(model), _grads(full)
    assert all((got[k] is None) == (want[k] is None) and (want[k] is None or torch.equal(got[k], want[k])) for k in want)


def test_vit_float32_and_a_single_chunk_with_batchnorm_in_training_mode() -> None:
    cls = get_method("simclr")
    # A ViT (LayerNorm only) in fp32 with SimCLR's projector BatchNorm in eval mode: chunks of 4 of 10.
    torch.manual_seed(0)
    model = _bn_eval(cls(create_backbone("vit_tiny_patch16_224", 32, depth=2), cls.Config(proj_hidden_dim=64)))
    ref = copy.deepcopy(model)
    views = _views(10, torch.float32)
    loss_ref, _ = ref.training_step(make_batch(views))
    loss_ref.backward()
    loss = _gc_step(model, views, chunk=4)
    assert torch.allclose(loss, loss_ref.detach(), rtol=1e-6, atol=0)
    _assert_grads_equal(_grads(model), _grads(ref), rtol=2e-5)
    # One chunk (chunk >= batch): exact even with every BatchNorm in training mode, and the
    # running statistics are updated once, as in the plain step.
    torch.manual_seed(0)
    model = cls(create_backbone("resnet18", 32, channels=(8, 16, 32, 64)), cls.Config(proj_hidden_dim=64)).double()
    ref = copy.deepcopy(model)
    views = _views(6, torch.float64)
    loss_ref, _ = ref.training_step(make_batch(views))
    loss_ref.backward()
    loss = _gc_step(model, views, chunk=6)
    assert torch.allclose(loss, loss_ref.detach(), rtol=1e-12, atol=0)
    _assert_grads_equal(_grads(model), _grads(ref), rtol=1e-9)
    for (name, b), (_, b_ref) in zip(model.named_buffers(), ref.named_buffers()):
        assert torch.equal(b, b_ref), name


def test_randomness_is_replayed_in_the_recomputation() -> None:
    """Drop-path draws the same masks in the recomputation: the gradient equals that of a chunked
    forward *with* a graph under the same seed, and the RNG ends where that forward left it."""
    cls = get_method("simclr")
    torch.manual_seed(0)
    model = _bn_eval(cls(create_backbone("vit_tiny_patch16_224", 32, depth=2, drop_path_rate=0.5), cls.Config(proj_hidden_dim=64)).double())
    views = _views(9, torch.float64)
    with torch.no_grad():  # drop-path is active: two forwards with different RNG states differ
        torch.manual_seed(1)
        a = model.embed(make_batch(views))
        b = model.embed(make_batch(views))
        assert not torch.allclose(a, b)
    ref = copy.deepcopy(model)
    torch.manual_seed(123)
    chunks = [(0, 4), (4, 8), (8, 9)]
    emb = torch.cat([ref.embed(make_batch(views).slice(i, j)) for i, j in chunks])
    loss_ref, _ = ref.loss_from_embeddings(emb)
    loss_ref.backward()
    after_ref = torch.rand(3)
    torch.manual_seed(123)
    loss = _gc_step(model, views, chunk=4)
    after = torch.rand(3)
    assert torch.equal(after, after_ref)
    assert torch.allclose(loss, loss_ref.detach(), rtol=1e-12, atol=0)
    _assert_grads_equal(_grads(model), _grads(ref), rtol=1e-9)


def test_batchnorm_buffers_are_updated_once_per_chunk() -> None:
    cls = get_method("simclr")
    torch.manual_seed(0)
    model = cls(create_backbone("resnet18", 32, channels=(8, 16, 32, 64)), cls.Config(proj_hidden_dim=32))
    first_pass = copy.deepcopy(model)
    views = _views(10, torch.float32)
    with torch.no_grad():  # what step 1 alone does to the buffers: one forward per chunk
        for i in range(0, 10, 4):
            first_pass.embed(make_batch(views).slice(i, i + 4))
    _gc_step(model, views, chunk=4)
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    assert bns and all(int(m.num_batches_tracked) == 3 for m in bns)  # 3 chunks, not 6 forwards
    for (name, b), (_, b_ref) in zip(model.named_buffers(), first_pass.named_buffers()):
        assert torch.equal(b, b_ref), name


@pytest.mark.parametrize("method_name", NO_CACHE_METHODS or ["<none>"])
def test_method_without_hooks_is_a_user_error(method_name: str) -> None:
    if method_name == "<none>":
        pytest.skip("every registered method supports the gradient cache")
    cls = get_method(method_name)
    method = cls(tiny_backbone(method_name), cls.Config())  # a small ViT for ViT-only methods (MAE)
    with pytest.raises(UserError) as info:
        make_grad_cache(4, nn.Identity(), method, accelerator=None)
    msg = str(info.value)
    assert method_name in msg and all(name in msg for name in CACHE_METHODS)


# --------------------------------------------------------------------------------------------
# Through the trainer (subprocesses)

# A SimCLR whose projector uses LayerNorm instead of BatchNorm, so that chunking changes nothing.
LN_METHOD = "simclr_ln_gradcache_test"


def _register_ln_method() -> None:
    from sslbench.core.registry import register_method

    simclr = get_method("simclr")

    @register_method(LN_METHOD)
    class SimCLRLayerNorm(simclr):  # type: ignore[misc, valid-type]
        description = "SimCLR with LayerNorm in the projector (gradient-cache tests)"

        def __init__(self, backbone: nn.Module, cfg: Any = None) -> None:
            super().__init__(backbone, cfg)
            for i, m in enumerate(self.projector):
                if isinstance(m, nn.BatchNorm1d):
                    self.projector[i] = nn.LayerNorm(m.num_features)


def _train_args(method: str, out: Path, chunk: int) -> list[str]:
    args = [
        "train",
        "--method",
        method,
        "--steps",
        str(STEPS),
        "--batch-size",
        str(BATCH),
        "--precision",
        "no",
        "--seed",
        "5",
        "--quiet",
        "--output",
        str(out),
        "--set",
        "log_every=1",
        "--set",
        "quick_knn=false",
        "--set",
        "backbone_kwargs.channels=8,16,32,64",
        "--set",
        "backbone_kwargs.norm_layer=groupnorm1",
        "--set",
        "proj_hidden_dim=64",
    ]
    return args + (["--grad-cache-chunk", str(chunk)] if chunk else [])


def _run(cmd: list[str], env: dict[str, str], timeout_s: float = RUN_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    return run_group(cmd, env, timeout_s)


def _load_benchmark() -> Any:
    spec = importlib.util.spec_from_file_location("grad_cache_memory", ROOT / "benchmarks" / "grad_cache_memory.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class _Jobs:
    """The subprocess work of this file, started together in the background."""

    def __init__(self, root: Path) -> None:
        self.root = root
        src = str(Path(sslbench.__file__).resolve().parents[1])
        self.env = {
            **os.environ,
            "SSLBENCH_CACHE": str(root / "cache"),
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [src, str(ROOT), os.environ.get("PYTHONPATH")])),
        }
        self.pool = ThreadPoolExecutor(max_workers=4)
        # One process: the error case, then the plain and the cached run (imports dominate).
        argvs = [
            [
                "train",
                "--method",
                NO_CACHE_METHODS[0] if NO_CACHE_METHODS else "simclr",
                "--steps",
                "1",
                "--batch-size",
                "8",
                "--grad-cache-chunk",
                "4",
                "--output",
                str(root / "error-run"),
                "--quiet",
                "--set",
                "backbone_kwargs.channels=8,16,32,64",
                "--set",
                "quick_knn=false",
            ],
            _train_args(LN_METHOD, self.out("plain"), 0),
            _train_args(LN_METHOD, self.out("cached"), CHUNK),
        ]
        self.one: Future[subprocess.CompletedProcess[str]] = self.pool.submit(
            _run, [sys.executable, __file__, "--driver", json.dumps(argvs)], self.env, RUN_TIMEOUT_S * 2
        )
        self.two: Future[subprocess.CompletedProcess[str]] = self.pool.submit(
            _run,
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc_per_node=2",
                __file__,
                "--driver",
                json.dumps([_train_args(LN_METHOD, self.out("cached-2proc"), CHUNK)]),
            ],
            self.env,
        )
        bench = _load_benchmark()
        # The memory runs measure one step at 32 px: decode that data set into the cache first, or
        # whichever run decodes it pays ~140 MiB more and the comparison depends on the race.
        load_split("digits", "train", 32, cache_dir=str(root / "cache"))

        def memory_run(chunk: int) -> Future[dict[str, float]]:
            return self.pool.submit(
                bench.measure,
                batch_size=128,
                chunk=chunk,
                channels="8,16,32,64",
                threads=1,
                timeout_s=RUN_TIMEOUT_S,
                cache_dir=str(root / "cache"),
            )

        self.memory = {0: memory_run(0), 16: memory_run(16)}

    def out(self, name: str) -> Path:
        return self.root / name

    def driver_lines(self) -> list[str]:
        proc = self.one.result(timeout=RUN_TIMEOUT_S * 3)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("DRIVER_RC ")]
        assert len(lines) == 3, f"driver failed (rc={proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        self.driver_stderr = proc.stderr
        return lines

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


@pytest.fixture(scope="module")
def jobs(tmp_path_factory: pytest.TempPathFactory) -> Any:
    j = _Jobs(tmp_path_factory.mktemp("grad_cache"))
    yield j
    j.close()


def _assert_runs_equal(got: Path, want: Path) -> None:
    m_got = [json.loads(x) for x in (got / "metrics.jsonl").read_text().splitlines()]
    m_want = [json.loads(x) for x in (want / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in m_got] == [r["step"] for r in m_want] == list(range(1, STEPS + 1))
    for a, b in zip(m_got, m_want):
        assert abs(a["loss"] - b["loss"]) <= RTOL * abs(b["loss"]) + ATOL, f"step {a['step']}: loss {a['loss']} vs {b['loss']}"
    for fname in ("encoder.safetensors", "method.safetensors"):
        ta, tb = load_file(str(got / fname)), load_file(str(want / fname))
        assert ta.keys() == tb.keys()
        for key in tb:
            a, b = ta[key].double(), tb[key].double()
            err = (a - b).abs().max().item()
            tol = RTOL * max(b.abs().max().item(), MIN_SCALE) + ATOL
            assert err <= tol, f"{fname}:{key}: max |cached - plain| = {err:.3g} > {tol:.3g}"


def test_cli_method_without_hooks_exits_with_a_one_line_error(jobs: _Jobs) -> None:
    if not NO_CACHE_METHODS:
        pytest.skip("every registered method supports the gradient cache")
    rc = jobs.driver_lines()[0].split()
    assert rc[2] == "2", rc
    errors = [ln for ln in jobs.driver_stderr.splitlines() if ln.startswith("sslbench: error:")]
    assert len(errors) == 1 and "--grad-cache-chunk" in errors[0] and all(m in errors[0] for m in CACHE_METHODS), errors


def test_trainer_gradient_cache_equals_the_plain_step_one_process(jobs: _Jobs) -> None:
    lines = jobs.driver_lines()
    assert lines[1].split()[2] == "0" and lines[2].split()[2] == "0", lines
    _assert_runs_equal(jobs.out("cached"), jobs.out("plain"))


def test_trainer_gradient_cache_equals_the_plain_step_two_processes(jobs: _Jobs) -> None:
    jobs.driver_lines()
    proc = jobs.two.result(timeout=RUN_TIMEOUT_S * 2)
    assert proc.returncode == 0, f"2-process run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    assert json.loads((jobs.out("cached-2proc") / "results.json").read_text())["processes"] == 2
    _assert_runs_equal(jobs.out("cached-2proc"), jobs.out("plain"))


def test_peak_memory_is_lower_with_the_gradient_cache(jobs: _Jobs) -> None:
    plain = jobs.memory[0].result(timeout=RUN_TIMEOUT_S * 2)
    cached = jobs.memory[16].result(timeout=RUN_TIMEOUT_S * 2)
    print(
        f"\nSimCLR, resnet18 channels 8,16,32,64, 32 px, batch 128, one training step (peak RSS, VmHWM):"
        f"\n  without gradient cache: peak {plain['peak_mb']:.0f} MiB, step {plain['step_mb']:.0f} MiB"
        f"\n  gradient cache chunk 16: peak {cached['peak_mb']:.0f} MiB, step {cached['step_mb']:.0f} MiB"
    )
    assert cached["peak_mb"] < plain["peak_mb"]
    assert cached["step_mb"] < 0.5 * plain["step_mb"], (plain, cached)


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--driver":
    # Runs `sslbench.commands.cli.main` on each argument list (with the LayerNorm SimCLR registered); used
    # directly and under torchrun.
    sys.path.insert(0, str(ROOT))
    _register_ln_method()
    from sslbench.commands.cli import main

    rcs = []
    for argv in json.loads(sys.argv[2]):
        rc = main(argv)
        print("DRIVER_RC", argv[argv.index("--method") + 1], rc, flush=True)
        rcs.append(rc)
    sys.exit(0 if all(rc in (0, 2) for rc in rcs) else 1)
