"""Collapse caught while it happens (issue 27, item 2): the health figures of the training batch,
the verdict, its warning line, ``results.json``, the result rows and the leaderboard.

A forced collapse (a toy method whose projector outputs a constant; DINO with a teacher
temperature of 100, whose targets are uniform) is flagged in one warning line, ``metrics.jsonl``,
``results.json``, every result row and the leaderboard; a healthy short run is not. The figures
equal a float64 numpy reference. The thresholds and their measured basis: sslbench/core/health.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from sslbench.commands.evaluate import evaluate_run
from sslbench.config import build_config
from sslbench.core.heads import mlp
from sslbench.core.health import ENTROPY_FRAC_MAX, RANK_MIN, STD_SQRT_D_MIN, HealthMonitor, embedding_figures, judge
from sslbench.core.method import EMBEDDING_LOG, Batch, Method, MethodConfig
from sslbench.core.registry import METHODS, register_method
from sslbench.evaluation.protocols import EvalOptions
from sslbench.results.leaderboard import render
from sslbench.train.trainer import train

TINY = ["backbone_kwargs.channels=8,16,32,64", "checkpoint_every=0", "quick_knn=false", "log_every=2", "channels_last=false"]


class ConstantProjector(Method):
    """A toy whose projector outputs a constant: every sample maps to one point (complete collapse)."""

    Config = MethodConfig
    description = "toy: a projector that outputs a constant"
    paper = "none (a test of the collapse check)"

    def __init__(self, backbone: nn.Module, cfg: MethodConfig | None = None) -> None:
        super().__init__()
        self.encoder = backbone
        self.head = mlp(backbone.num_features, 16, 8, 2)

    def training_step(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        z = self.head(self.encoder(batch.views[0])) * 0.0 + 1.0  # (B, 8), all ones
        loss = (z - 1.0).pow(2).mean() + 0.0 * self.encoder(batch.views[1]).mean()
        return loss, {"loss": loss.detach(), EMBEDDING_LOG: z.detach()}


@pytest.fixture
def constant_method():
    register_method("toy_constant")(ConstantProjector)
    yield "toy_constant"
    METHODS._items.pop("toy_constant", None)


def _train(tmp_path: Path, method: str, *sets: str, steps: int = 4, batch: int = 32, quiet: bool = False):
    flags = {"method": method, "batch_size": batch, "image_size": 32, "precision": "no", "steps": steps, "output": str(tmp_path / method)}
    cfg = build_config(flags=flags, sets=[*TINY, *sets])
    result = train(cfg, quiet=quiet)
    records = [json.loads(line) for line in (tmp_path / method / "metrics.jsonl").read_text().splitlines() if line.strip()]
    summary = json.loads((tmp_path / method / "results.json").read_text())
    return result, records, summary


def _rows(run_dir: Path, tmp_path: Path) -> list[dict]:
    opts = EvalOptions(protocols=["feature_std"])
    return evaluate_run(run_dir, opts, results_path=tmp_path / "results.jsonl", command="test", out=lambda s: None)


# ---------------------------------------------------------------------------------------------
# The figures: equal to an independent float64 reference


def _ref(z: np.ndarray) -> tuple[float, float]:
    u = z / np.linalg.norm(z, axis=1, keepdims=True)
    std = u.std(axis=0).mean()  # population std (ddof 0)
    s = np.linalg.svd(u, compute_uv=False)
    p = s / s.sum() + 1e-7
    return float(std), float(np.exp(-(p * np.log(p)).sum()))


@pytest.mark.parametrize("shape", [(64, 16), (16, 64), (200, 3)])
def test_figures_equal_a_float64_numpy_reference(shape):
    g = torch.Generator().manual_seed(sum(shape))
    z = torch.randn(*shape, generator=g) * torch.linspace(0.1, 3.0, shape[1])
    figures = embedding_figures(z.float())
    std, rank = _ref(z.float().double().numpy())
    assert figures["embedding_std"] == pytest.approx(std, rel=1e-10)
    assert figures["embedding_std_sqrt_d"] == pytest.approx(std * math.sqrt(shape[1]), rel=1e-10)
    assert figures["embedding_rank"] == pytest.approx(rank, rel=1e-10)


def test_the_verdict_names_each_collapse_and_passes_healthy_figures():
    healthy = {"embedding_std_sqrt_d": 0.7, "embedding_rank": 60.0}
    assert judge(healthy) is None
    assert judge({**healthy, "embedding_std_sqrt_d": STD_SQRT_D_MIN / 2}) == "complete"
    assert judge({**healthy, "embedding_rank": RANK_MIN - 0.5}) == "dimensional"
    frac = ENTROPY_FRAC_MAX + 0.01
    assert judge({"teacher_entropy_frac": frac, "teacher_entropy_frac_step0": 0.96}) == "uniform"
    assert judge({"teacher_entropy_frac": frac, "teacher_entropy_frac_step0": frac + 0.005}) is None  # leaving a uniform start
    assert judge({"teacher_entropy_frac": 0.96, "teacher_entropy_frac_step0": 0.95}) is None
    assert judge({}) is None  # a method that gives no figures gets no verdict


def test_a_method_that_gives_no_embedding_gets_no_figures_not_a_crash():
    monitor = HealthMonitor()
    logs = {"loss": torch.tensor(1.0)}
    monitor.take(logs, 0)
    record = {"step": 2, "loss": 1.0}
    monitor.window(record)
    assert record == {"step": 2, "loss": 1.0} and monitor.summary() is None


# ---------------------------------------------------------------------------------------------
# Forced collapse: flagged in the warning line, metrics.jsonl, results.json, the rows, the leaderboard


def test_a_constant_projector_is_flagged_everywhere(constant_method, tmp_path, capsys):
    result, records, summary = _train(tmp_path, constant_method, steps=6)
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if "collapse" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: collapse (complete) at step 2"), err  # once, not every window
    assert [r.get("collapse") for r in records] == ["complete"] * 3
    assert all(r["embedding_std_sqrt_d"] < 1e-6 and r["embedding_rank"] == pytest.approx(1.0, abs=1e-3) for r in records)
    assert summary["health"]["collapse"] == "complete" and summary["health"]["step"] == 2
    assert result.health == summary["health"]

    rows = _rows(tmp_path / constant_method, tmp_path)
    assert rows and all(row["health"]["collapse"] == "complete" for row in rows)
    for fmt in ("md", "html"):
        assert f"{constant_method} (collapsed: complete)" in render(rows, fmt)
    csv = render(rows, "csv").splitlines()
    assert "collapse" in csv[0].split(",") and "collapsed: complete" in csv[1]


@pytest.mark.slow
def test_dino_with_a_huge_teacher_temperature_is_flagged_uniform(tmp_path, capsys):
    sets = ("method_cfg.teacher_temp=100", "method_cfg.warmup_teacher_temp=100", "method_cfg.local_crops=0", "method_cfg.out_dim=256")
    _, records, summary = _train(tmp_path, "dino", *sets, steps=4, batch=16)
    err = capsys.readouterr().err
    assert sum("warning: collapse (uniform)" in line for line in err.splitlines()) == 1, err
    assert records[0]["teacher_entropy_frac_step0"] > 0.999 and records[-1]["collapse"] == "uniform"
    assert summary["health"]["collapse"] == "uniform" and summary["health"]["teacher_entropy_frac"] > ENTROPY_FRAC_MAX


# ---------------------------------------------------------------------------------------------
# Healthy runs are not flagged


def test_a_healthy_short_run_is_not_flagged(tmp_path, capsys):
    _, records, summary = _train(tmp_path, "simclr", steps=6)
    err = capsys.readouterr().err
    assert "collapse" not in err, err
    assert all("collapse" not in r and r["embedding_std_sqrt_d"] > 0.3 and r["embedding_rank"] > 5 for r in records), records
    health = summary["health"]
    assert health["collapse"] is None and health["embedding_rank"] > RANK_MIN
    rows = _rows(tmp_path / "simclr", tmp_path)
    assert all(row["health"]["collapse"] is None for row in rows)
    assert "collapsed" not in render(rows) and "collapse" not in render(rows, "csv")


def test_dino_at_its_default_temperatures_is_not_flagged_in_a_short_run(tmp_path, capsys):
    _, records, summary = _train(tmp_path, "dino", "method_cfg.local_crops=0", "method_cfg.out_dim=256", steps=4, batch=16)
    assert "collapse" not in capsys.readouterr().err
    assert summary["health"]["collapse"] is None and "teacher_entropy_frac_step0" in summary["health"]


def test_rows_without_a_verdict_and_committed_rows_render_unmarked():
    root = Path(__file__).resolve().parents[1] / "leaderboards"
    for path in sorted(root.glob("*/results.jsonl")):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        assert "collapsed" not in render(rows), path
        assert not any((row.get("health") or {}).get("collapse") for row in rows), path
