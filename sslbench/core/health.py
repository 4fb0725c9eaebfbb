"""Collapse caught while it happens: label-free health figures of the training batch and a verdict.

**The figures** (one set per logging window, from the last step of the window; written to
``metrics.jsonl``):

- ``embedding_std``: the mean over dimensions of the standard deviation over samples of the
  L2-normalised embedding ``u = z / |z|`` (population std), the collapse check of SimSiam (Chen &
  He, CVPR 2021, Sec. 4.1). 0 when every sample maps to one point; ``1/sqrt(d)`` for directions
  spread over the sphere, so ``embedding_std_sqrt_d = embedding_std * sqrt(d)`` is about 1 when
  healthy.
- ``embedding_rank``: the effective rank of ``u`` (Roy & Vetterli, EUSIPCO 2007; RankMe, Garrido
  et al., ICML 2023): ``exp(-sum_k p_k log p_k)``, ``p_k = sigma_k / ||sigma||_1 + 1e-7`` over the
  singular values of ``u`` (uncentred). 1 for a rank-one (collapsed) matrix, at most ``min(N, d)``.
- ``teacher_entropy_frac`` (methods that train toward a per-sample distribution over K outputs,
  e.g. DINO's teacher): its mean entropy over ``log K``, 1 for uniform targets; with it
  ``teacher_entropy_frac_step0``, its value at the run's first step.

``z`` is the per-sample embedding the method's loss acts on, which a method hands over in its
training step's logs under :data:`sslbench.core.method.EMBEDDING_LOG` (B, d); the trainer takes it out
of the logs every step (a reference, no computation) and measures it only in logging windows,
where the loop synchronises anyway: gathered over processes (the figures span the global batch,
so N processes log what one logs) and computed in float64 on the CPU. A method that hands over
nothing gets no embedding figures. Nothing here touches the model, the optimizer or a random
generator, so training is bitwise the same with or without it.

**The verdict** (:func:`judge`), from one window's figures:

- ``complete``: ``embedding_std_sqrt_d < STD_SQRT_D_MIN``: the samples sit on (nearly) one point;
- ``dimensional``: ``embedding_rank < RANK_MIN``: the samples span (nearly) one direction;
- ``uniform``: ``teacher_entropy_frac > ENTROPY_FRAC_MAX`` and not below its step-0 value
  (within ``ENTROPY_FRAC_TOL``): the targets are (nearly) uniform, and no less so than those of
  the untrained teacher (a run that starts near uniform and is leaving it is not flagged).

Thresholds and the measurements behind them (digits, 32 px, batch 128, seed 0, windows every 2
or 5 steps; CPU, shared machine):

- SimCLR, the setting of tests/test_no_collapse.py (channels 16,32,64,128, 4 epochs = 40
  steps): ``embedding_std_sqrt_d`` 0.69-0.76, ``embedding_rank`` 66.7-69.2 (of 128) in every window.
- DINO (defaults, channels 8,16,32,64, 2 epochs = 20 steps): on the student's logits over K = 4096
  prototypes ``embedding_std_sqrt_d`` falls from 0.31 to 0.050-0.055 and ``embedding_rank`` from
  19.7 to 3.5-3.7 as the head heads for its uniform plateau; ``teacher_entropy_frac`` rises from
  0.855 (step 0) to 0.967. docs/recipes.md: 0.96 log K at the first step of a 16 px run, 0.988
  (2,048 CIFAR-10 images, 160 steps) and 0.996 (step 210) on the plateau; the committed
  leaderboards/cifar10-cpu DINO row ended at 0.987 (8.21 nats), the ViT-Tiny row at 0.957.
- Forced collapse: a projector that outputs a constant gives ``embedding_std_sqrt_d`` < 1e-6 and
  ``embedding_rank`` 1.000; DINO with a teacher temperature of 100 gives 1.000 log K from step 0.

So ``STD_SQRT_D_MIN`` (0.01) and ``RANK_MIN`` (1.5) sit 5x and 2.3x below the lowest healthy
window measured (DINO's, whose logits narrow as its targets flatten; contrastive methods sit
near 0.7 and rank 67) and far above a point collapse; ``ENTROPY_FRAC_MAX`` (0.985) sits above a
freshly built or young DINO (0.86-0.967) and the ViT row (0.957), and below the plateau (0.987 to
0.996). These are conservative: they flag runs that have collapsed, not runs that are merely
slow to spread out (the spread test of tests/test_no_collapse.py measures that on h).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from sslbench.core import dist
from sslbench.core.method import EMBEDDING_LOG, ENTROPY_FRAC_LOG

__all__ = [
    "ENTROPY_FRAC_MAX",
    "RANK_MIN",
    "STD_SQRT_D_MIN",
    "RANK_EPS",
    "HealthMonitor",
    "describe",
    "effective_rank",
    "embedding_figures",
    "judge",
    "normalised_std",
]

RANK_EPS = 1e-7  # RankMe's eps (Garrido et al. 2023, Eq. 1)
STD_SQRT_D_MIN = 0.01  # complete collapse below this std * sqrt(d) of the normalised embedding
RANK_MIN = 1.5  # dimensional collapse below this effective rank
ENTROPY_FRAC_MAX = 0.985  # uniform collapse above this teacher entropy / log K (and not below step 0)
ENTROPY_FRAC_TOL = 1e-3  # "not below its step-0 value": within this of it, or above


def normalised_std(z: Tensor) -> float:
    """Mean over the ``d`` dimensions of the population std over the ``N`` rows of ``z / |z|``."""
    u = F.normalize(z.to(torch.float64), dim=1)
    return float(u.std(dim=0, correction=0).mean())


def effective_rank(z: Tensor, eps: float = RANK_EPS) -> float:
    """``exp`` of the entropy of the L1-normalised singular values (+ eps) of ``z`` (N, d), uncentred."""
    s = torch.linalg.svdvals(z.to(torch.float64))
    total = s.sum()
    if not total > 0:
        return 1.0  # an all-zero matrix: rank one at most, as a collapsed one
    p = s / total + eps
    return float(torch.exp(-(p * p.log()).sum()))


def embedding_figures(z: Tensor) -> dict[str, float]:
    """The embedding figures of a batch ``z`` (N, d), N >= 2: ``embedding_std``,
    ``embedding_std_sqrt_d`` and ``embedding_rank`` (of the L2-normalised rows)."""
    z = z.detach().to("cpu", torch.float64).flatten(1)
    std = normalised_std(z)
    return {
        "embedding_std": std,
        "embedding_std_sqrt_d": std * math.sqrt(z.shape[1]),
        "embedding_rank": effective_rank(F.normalize(z, dim=1)),
    }


def judge(figures: Mapping[str, float]) -> str | None:
    """The collapse a window's figures show: ``complete``, ``dimensional``, ``uniform`` or None."""
    std = figures.get("embedding_std_sqrt_d")
    if std is not None and std < STD_SQRT_D_MIN:
        return "complete"
    rank = figures.get("embedding_rank")
    if rank is not None and rank < RANK_MIN:
        return "dimensional"
    frac, frac0 = figures.get(ENTROPY_FRAC_LOG), figures.get(ENTROPY_FRAC_LOG + "_step0")
    if frac is not None and frac > ENTROPY_FRAC_MAX and (frac0 is None or frac > frac0 - ENTROPY_FRAC_TOL):
        return "uniform"
    return None


_WHAT = {
    "complete": "every sample maps to nearly one point (embedding_std_sqrt_d {embedding_std_sqrt_d:.3g} < {std_min})",
    "dimensional": "the embeddings span nearly one direction (embedding_rank {embedding_rank:.3g} < {rank_min})",
    "uniform": "the teacher's targets are nearly uniform (entropy {teacher_entropy_frac:.4f} log K > {frac_max}, "
    "{teacher_entropy_frac_step0:.4f} at step 0)",
}
_FIGURES = ("embedding_std", "embedding_std_sqrt_d", "embedding_rank", ENTROPY_FRAC_LOG, ENTROPY_FRAC_LOG + "_step0")


def describe(kind: str, figures: Mapping[str, float]) -> str:
    """One line on what ``kind`` of collapse ``figures`` show."""
    values = {k: figures.get(k, math.nan) for k in _FIGURES}
    return _WHAT[kind].format(**values, std_min=STD_SQRT_D_MIN, rank_min=RANK_MIN, frac_max=ENTROPY_FRAC_MAX)


@dataclass
class HealthMonitor:
    """The trainer's health check: :meth:`take` every step, :meth:`window` at logging steps.

    The verdict sticks: the first window that shows a collapse decides it (one warning line on the
    main process) and is what ``results.json`` records; a resumed run reads it, and the step-0
    teacher entropy, back from ``metrics.jsonl`` (cut back to the checkpoint's step)."""

    world: int = 1  # processes
    main: bool = True  # the process that warns
    embedding: Tensor | None = None  # the last step's embedding (a reference)
    frac0: Tensor | float | None = None  # the teacher entropy fraction at step 0
    verdict: dict[str, Any] | None = None  # the collapse found, with the figures that decided it
    last: dict[str, float] = field(default_factory=dict)  # the last window's figures

    def resume_from(self, metrics: Path) -> None:
        """Restore the step-0 reference and a verdict from the records of a resumed run."""
        import json

        if not metrics.is_file():
            return
        for line in metrics.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if not isinstance(rec, dict):
                continue
            key = ENTROPY_FRAC_LOG + "_step0"
            if self.frac0 is None and isinstance(rec.get(key), (int, float)):
                self.frac0 = float(rec[key])
            if self.verdict is None and isinstance(rec.get("collapse"), str):
                self.verdict = {"collapse": rec["collapse"], "step": rec.get("step"), **{k: rec[k] for k in _FIGURES if k in rec}}

    def take(self, logs: dict[str, Tensor], step: int) -> None:
        """Take the embedding out of a step's ``logs``; keep the step-0 teacher entropy (on the device)."""
        self.embedding = logs.pop(EMBEDDING_LOG, None)
        if step == 0 and self.frac0 is None and ENTROPY_FRAC_LOG in logs:
            self.frac0 = logs[ENTROPY_FRAC_LOG].detach().clone()

    def window(self, record: dict[str, Any]) -> None:
        """Add the window's figures (and ``collapse``, when found) to ``record``: collectives on
        every process, the warning on the main one."""
        figures: dict[str, float] = {}
        if self.embedding is not None and self.embedding.ndim >= 2:
            z = dist.gather_no_grad(self.embedding.detach()) if self.world > 1 else self.embedding.detach()
            if z.shape[0] >= 2:
                figures.update(embedding_figures(z))
        if ENTROPY_FRAC_LOG in record:
            if isinstance(self.frac0, Tensor):
                self.frac0 = float(dist.all_reduce_mean(self.frac0) if self.world > 1 else self.frac0)
            figures[ENTROPY_FRAC_LOG] = float(record[ENTROPY_FRAC_LOG])
            if self.frac0 is not None:
                figures[ENTROPY_FRAC_LOG + "_step0"] = float(self.frac0)
        record.update({k: v for k, v in figures.items() if k != ENTROPY_FRAC_LOG})
        self.last = figures
        kind = judge(figures)
        if kind is None:
            return
        record["collapse"] = kind
        if self.verdict is None:
            self.verdict = {"collapse": kind, "step": record.get("step"), **figures}
            if self.main:
                print(f"warning: collapse ({kind}) at step {record.get('step')}: {describe(kind, figures)}", file=sys.stderr)

    def summary(self) -> dict[str, Any] | None:
        """``results.json``'s ``health``: the verdict (``collapse``: the kind, or None) and the
        figures that decided it (the first flagged window's, else the last window's); None when
        the method gave no figures."""
        if self.verdict is not None:
            return dict(self.verdict)
        if not self.last:
            return None
        return {"collapse": None, **self.last}
