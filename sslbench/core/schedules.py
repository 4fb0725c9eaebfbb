"""The cosine schedule, written once: a pure function of how far along the schedule is.

Every cosine in sslbench goes through :func:`cosine_between`: the lr after its warm-up
(:func:`sslbench.core.optim.lr_at`), the momentum of BYOL, MoCo v3 and DINO
(:func:`sslbench.core.momentum.cosine_momentum`, :func:`sslbench.core.method.cosine_schedule`), the weight
decay with ``weight_decay_end`` (:func:`sslbench.train.run_setup.make_schedules`) and the linear probe's
lr (``evals/linear.py``). A resumed run therefore gets the same values as an unbroken one.
"""

from __future__ import annotations

import math

__all__ = ["cosine_between"]


def cosine_between(done: float, total: float, start: float, end: float) -> float:
    """``start`` at ``done <= 0``, ``end`` at ``done >= total``, and in between
    ``end - (end - start) * (cos(pi * done / total) + 1) / 2`` (half a cosine, monotone).

    ``done`` / ``total`` is a step count over the schedule's length (``step, total_steps``), or a
    fraction already divided out (``progress, 1.0``). Both endpoints are exact, whatever the
    rounding of ``end - start``. The angle is ``pi * done / total`` in that order: a caller that
    has the fraction passes it with ``total = 1.0`` (``pi * p / 1.0`` is exactly ``pi * p``),
    since ``pi * (k / K)`` and ``pi * k / K`` can differ in the last bit.
    """
    if done <= 0:
        return start
    if done >= total:
        return end
    return end - (end - start) * (math.cos(math.pi * done / total) + 1.0) / 2.0
