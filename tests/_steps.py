"""Build the contract's inputs by hand: a :class:`~sslbench.core.method.Batch` of given views and a
:class:`~sslbench.core.method.StepInfo` of a given step (the helpers of :mod:`sslbench.testing`)."""

from __future__ import annotations

from sslbench.testing import make_batch as batch
from sslbench.testing import step_info as info

__all__ = ["batch", "info"]
