"""A FIFO memory bank of keys gathered from every process (MoCo's queue; NNCLR's support set).

The bank's two tensors are buffers of the module that owns it, registered under names the owner
chooses (``queue`` and ``queue_ptr`` for MoCo), so they follow the owner through ``.to()``,
checkpoints and ``state_dict`` like any other buffer and keep the owner's key names.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sslbench.core.dist import gather_no_grad

__all__ = ["MemoryBank"]


class MemoryBank:
    """A FIFO of ``size`` rows of ``dim`` features held in ``owner``'s buffers ``name`` and
    ``name + '_ptr'``; starts as random unit vectors (MoCo's code) or zeros.

    :meth:`push` gathers the keys of every process in rank order (so every process's bank stays
    identical) and writes them over the oldest rows, wrapping around the end.
    """

    def __init__(self, owner: nn.Module, name: str, size: int, dim: int, *, init: str = "random_unit") -> None:
        if size < 1 or dim < 1:
            raise ValueError(f"a memory bank needs size >= 1 and dim >= 1, got {size}, {dim}")
        rows = F.normalize(torch.randn(size, dim), dim=1) if init == "random_unit" else torch.zeros(size, dim)
        owner.register_buffer(name, rows)
        owner.register_buffer(f"{name}_ptr", torch.zeros((), dtype=torch.long))
        self._owner = [owner]  # a list: not a submodule, no reference cycle through _modules
        self.name = name

    @property
    def rows(self) -> Tensor:
        """The bank (size, dim), oldest row at :attr:`ptr`."""
        return self._owner[0].get_buffer(self.name)

    @property
    def ptr(self) -> Tensor:
        """The index of the oldest row (a 0-d long tensor)."""
        return self._owner[0].get_buffer(f"{self.name}_ptr")

    @torch.no_grad()
    def push(self, keys: Tensor) -> None:
        """Write the keys (n, dim) of every process over the oldest rows and advance the pointer.
        With more keys than the bank holds, only the newest ``size`` are kept."""
        keys = gather_no_grad(keys)
        bank, ptr = self.rows, self.ptr
        size = bank.shape[0]
        keys = keys[-size:]
        idx = (ptr + torch.arange(keys.shape[0], device=keys.device)) % size
        bank.index_copy_(0, idx, keys.to(bank.dtype))
        ptr.copy_((ptr + keys.shape[0]) % size)

    @torch.no_grad()
    def nearest(self, queries: Tensor) -> Tensor:
        """NNCLR's ``NN(z, Q)``: for each query (n, dim) the bank row (n, dim) of the largest cosine
        similarity (Dwibedi et al. 2021, Eq. 1); the bank holds unit rows, so that is the row
        maximising ``q . row``. Detached."""
        sims = F.normalize(queries.detach().float(), dim=1) @ self.rows.float().T  # (n, size)
        return self.rows[sims.argmax(dim=1)]
