"""FSDP2 (``torch.distributed.fsdp.fully_shard``) and the EMA teacher (issue 32, part 3).

DINO on a tiny timm ViT, sharded as FSDP2 shards a vision transformer (each ``blocks[i]`` of the
student and of the teacher its own unit, then the whole model), over 2 gloo processes on CPU: one
SGD step on each process's half of the batch, then the method's own ``after_optimizer_step`` (the
EMA of ``momentum_pairs``, :func:`sslbench.core.momentum.ema_update_`) on the DTensor parameters.
Checked against one process without sharding on the whole batch: the loss, every student tensor
after the step, and every teacher tensor after the EMA; and the teacher's shards must equal the
EMA formula on the gathered full tensors bit for bit (the EMA runs shard by shard, no
communication). A target sharded differently from its online module is refused.
"""

from __future__ import annotations

import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
from _gloo import run_gloo_workers
from _steps import batch as make_batch
from _steps import info as step_info
from torch import Tensor, nn

from sslbench.core.momentum import ema_update_
from sslbench.methods.dino import DINO, DINOConfig
from sslbench.testing import TINY_VIT, tiny_backbone
from sslbench.train.run_setup import StepModule

WORLD, N, SIZE, LR = 2, 8, 32, 0.1
STEP = step_info(0, 10)  # step 0 of 10: momentum 0.996, the prototypes frozen (epoch 0 < freeze_last_layer)


def small_dino() -> DINO:
    torch.manual_seed(0)
    return DINO(tiny_backbone(TINY_VIT, SIZE), DINOConfig(out_dim=16, hidden_dim=32, bottleneck_dim=8, local_crops=0))


def views(n: int = N) -> list[Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 3, SIZE, SIZE, generator=g)
    return [x + 0.1 * torch.randn(x.shape, generator=g) for _ in range(2)]


def shard_vit(method: DINO) -> StepModule:
    """FSDP2 as for a vision transformer: every block of every ViT (student and teacher) its own
    unit, then the whole, as the trainer's :class:`StepModule` (whose ``forward`` is the training
    step, so the root unit's all-gather runs before it)."""
    from torch.distributed.fsdp import fully_shard

    for module in list(method.modules()):
        if isinstance(getattr(module, "blocks", None), nn.Sequential):
            for block in module.blocks:
                fully_shard(block)
    model = StepModule(method)
    fully_shard(model)
    return model


def full(module: nn.Module) -> dict[str, Tensor]:
    from torch.distributed.tensor import DTensor

    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone() for k, v in module.state_dict().items()}


def train_one_step(model: StepModule, v: list[Tensor], index: Tensor) -> Tensor:
    m = model.method
    model.train()
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=LR)
    loss, _ = model(make_batch(v, step=0, index=index))
    loss.backward()
    m.after_backward(STEP)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def _worker(rank: int, world: int, port: int, out_dir: Path) -> None:
    from torch.distributed.tensor import DTensor

    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        m = small_dino()
        model = shard_vit(m)
        n = N // world
        loss = train_one_step(model, [x[rank * n : (rank + 1) * n] for x in views()], torch.arange(rank * n, (rank + 1) * n))
        student, teacher_before = full(m.encoder), full(m.teacher_encoder)
        sharded = all(isinstance(p, DTensor) for p in m.teacher_encoder.parameters())
        m.after_optimizer_step(STEP)
        torch.distributed.all_reduce(loss)
        res: dict[str, Any] = {"loss": loss / world, "sharded": sharded, "student": student, "teacher_before": teacher_before}
        res["teacher"], res["head"], res["teacher_head"] = full(m.teacher_encoder), full(m.head), full(m.teacher_head)
        torch.save(res, out_dir / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return run_gloo_workers(__file__, WORLD, tmp_path_factory.mktemp("fsdp"))


def close(a: Tensor, b: Tensor) -> bool:
    return bool((a - b).abs().max() <= 1e-5 * max(float(b.abs().max()), 0.1) + 1e-7)


def test_fsdp2_ema_runs_shard_by_shard_and_two_processes_equal_one(ranks):
    assert all(r["sharded"] for r in ranks), "the teacher's parameters are not DTensors: nothing was sharded"
    m = small_dino().momentum_at(STEP)
    for r in ranks:
        for k, t in r["teacher"].items():  # the EMA on local shards = the formula on the full tensors, bit for bit
            if t.is_floating_point() and k in r["student"]:
                assert torch.equal(t, r["teacher_before"][k] * m + r["student"][k] * (1 - m)), k
        for part in ("student", "teacher", "head", "teacher_head"):  # every process ends with the same full tensors
            for k, t in r[part].items():
                assert torch.equal(t, ranks[0][part][k]), (part, k)
    one = small_dino()
    loss = train_one_step(StepModule(one), views(), torch.arange(N))
    one.after_optimizer_step(STEP)
    assert abs(float(ranks[0]["loss"]) - float(loss)) <= 1e-5 * abs(float(loss)) + 1e-7
    for part, module in (("student", one.encoder), ("teacher", one.teacher_encoder), ("head", one.head), ("teacher_head", one.teacher_head)):
        for k, t in full(module).items():
            assert close(ranks[0][part][k], t), (part, k, float((ranks[0][part][k] - t).abs().max()))


def test_ema_refuses_a_target_sharded_unlike_its_online_module(tmp_path):
    """A plain target paired with a DTensor online module (a teacher left out of the sharding)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    if torch.distributed.is_initialized():
        pytest.skip("needs a fresh process group")
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        online, target = nn.Linear(4, 4), nn.Linear(4, 4)
        online.weight = nn.Parameter(distribute_tensor(online.weight.detach(), mesh, [Shard(0)]))
        with pytest.raises(ValueError, match="sharded differently"):
            ema_update_(online, target, 0.9)
    finally:
        torch.distributed.destroy_process_group()


if __name__ == "__main__" and len(sys.argv) == 6 and sys.argv[1] == "--worker":
    _worker(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), Path(sys.argv[5]))
