"""Host-memory allocator tuning for training on the CPU.

A CPU training step allocates and frees activations of tens of megabytes (a narrow ResNet-18 at
32 px, batch 256: 512 views x 16 channels x 32 x 32 fp32 = 33.5 MB per feature map). glibc's
malloc serves blocks above its mmap threshold (which adapts up to 32 MB on 64-bit) with a fresh
``mmap`` and ``munmap``s them on ``free``, so every step page-faults its activations in again
and spends that time in the kernel. With :func:`keep_freed_memory` those blocks come from the
heap and are reused from step to step. (Measurements: leaderboards/speed.md, 2026-11-23.)

The cost: memory freed by the process stays in its heap for reuse instead of going back to the
operating system, so the resident size stays at its peak until the process exits. Turn it off
with ``--set keep_freed_memory=false``.
"""

from __future__ import annotations

import ctypes
import platform

__all__ = ["keep_freed_memory"]

_M_TRIM_THRESHOLD = -1  # mallopt parameters from glibc's <malloc.h>
_M_MMAP_MAX = -4
_TRIM_THRESHOLD = 2**31 - 1  # the largest int mallopt takes: in effect, never trim the heap's top


def keep_freed_memory() -> bool:
    """Make glibc's malloc serve every block from its heap and keep freed memory for reuse.

    Sets ``M_MMAP_MAX=0`` (no block gets its own ``mmap``) and a huge ``M_TRIM_THRESHOLD`` (the
    heap's free top is not returned). Process-wide and lasting; inherited by forked DataLoader
    workers. Returns whether it applied: False on a C library other than glibc (macOS, Windows,
    musl), where nothing changes.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    no_mmap: bool = mallopt(_M_MMAP_MAX, 0) == 1  # mallopt comes from ctypes: untyped
    no_trim: bool = mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD) == 1
    return no_mmap and no_trim
