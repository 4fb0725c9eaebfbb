"""Build the contract's inputs by hand: a :class:`~sslbench.core.method.Batch` of given views and a
:class:`~sslbench.core.method.StepInfo` of a given step."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sslbench.core.method import Batch, StepInfo


def info(step: int = 0, total: int = 100, *, steps_per_epoch: int = 10, seed: int = 0, progress: float | None = None) -> StepInfo:
    """The StepInfo of ``step`` of ``total`` (progress step/total unless given: a time budget)."""
    time_based = progress is not None
    p = step / total if progress is None else progress
    return StepInfo(step, step // steps_per_epoch, steps_per_epoch, total, min(max(p, 0.0), 1.0), seed, time_based)


def batch(views: Sequence[torch.Tensor], *, step: int = 0, total: int = 100, index: torch.Tensor | None = None, seed: int = 0) -> Batch:
    """A Batch of ``views`` (samples 0..B-1 unless ``index``) at ``step`` of ``total``."""
    views = list(views)
    idx = torch.arange(views[0].shape[0]) if index is None else index
    return Batch(views, idx, info(step, total, seed=seed))
