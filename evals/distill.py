"""SimCLR v2's third step: distil a fine-tuned teacher into a student with the unlabelled images.

Protocol (Chen et al., Big Self-Supervised Models are Strong Semi-Supervised Learners, NeurIPS
2020, Sec. 2.3 "distillation via unlabeled examples"):

- Teacher: the encoder fine-tuned on the class-balanced ``fraction`` of the training labels
  (:func:`sslbench.evals.finetune.finetune_model`, the ``finetune`` protocol, including
  ``--from-projector-layer``). It is fixed: eval mode, no gradients.
- Student: the run's backbone architecture without projector layers (self-distillation: the
  student has the teacher's architecture "excluding the projection head"), plus a linear head
  initialised to zero. Its encoder starts from random weights (``student_init="random"``, seeded
  by ``seed``: the paper trains students from scratch) or from the self-supervised encoder
  (``"pretrained"``, cheaper on short budgets).
- Loss: the cross-entropy of the student's tempered predictions against the teacher's
  (:func:`distillation_loss`) on **every** training image, labels unused; with
  ``label_weight = 1 - alpha > 0`` the ground-truth cross-entropy of the labelled images of the
  batch is mixed in, ``(1 - a) * CE(labelled) + a * L_distill`` (the paper's default uses only the
  distillation loss). Teacher and student see the same augmented view.
- Optimisation and augmentation: as fine-tuning (SGD, Nesterov momentum 0.9, no weight decay,
  cosine to zero, random resized crop + flip), ``epochs`` passes over all training images and at
  least ``min_steps`` steps.
- Report: the student's test top-1 (and top-5 with >= 5 classes), and the teacher's, as
  ``distill_<fraction>_top1``, ``distill_<fraction>_top5``, ``distill_<fraction>_teacher_top1``.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sslbench.api import ImageSplit, UserError, autocast, check_fraction, module_device
from sslbench.evals.finetune import (
    CROP_SCALE,
    DEFAULT_BATCH_SIZE,
    DEFAULT_LR,
    DEFAULT_MIN_STEPS,
    OPTIMIZER_RECORD,
    FinetuneModel,
    _evaluate,
    finetune_steps,
    fraction_tag,
    label_subset,
    train_classifier,
)

DEFAULT_EPOCHS = 10
DEFAULT_TEMPERATURE = 1.0
STUDENT_INITS = ("random", "pretrained")


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = DEFAULT_TEMPERATURE) -> Tensor:
    """SimCLR v2's distillation loss (Chen et al. 2020b, Eq. 2), averaged over the batch:

        L = -1/B sum_i sum_y P_T(y | x_i; tau) log P_S(y | x_i; tau),  P(y | x; tau) = softmax(logits / tau)_y

    Args:
        student_logits: ``(B, C)``, differentiable.
        teacher_logits: ``(B, C)``, treated as constants (detached).
        temperature: tau > 0 (the paper uses 1).

    Returns:
        A scalar tensor (float32).
    """
    if student_logits.shape != teacher_logits.shape or student_logits.dim() != 2:
        raise ValueError(f"logits must both be (B, C), got {tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}")
    target = F.softmax(teacher_logits.detach().float() / temperature, dim=1)
    return -(target * F.log_softmax(student_logits.float() / temperature, dim=1)).sum(dim=1).mean()


def metric_name(fraction: float, kind: str = "top1") -> str:
    """``distill_10pct_top1``, ``distill_1pct_teacher_top1``: the label fraction is in the name."""
    return f"distill_{fraction_tag(fraction)}_{kind}"


def distill(
    teacher: nn.Module,
    student_encoder: nn.Module,
    train: ImageSplit,
    test: ImageSplit,
    *,
    fraction: float,
    image_size: int,
    epochs: int = DEFAULT_EPOCHS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    lr: float = DEFAULT_LR,
    temperature: float = DEFAULT_TEMPERATURE,
    label_weight: float = 0.0,
    seed: int = 0,
    device: torch.device | str | None = None,
    precision: str = "no",
    min_steps: int = DEFAULT_MIN_STEPS,
    crop_scale: tuple[float, float] = CROP_SCALE,
) -> dict[str, float]:
    """Train a copy of ``student_encoder`` plus a zero-initialised linear head to match
    ``teacher``'s predictions (logits ``(B, C)``) on all of ``train``; report test accuracy of
    student and teacher (see the module docstring). ``fraction`` names the teacher's label
    fraction and, with ``label_weight > 0``, selects the labelled images (the same subset as
    fine-tuning with this ``seed``). ``teacher`` and ``student_encoder`` are left untouched."""
    fraction = check_fraction(fraction)
    if epochs < 1 or batch_size < 1 or not lr > 0 or min_steps < 0 or not temperature > 0 or not 0.0 <= label_weight <= 1.0:
        raise UserError(
            "distillation needs epochs >= 1, batch_size >= 1, lr > 0, min_steps >= 0, temperature > 0 and "
            f"0 <= label_weight <= 1; got {epochs}, {batch_size}, {lr}, {min_steps}, {temperature}, {label_weight}"
        )
    if not isinstance(train, ImageSplit) or not isinstance(test, ImageSplit):
        raise UserError("distillation needs in-memory splits; raise max_memory_gb or use a smaller data set")
    n = len(train)
    if n < 2:
        raise UserError(f"distillation needs at least 2 training images, got {n}")
    dev = torch.device(device) if device is not None else module_device(teacher)
    teacher = teacher.to(dev).eval()
    with torch.no_grad():
        n_classes = teacher(torch.zeros(2, 3, image_size, image_size, device=dev)).shape[1]
    student = FinetuneModel(copy.deepcopy(student_encoder).to(dev), n_classes, image_size=image_size)
    images = train.images.to(dev)
    labels = train.labels.to(dev)
    labelled = torch.zeros(n, dtype=torch.float32, device=dev)
    labelled[label_subset(train, fraction, seed)[1].to(dev)] = 1.0

    def loss_fn(logits: Tensor, idx: Tensor, x: Tensor) -> Tensor:
        with torch.no_grad(), autocast(dev, precision):
            target = teacher(x)
        loss = distillation_loss(logits, target, temperature)
        if label_weight > 0:
            mask = labelled[idx]
            ce = (F.cross_entropy(logits, labels[idx], reduction="none") * mask).sum() / mask.sum().clamp_min(1.0)
            loss = (1.0 - label_weight) * loss + label_weight * ce
        return loss

    train_classifier(
        student,
        images,
        loss_fn,
        steps=finetune_steps(n, epochs=epochs, batch_size=batch_size, min_steps=min_steps),
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        image_size=image_size,
        precision=precision,
        crop_scale=crop_scale,
        what="distillation",
    )
    acc = _evaluate(student, test, image_size, dev, precision)
    teacher_acc = _evaluate(teacher, test, image_size, dev, precision)
    out = {metric_name(fraction, k): v for k, v in acc.items()}
    out[metric_name(fraction, "teacher_top1")] = teacher_acc["top1"]
    return out


def distill_protocol(
    *,
    fraction: float,
    n_labelled: int,
    n_images: int,
    student_init: str,
    epochs: int = DEFAULT_EPOCHS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    lr: float = DEFAULT_LR,
    temperature: float = DEFAULT_TEMPERATURE,
    label_weight: float = 0.0,
    min_steps: int = DEFAULT_MIN_STEPS,
    seed: int = 0,
    teacher: dict[str, Any],
) -> dict[str, Any]:
    """A self-describing record of the distillation protocol (``teacher``: the fine-tuning
    protocol that made the teacher), for result rows."""
    return {
        "name": "distill",
        "label_fraction": check_fraction(fraction),
        "labelled_images": n_labelled,
        "unlabelled_images": n_images,
        "student": "the run's backbone (no projector layers) + linear head, zero init",
        "student_init": student_init,
        "loss": "cross-entropy to the teacher's softmax(logits / T) on every training image"
        + (f", mixed with ground-truth cross-entropy on the labelled ones (weight {label_weight})" if label_weight else ""),
        "temperature": temperature,
        "label_weight": label_weight,
        **OPTIMIZER_RECORD,
        "lr": lr,
        "epochs": epochs,
        "min_steps": min_steps,
        "steps": finetune_steps(n_images, epochs=epochs, batch_size=batch_size, min_steps=min_steps),
        "batch_size": batch_size,
        "seed": seed,
        "augmentation": "random resized crop + horizontal flip (as fine-tuning); teacher and student see the same view",
        "teacher": teacher,
        "reference": "Chen et al. 2020b (SimCLR v2), Sec. 2.3",
    }
