"""Counter-based randomness for the batched augmentations (re-exported by :mod:`sslbench.core.augment`).

:func:`counter_uniform` is a vectorised splitmix64 hash of ``(seed, epoch, sample index, view,
column)``: a sample's random numbers do not depend on the batch it sits in, on the number of
processes, or on any RNG state, so a resumed run draws exactly the numbers of an unbroken one.
"""

from __future__ import annotations

import torch
from torch import Tensor

_MASK64 = (1 << 64) - 1


def _signed64(v: int) -> int:
    """The int64 with the same 64 low bits as ``v``."""
    v &= _MASK64
    return v - (1 << 64) if v >= (1 << 63) else v


_GAMMA = _signed64(0x9E3779B97F4A7C15)  # splitmix64 increment (golden ratio)
_MIX1 = _signed64(0xBF58476D1CE4E5B9)
_MIX2 = _signed64(0x94D049BB133111EB)


def _mix64_int(z: int) -> int:
    """splitmix64's finaliser on a Python int (exact, unsigned 64-bit)."""
    z &= _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def _shr(z: Tensor, k: int) -> Tensor:
    """Logical right shift of int64 bit patterns (torch's ``>>`` is arithmetic on int64)."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def _mix64(z: Tensor) -> Tensor:
    """splitmix64's finaliser on int64 tensors; int64 multiplication wraps modulo 2**64."""
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    return z ^ _shr(z, 31)


def _stream_key(seed: int, epoch: int, view: int) -> int:
    """Hash the per-call scalars into one 64-bit key (as a signed int64 value)."""
    h = 0
    for v in (seed, epoch, view):
        h = _mix64_int((h ^ (v & _MASK64)) + 0x9E3779B97F4A7C15)
    return _signed64(h)


def counter_uniform(seed: int, epoch: int, index: Tensor, view: int, n: int) -> Tensor:
    """``(B, n)`` float32 uniforms in [0, 1), a pure function of ``(seed, epoch, index[b], view, column)``.

    A vectorised splitmix64: ``(seed, epoch, view)`` are hashed into a key on the host, each
    sample's stream state is ``mix64((index ^ key) + gamma)`` and column ``c`` is
    ``mix64(state + (c + 1) * gamma)``; the top 24 bits become the float. Computed with int64
    ops on ``index.device``, independent of any RNG state and of the other rows; column ``c`` is
    the same whatever ``n`` is.
    """
    if index.dim() != 1:
        raise ValueError(f"index must be 1-D (B,), got shape {tuple(index.shape)}")
    index = index.to(torch.int64)
    state = _mix64((index ^ _stream_key(seed, epoch, view)) + _GAMMA)
    cols = (torch.arange(1, n + 1, device=index.device, dtype=torch.int64) * _GAMMA).unsqueeze(0)
    bits = _shr(_mix64(state.unsqueeze(1) + cols), 40)  # top 24 bits
    return bits.to(torch.float32) * (1.0 / (1 << 24))
