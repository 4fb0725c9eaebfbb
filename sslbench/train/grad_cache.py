"""Gradient cache: the exact gradient of a large batch's loss in the memory of a small chunk.

Gao, Zhang, Han, Callan. "Scaling Deep Contrastive Learning Batch Size under Memory Limited
Setup." RepL4NLP 2021. A contrastive loss couples every sample of the batch, so plain gradient
accumulation over micro-batches changes the objective (fewer negatives). The gradient cache keeps
the objective and trades memory for one extra forward pass:

1. compute the per-sample embeddings of the whole batch **without** an autograd graph, ``chunk``
   samples at a time (``method.embed``);
2. compute the loss on the full batch from those embeddings (``method.loss_from_embeddings``)
   and its gradient ``G = dL/d emb`` (the trainer's usual ``accelerator.backward(loss)``; the
   embeddings are a leaf tensor, so this touches no model parameter);
3. recompute each chunk **with** a graph and backpropagate its slice of ``G``
   (``torch.autograd.backward(emb_chunk, G_chunk)``); parameter gradients accumulate over chunks.

By the chain rule the accumulated gradient is ``dL/d theta`` of the full batch. Details that keep it
exact:

* the RNG state (CPU and the training device) is saved before each chunk's first forward and
  restored before its recomputation, so dropout and drop-path draw the same masks twice;
* buffers (BatchNorm running statistics, ``num_batches_tracked``) are restored after the
  recomputation to their values after step 1, so each chunk updates them once;
* under DDP every chunk but the last runs in ``no_sync`` (gradients are all-reduced once, after the
  last chunk), and the embeddings go through the DDP-wrapped module so its hooks fire;
* the forward passes run through the same (Accelerate autocast) module as the normal training
  step and the loss runs under ``accelerator.autocast()``;
* the recomputation calls ``embed(batch, targets=False)``: a method whose embeddings include
  no-gradient targets (BYOL's target network, MoCo v3's momentum encoder) then returns only the
  columns that carry gradients, which ``embed`` puts first along dim 1, and skips the target
  networks (their slice of ``dL/d emb`` reaches no parameter): one target forward per sample and
  step instead of two. The RNG replay stays exact: the online part draws first. Methods without
  targets return all columns either way.

**BatchNorm caveat.** A chunked forward normalises each chunk with that chunk's batch statistics
(like per-GPU BatchNorm), so with BatchNorm in training mode the gradient is that of a slightly
different model, not the full-batch one; it is exact for batch-independent normalisation
(LayerNorm, GroupNorm: ViTs, ``--set backbone_kwargs.norm_layer=groupnorm1`` for timm ResNets) or
BatchNorm in eval mode, and whenever ``chunk`` >= the per-process batch. ``chunk`` counts samples
of the per-process batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import Tensor, nn

from sslbench.core.errors import UserError
from sslbench.core.method import Batch, Method

__all__ = ["GradCache", "make_grad_cache"]


def _rng_state(device: torch.device) -> tuple[Tensor, Tensor | None]:
    cpu = torch.get_rng_state()
    if device.type == "cuda":
        return cpu, torch.cuda.get_rng_state(device)
    return cpu, None


def _set_rng_state(state: tuple[Tensor, Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


class GradCache:
    """One training step's embeddings, loss and chunked backward (see the module docstring).

    Args:
        embed_fn: ``batch -> emb`` with ``emb`` of shape (B, ...) for a :class:`Batch` of B
            samples; in the trainer the DDP/Accelerate-wrapped module's embedding forward.
        loss_fn: ``emb -> (loss, logs)`` on the whole (per-process) batch.
        module: the module whose buffers the recomputation must not update twice.
        chunk: samples per chunk (>= 1).
        no_sync: a zero-argument callable returning the context in which gradients are not
            all-reduced (``lambda: accelerator.no_sync(model)``); default: no DDP.
        autocast: a zero-argument callable returning the loss's autocast context.
        online_fn: ``batch -> emb[:, :k]``, the gradient-carrying first ``k`` columns of
            ``embed_fn(batch)`` without computing the others; used by the recomputation when given.

    Use: ``loss, logs = gc.forward(batch)``; ``loss.backward()`` (or ``accelerator.backward``);
    ``gc.backward()``. After ``backward`` the parameters' ``.grad`` hold the full-batch gradient.
    """

    def __init__(
        self,
        embed_fn: Callable[[Batch], Tensor],
        loss_fn: Callable[[Tensor], tuple[Tensor, dict[str, Tensor]]],
        module: nn.Module,
        chunk: int,
        *,
        no_sync: Callable[[], AbstractContextManager[Any]] = contextlib.nullcontext,
        autocast: Callable[[], AbstractContextManager[Any]] = contextlib.nullcontext,
        online_fn: Callable[[Batch], Tensor] | None = None,
    ) -> None:
        if chunk < 1:
            raise UserError(f"gradient-cache chunk must be >= 1, got {chunk}")
        self.embed_fn = embed_fn
        self.loss_fn = loss_fn
        self.module = module
        self.chunk = chunk
        self.no_sync = no_sync
        self.autocast = autocast
        self.online_fn = online_fn
        self._reset()

    def _reset(self) -> None:
        self._batch: Batch | None = None
        self._bounds: list[tuple[int, int]] = []
        self._rng: list[tuple[Tensor, Tensor | None]] = []
        self._rng_after: tuple[Tensor, Tensor | None] | None = None
        self._buffers: list[tuple[Tensor, Tensor]] = []
        self._emb: Tensor | None = None

    def forward(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        """Steps 1 and 2: embeddings without a graph, chunk by chunk, then the full-batch loss.

        ``batch``: B samples (views V x (B, ...)). Returns ``(loss, logs)`` with ``loss``
        differentiable with respect to the cached embeddings only."""
        self._reset()
        b = batch.views[0].shape[0]
        device = batch.views[0].device
        self._batch = batch
        self._bounds = [(i, min(i + self.chunk, b)) for i in range(0, b, self.chunk)]
        parts = []
        with torch.no_grad():
            for i, j in self._bounds:
                self._rng.append(_rng_state(device))
                parts.append(self.embed_fn(batch.slice(i, j)))
        self._rng_after = _rng_state(device)
        # Buffer values after this pass: the recomputation's updates are undone in backward().
        self._buffers = [(buf, buf.detach().clone()) for buf in self.module.buffers()]
        emb = torch.cat(parts).detach().requires_grad_(True)
        if emb.shape[0] != b:
            raise RuntimeError(f"embed() must return per-sample embeddings (B={b}, ...), got shape {tuple(emb.shape)}")
        self._emb = emb
        with self.autocast():
            return self.loss_fn(emb)

    def backward(self) -> None:
        """Step 3: recompute each chunk with a graph and backpropagate its slice of dL/d emb."""
        if self._emb is None or self._batch is None:
            raise RuntimeError("GradCache.backward() needs forward() first")
        grad = self._emb.grad
        if grad is None:
            raise RuntimeError("GradCache.backward(): call backward on the loss from forward() first")
        batch = self._batch
        device = batch.views[0].device
        last = len(self._bounds) - 1
        for c, (i, j) in enumerate(self._bounds):
            _set_rng_state(self._rng[c], device)
            with self.no_sync() if c < last else contextlib.nullcontext():
                if self.online_fn is not None:  # the gradient-carrying columns only: no target networks
                    emb = self.online_fn(batch.slice(i, j))
                    torch.autograd.backward(emb, grad[i:j, : emb.shape[1]].to(emb.dtype))
                else:
                    emb = self.embed_fn(batch.slice(i, j))
                    torch.autograd.backward(emb, grad[i:j].to(emb.dtype))
        assert self._rng_after is not None
        _set_rng_state(self._rng_after, device)
        with torch.no_grad():
            for buf, saved in self._buffers:
                buf.copy_(saved)
        self._reset()


def make_grad_cache(chunk: int, model: nn.Module, method: Method, accelerator: Any) -> GradCache:
    """The trainer's gradient cache: ``model`` is the prepared (DDP/autocast) module whose
    ``forward(batch, embed=True)`` returns ``method.embed(batch)``; raises a :class:`UserError`
    for a method whose ``supports_grad_cache`` is False."""
    if not type(method).supports_grad_cache:
        from sslbench.core.registry import METHODS

        able = [name for name, cls in METHODS.items() if cls.supports_grad_cache]
        raise UserError(
            f"--grad-cache-chunk needs a method with embed() and loss_from_embeddings(); {type(method).name or type(method).__name__} "
            f"does not support the gradient cache. Methods that do: {', '.join(able) or 'none'}"
        )
    return GradCache(
        lambda batch: model(batch, embed=True),
        method.loss_from_embeddings,
        method,
        chunk,
        no_sync=lambda: accelerator.no_sync(model),
        autocast=accelerator.autocast,
        online_fn=lambda batch: model(batch, embed=True, targets=False),
    )
