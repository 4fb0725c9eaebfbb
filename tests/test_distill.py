"""SimCLR v2 distillation: the loss equals its formula, the student learns the teacher's task
from unlabelled images, the labelled-loss mix is the fine-tuning loss at weight 1, nothing given
is modified, and the protocol runs from `sslbench eval` with the teacher shared with `finetune`."""

import math

import pytest
import torch
from test_finetune import _one_thread, assert_same_state, colour_split, snapshot, tiny_encoder  # noqa: F401 (autouse: one thread)

from sslbench.commands.cli import main
from sslbench.core.errors import UserError
from sslbench.evals.distill import distill, distillation_loss, metric_name
from sslbench.evals.finetune import FinetuneModel, finetune, finetune_model
from sslbench.results import read_rows


@pytest.mark.parametrize("temperature", [1.0, 0.5, 3.0])
def test_distillation_loss_is_the_papers_formula_and_only_the_student_gets_gradients(temperature):
    g = torch.Generator().manual_seed(0)
    student = torch.randn(6, 5, generator=g, dtype=torch.float64).requires_grad_()
    teacher = torch.randn(6, 5, generator=g, dtype=torch.float64).requires_grad_()
    loss = distillation_loss(student, teacher, temperature)
    expected = 0.0
    for i in range(6):
        zt = [math.exp(v / temperature) for v in teacher[i].tolist()]
        zs = [math.exp(v / temperature) for v in student[i].tolist()]
        expected -= sum(t / sum(zt) * math.log(s / sum(zs)) for t, s in zip(zt, zs))
    assert loss.item() == pytest.approx(expected / 6, rel=1e-5)
    loss.backward()
    assert teacher.grad is None and student.grad is not None
    # the minimum over the student is the teacher itself: gradient zero there
    at_teacher = teacher.detach().clone().requires_grad_()
    distillation_loss(at_teacher, teacher, temperature).backward()
    assert at_teacher.grad.abs().max() < 1e-6
    with pytest.raises(ValueError, match=r"\(B, C\)"):
        distillation_loss(student, teacher[:, :4])


def test_student_from_scratch_learns_the_teachers_task_without_labels_and_nothing_given_changes():
    train = colour_split([16] * 4, seed=0)
    test = colour_split([8] * 4, seed=1, id_offset=1000)
    teacher, tuned = finetune_model(tiny_encoder(0), train, test, fraction=0.25, image_size=32, epochs=1, batch_size=16, lr=0.05, min_steps=40)
    assert tuned["finetune_25pct_top1"] >= 75.0, tuned
    student = tiny_encoder(1)
    before_t, before_s = snapshot(teacher), snapshot(student)
    kwargs = {"fraction": 0.25, "image_size": 32, "epochs": 1, "batch_size": 16, "lr": 0.05, "min_steps": 40, "seed": 0}
    # The teacher only knows 4 labels per class; the student sees all 64 images and no label.
    train_no_labels = type(train)(train.images, torch.zeros_like(train.labels), train.classes)
    out = distill(teacher, student, train_no_labels, test, **kwargs)
    assert set(out) == {metric_name(0.25, "top1"), metric_name(0.25, "teacher_top1")} == {"distill_25pct_top1", "distill_25pct_teacher_top1"}
    assert out["distill_25pct_teacher_top1"] == tuned["finetune_25pct_top1"]
    assert out["distill_25pct_top1"] >= 75.0, out  # chance 25%; a random student alone would sit there
    assert_same_state(teacher, before_t)
    assert_same_state(student, before_s)
    assert not teacher.training
    assert distill(teacher, student, train_no_labels, test, **kwargs) == out  # deterministic


def test_label_weight_one_is_fine_tuning_of_the_student():
    """label_weight=1 leaves only the ground-truth loss on the labelled images: at fraction 1 that
    is exactly fine-tuning the student encoder (same batches, views and steps)."""
    train = colour_split([8] * 4, seed=0)
    test = colour_split([4] * 4, seed=1, id_offset=1000)
    zero_teacher = FinetuneModel(tiny_encoder(0), 4, image_size=32)  # zero head: uniform predictions
    kwargs = {"fraction": 1.0, "image_size": 32, "epochs": 2, "batch_size": 16, "lr": 0.05, "min_steps": 0, "seed": 3}
    got = distill(zero_teacher, tiny_encoder(1), train, test, label_weight=1.0, **kwargs)
    ref = finetune(tiny_encoder(1), train, test, **kwargs)
    assert got["distill_100pct_top1"] == pytest.approx(ref["finetune_100pct_top1"]), (got, ref)
    # ... and at weight 0 the labels are not used: distilling a uniform teacher learns nothing
    flat = distill(zero_teacher, tiny_encoder(1), train, test, label_weight=0.0, **kwargs)
    assert flat["distill_100pct_top1"] == 25.0, flat  # all-zero logits: argmax is class 0 everywhere


@pytest.mark.parametrize(
    "bad, message",
    [({"temperature": 0.0}, "temperature > 0"), ({"label_weight": 1.5}, "label_weight <= 1"), ({"fraction": 0.0}, "label fraction")],
)
def test_bad_distillation_settings_are_user_errors(bad, message):
    train = colour_split([4] * 2, seed=0)
    teacher = FinetuneModel(tiny_encoder(0), 2, image_size=32)
    kwargs = {"fraction": 1.0, "image_size": 32, "epochs": 1, "batch_size": 4, "min_steps": 0, **bad}
    with pytest.raises(UserError, match=message):
        distill(teacher, tiny_encoder(1), train, train, **kwargs)


@pytest.mark.slow
def test_eval_cli_distills_with_the_finetune_teacher_and_a_rerun_of_compare_reuses_rows(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SSLBENCH_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "cmp"
    argv = [
        "compare",
        "--methods",
        "simclr",
        "--steps",
        "2",
        "--batch-size",
        "32",
        "--output",
        str(out),
        "--quiet",
        "--set",
        "backbone_kwargs.channels=8,16,32,64",
        "--set",
        "train_subset=64",
        "--protocol",
        "finetune,distill",
        "--label-fractions",
        "0.5",
        "--finetune-min-steps",
        "3",
        "--finetune-epochs",
        "1",
        "--distill-epochs",
        "1",
        "--finetune-batch-size",
        "32",
    ]
    assert main(argv) == 0
    rows = read_rows(out / "results.jsonl")
    by_name = {r["protocol"]["name"]: r for r in rows}
    assert set(by_name) == {"finetune", "distill"} and len(rows) == 2
    d = by_name["distill"]
    assert d["label_fraction"] == 0.5
    assert d["protocol"]["student_init"] == "random" and d["protocol"]["temperature"] == 1.0
    assert d["protocol"]["teacher"]["name"] == "finetune" and d["protocol"]["unlabelled_images"] > d["protocol"]["labelled_images"]
    # one teacher for both rows: the distill row's teacher accuracy is the finetune row's
    assert d["metrics"]["distill_50pct_teacher_top1"] == by_name["finetune"]["metrics"]["finetune_50pct_top1"]
    capsys.readouterr()
    assert main(argv) == 0  # the re-run reuses both rows: nothing scored or stored again
    assert len(read_rows(out / "results.jsonl")) == 2
    assert "reusing its stored rows" in capsys.readouterr().err
    # another distillation setting scores only the distill row again
    assert main([*argv, "--distill-student-init", "pretrained"]) == 0
    rows = read_rows(out / "results.jsonl")
    assert [r["protocol"]["name"] for r in rows] == ["finetune", "distill", "distill"]
    assert rows[-1]["protocol"]["student_init"] == "pretrained"


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--distill-temperature", "0"], "--distill-temperature must be > 0"),
        (["--distill-label-weight", "2"], r"--distill-label-weight must be in \[0, 1\]"),
        (["--distill-epochs", "0"], "--distill-epochs must be >= 1"),
        (["--protocol", "distil"], "did you mean 'distill'"),
    ],
)
def test_eval_rejects_bad_distillation_options_in_one_line(tmp_path, capsys, extra, message):
    import re

    assert main(["eval", str(tmp_path), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(message, err[0]), err
