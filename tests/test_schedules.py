"""The one cosine schedule (sslbench.core.schedules.cosine_between) gives every caller, bit for bit, the
value of the formula that caller had written out before it existed (issue 31). The old formulas are
kept here, verbatim, as the reference."""

from __future__ import annotations

import math

import pytest

from sslbench.core.method import StepInfo, cosine_schedule
from sslbench.core.momentum import cosine_momentum
from sslbench.core.optim import lr_at
from sslbench.core.schedules import cosine_between

TOTALS = [*range(1, 121), 1000, 9375]


def _lr_at_before(step: int, total: int, base_lr: float, warmup: int) -> float:  # optim.lr_at, final_ratio=0
    if step < warmup:
        return base_lr * (step + 1) / warmup
    final = base_lr * 0.0
    if step >= total:
        return final
    progress = (step - warmup) / (total - warmup)
    return final + (base_lr - final) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _cosine_momentum_before(step: int, total: int, base: float, final: float) -> float:  # momentum.cosine_momentum
    if step <= 0:
        return base
    if step >= total:
        return final
    return final - (final - base) * (math.cos(math.pi * step / total) + 1.0) / 2.0


def _time_based_before(progress: float, start: float, end: float) -> float:  # method.cosine_schedule, time budget
    p = min(max(progress, 0.0), 1.0)
    return end - (end - start) * (math.cos(math.pi * p) + 1.0) / 2.0


def _linear_probe_before(step: int, total: int) -> float:  # evals/linear.py's lr factor
    return 0.5 * (1.0 + math.cos(math.pi * step / total))


def _bits(x: float) -> str:
    return x.hex()  # distinguishes -0.0 from 0.0 and every last bit


def test_cosine_between_endpoints_are_exact_and_it_is_monotone() -> None:
    assert cosine_between(0, 7, 0.04, 0.4) == 0.04 and cosine_between(7, 7, 0.04, 0.4) == 0.4
    assert cosine_between(-3, 7, 0.04, 0.4) == 0.04 and cosine_between(9, 7, 0.04, 0.4) == 0.4
    assert cosine_between(0.0, 1.0, 0.3, 0.0) == 0.3 and cosine_between(1.0, 1.0, 0.3, 0.0) == 0.0
    up = [cosine_between(k, 100, 0.996, 1.0) for k in range(101)]
    down = [cosine_between(k, 100, 4.8, 0.0) for k in range(101)]
    assert all(a < b for a, b in zip(up, up[1:])) and all(a > b for a, b in zip(down, down[1:]))
    assert cosine_between(50, 100, 0.0, 2.0) == pytest.approx(1.0)


def test_the_lr_schedule_is_bitwise_the_formula_it_replaced() -> None:
    for total in TOTALS:
        for warmup in sorted({0, 1, total // 10, total // 2} - {total + 1}):
            for base in (0.3, 4.8, 1.2, 0.024):
                for step in range(total + 2):
                    got = lr_at(step, total, base_lr=base, warmup_steps=warmup)
                    assert _bits(got) == _bits(_lr_at_before(step, total, base, warmup)), (step, total, warmup, base)


@pytest.mark.parametrize("base,final", [(0.996, 1.0), (0.99, 1.0), (0.9, 0.99), (0.04, 0.4), (0.1, 0.0)])
def test_momentum_and_weight_decay_schedules_are_bitwise_the_formula_they_replaced(base: float, final: float) -> None:
    for total in TOTALS:
        for step in range(-1, total + 2):
            want = _bits(_cosine_momentum_before(step, total, base, final))
            assert _bits(cosine_momentum(step, total, base, final)) == want, (step, total)
            info = StepInfo(step, 0, total, total, min(max(step / total, 0.0), 1.0), 0)
            assert _bits(cosine_schedule(info, base, final)) == want, (step, total)


@pytest.mark.parametrize("start,end", [(0.996, 1.0), (0.99, 1.0), (0.9995, 1.0), (0.9, 0.99)])
def test_the_time_budget_schedule_is_bitwise_the_formula_it_replaced(start: float, end: float) -> None:
    # Momentum pairs within a factor 2 of each other (every method's): end - start is exact, so the
    # old formula's value at progress 0 is exactly start, as cosine_between's is.
    for p in [0.0, 1.0, *(k / 997 for k in range(998)), *(1 / (k + 2) for k in range(500))]:
        info = StepInfo(3, 0, 10, 2**62, p, 0, time_based=True)
        assert _bits(cosine_schedule(info, start, end)) == _bits(_time_based_before(p, start, end)), p


def test_the_linear_probe_lr_factor_is_bitwise_the_formula_it_replaced() -> None:
    for total in TOTALS:
        for step in range(total):  # the probe's steps: 0 .. total - 1
            assert _bits(cosine_between(step, total, 1.0, 0.0)) == _bits(_linear_probe_before(step, total)), (step, total)
