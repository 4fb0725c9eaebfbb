"""Online linear probe: a classifier on detached encoder features, trained alongside SSL training.

Opt-in with ``online_probe: true`` (``--set online_probe=true``). It gives a cheap accuracy curve
during training; it is *not* a replacement for the linear-probe protocol of
:mod:`sslbench.evals.linear` (which fits on frozen features with a validation grid).

How it works (all on the main process, after each optimizer step):

- Features: the encoder encodes the step's first augmented view once more, in eval mode (BatchNorm
  uses its running statistics and updates nothing) and under ``torch.no_grad``, so the probe has no
  effect on the SSL model: no gradient reaches the encoder and no buffer changes. This costs one
  extra forward pass of the local batch per step; it works for every method whatever its
  ``training_step`` does with the encoder.
- Head: ``BatchNorm1d(affine=False) -> Linear(D, C)`` (a non-affine BatchNorm in front of the
  linear layer as in MAE's linear probe, so one learning rate fits any feature scale while the
  encoder changes), trained by its **own** SGD optimizer (lr 0.1, momentum 0.9, no weight decay,
  constant lr) on the cross-entropy with the batch's training labels. The SSL optimizer never sees
  the probe's parameters.
- Distributed runs: the probe is a plain module on the main process; it is not wrapped by DDP and
  never synchronised. It is trained on the main process's share of each global batch only
  (1/world of the images) and evaluated there.
- Evaluation: at the end of every epoch (and after the last step) the probe's top-1 accuracy on
  the test split, with test features from :func:`sslbench.evaluation.features.extract_features`, is
  written to ``metrics.jsonl`` as ``{"step", "epoch", "online_probe_top1"}``.
- Resuming: the probe's weights are not checkpointed; a resumed run starts a fresh probe.
- A test split too large for memory (a file-backed split) is not evaluated (a note is printed);
  the probe still trains.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sslbench.api import ImageSplit, autocast, eval_mode, extract_features, feature_dim
from sslbench.evals.knn import topk_accuracy

PROBE_LR = 0.1
PROBE_MOMENTUM = 0.9


class OnlineProbe:
    """A linear head on detached features with its own optimizer.

    Args:
        num_features: feature dimension ``D`` of the encoder.
        num_classes: ``C``.
        image_size: evaluation resolution (for :func:`extract_features`).
        train_labels: int64 labels of the whole training split, indexed by sample index
            (:meth:`step` takes the batch's indices); kept on ``device``.
        test_split: the in-memory test split to evaluate on (``None``: no evaluation).
        device: where the head lives (the training device).
        precision: autocast of the extra forward pass and of the test features (``no``, ``bf16``,
            ``fp16``).
    """

    def __init__(
        self,
        num_features: int,
        num_classes: int,
        *,
        image_size: int,
        train_labels: Tensor | None = None,
        test_split: ImageSplit | None = None,
        device: torch.device | str = "cpu",
        precision: str = "no",
        lr: float = PROBE_LR,
        momentum: float = PROBE_MOMENTUM,
    ) -> None:
        self.device = torch.device(device)
        self.image_size = image_size
        self.precision = precision
        self.train_labels = None if train_labels is None else train_labels.to(self.device, torch.int64)
        self.test_split = test_split
        self.head = nn.Sequential(nn.BatchNorm1d(num_features, affine=False), nn.Linear(num_features, num_classes)).to(self.device)
        self.optimizer = torch.optim.SGD(self.head.parameters(), lr=lr, momentum=momentum)
        self.last_top1: float | None = None

    @classmethod
    def for_run(cls, cfg: Any, encoder: nn.Module, train_split: Any, device: torch.device, precision: str) -> OnlineProbe:
        """The probe of a training run: its classes, labels and test split (loaded here)."""
        from sslbench.api import load_split

        loaded = load_split(cfg.data, "test", cfg.image_size, cache_dir=cfg.cache_dir, max_memory_gb=cfg.max_memory_gb)
        test = loaded if isinstance(loaded, ImageSplit) else None
        if test is None:
            print("note: the online probe is not evaluated on a test split that does not fit in memory", file=sys.stderr)
        return cls(
            feature_dim(encoder),
            len(train_split.classes),
            image_size=cfg.image_size,
            train_labels=train_split.labels,
            test_split=test,
            device=device,
            precision="no" if precision not in ("bf16", "fp16") else precision,
        )

    def features(self, encoder: nn.Module, images: Tensor) -> Tensor:
        """Detached float32 features of normalised ``images`` (B, 3, S, S): eval mode, no grad."""
        with eval_mode(encoder), torch.no_grad(), autocast(images.device, self.precision):
            out: Tensor = encoder(images)
        return out.flatten(1).float().detach()

    def update(self, features: Tensor, labels: Tensor) -> Tensor | None:
        """One SGD step of the head on detached ``features`` (B, D) and ``labels`` (B,); returns
        the detached scalar loss on the head's device, not read back, so that the training step
        does not wait for the device (``None`` for a batch of one, which BatchNorm cannot
        normalise)."""
        if features.shape[0] < 2:
            return None
        self.head.train()
        with torch.enable_grad():
            logits = self.head(features.detach().to(self.device, torch.float32))
            loss = F.cross_entropy(logits, labels.to(self.device, torch.long))
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        return loss.detach()

    def step(self, encoder: nn.Module, view: Tensor, index: Tensor) -> Tensor | None:
        """Update on one augmented view of the batch whose training-split indices are ``index``."""
        if self.train_labels is None:
            raise ValueError("OnlineProbe.step needs train_labels")
        labels = self.train_labels[index.to(self.device, non_blocking=True)]
        return self.update(self.features(encoder, view), labels)

    @torch.no_grad()
    def evaluate(self, encoder: nn.Module, test_split: ImageSplit | None = None) -> float:
        """Top-1 accuracy (percent) of encoder + probe on ``test_split`` (default: the run's)."""
        split = test_split if test_split is not None else self.test_split
        if split is None:
            raise ValueError("OnlineProbe.evaluate needs a test split")
        feats = extract_features(encoder, split.images, image_size=self.image_size, precision=self.precision)
        with eval_mode(self.head):
            logits = self.head(feats.to(self.device))
        return topk_accuracy(logits, split.labels.to(self.device), (1,))[1]

    def after_step(self, encoder: nn.Module, view: Tensor, index: Tensor, done: int, sched: Any) -> dict[str, float] | None:
        """The trainer's hook: update on the step's first view; at the end of an epoch (or of
        training) evaluate and return the ``metrics.jsonl`` record, else ``None``."""
        self.step(encoder, view, index)
        if self.test_split is None or (done % sched.steps_per_epoch and done != sched.total_steps):
            return None
        self.last_top1 = self.evaluate(encoder)
        return {"step": done, "epoch": round(done / sched.steps_per_epoch, 4), "online_probe_top1": self.last_top1}
