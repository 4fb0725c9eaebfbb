"""sslbench.testing on a method that is not in sslbench's registry (tests/_kit_methods.py): the
checks pass on a sound plugin class, given as a class or as "module:Class", and catch broken
variants with a message that says what to fix. The checks that start new processes are slow."""

from __future__ import annotations

import pytest
import torch
from _kit_methods import FlippedGradient, KitConfig, KitMethod, LocalCenter, NaNLoss, PythonCounter

from sslbench.core.method import Batch, Method
from sslbench.core.registry import METHODS, register_method
from sslbench.testing import (
    check_loss_decreases,
    check_method,
    check_no_per_process_state,
    check_resume_equals_unbroken,
    check_training_step,
    check_two_processes_equal_one,
    resolve_method,
)


def test_a_plugin_class_passes_every_check_in_one_process():
    assert "_kit_methods.KitMethod" not in METHODS and KitMethod.name == ""
    report = check_method(KitMethod, processes=False)
    assert report == {
        "check_builds": "ok",
        "check_training_step": "ok",
        "check_momentum": "ok",
        "check_gradient_cache": "not applicable: KitMethod does not support the gradient cache",
        "check_loss_decreases": "ok",
        "check_trains": "ok",
        "check_views_of_several_sizes": "ok",
    }
    assert "_kit_methods.KitMethod" not in METHODS  # the checks in one process register nothing


def test_a_method_is_named_by_class_import_path_or_registered_name(monkeypatch):
    ref = resolve_method("_kit_methods:KitMethod")
    assert (ref.cls, ref.name, ref.path, ref.registered) == (KitMethod, "_kit_methods.KitMethod", "_kit_methods:KitMethod", False)
    monkeypatch.setattr(METHODS, "_items", dict(METHODS._items))  # as a third-party package registers it, for this test only
    monkeypatch.setattr(KitMethod, "name", "")
    register_method("kit")(KitMethod)
    ref = resolve_method("kit")
    assert (ref.cls, ref.name, ref.path, ref.registered) == (KitMethod, "kit", "_kit_methods:KitMethod", True)
    check_training_step("kit")


def test_a_nan_loss_is_caught():
    with pytest.raises(AssertionError, match=r"NaNLoss.training_step's loss is nan on a tiny random batch: it must be finite"):
        check_training_step(NaNLoss)
    with pytest.raises(AssertionError, match=r"^check_training_step\(NaNLoss\): "):
        check_method(NaNLoss, processes=False)


def test_a_gradient_that_climbs_the_loss_is_caught():
    with pytest.raises(AssertionError, match="a small step against the gradient does not lower FlippedGradient's loss.*custom autograd Functions"):
        check_loss_decreases(FlippedGradient)


def test_a_class_defined_in_a_function_cannot_be_checked_in_new_processes():
    class Local(KitMethod):
        pass

    check_training_step(Local)  # in this process it is a method like any other
    with pytest.raises(ValueError, match="define the class at the top level of an importable module"):
        check_two_processes_equal_one(Local)
    with pytest.raises(TypeError, match="subclasses sslbench.api.Method"):
        resolve_method(KitConfig)  # type: ignore[arg-type]


def test_the_loss_decrease_check_holds_the_method_state_fixed():
    """MoCo-like state (a buffer the step changes) does not disturb the check: it restarts from the
    state before the step."""
    from sslbench.testing import one_step

    r = one_step(KitMethod)
    assert not torch.equal(r.method.center, r.initial.center)  # the step moved the centre
    check_loss_decreases(r)
    assert isinstance(r.initial, Method) and isinstance(r.batch(), Batch)


@pytest.mark.slow
def test_a_plugin_class_passes_every_check_in_new_processes(tmp_path):
    report = check_method(KitMethod, workdir=tmp_path, env={"SSLBENCH_CACHE": str(tmp_path / "cache")})
    assert report["check_resume_equals_unbroken"] == report["check_two_processes_equal_one"] == "ok"


@pytest.mark.slow
def test_a_buffer_that_diverges_between_processes_is_caught(tmp_path):
    with pytest.raises(AssertionError, match=r"buffer center differs between the processes of one run.*DDP does not synchronise buffers") as info:
        check_no_per_process_state(LocalCenter, workdir=tmp_path, env={"SSLBENCH_CACHE": str(tmp_path / "cache")})
    assert str(info.value).startswith("check_no_per_process_state(LocalCenter): ")


@pytest.mark.slow
def test_state_in_a_python_attribute_breaks_resume_and_is_caught(tmp_path):
    with pytest.raises(AssertionError, match=r"step 4 gives loss .* after the stop and resume at step 3 .*not Python attributes"):
        check_resume_equals_unbroken(PythonCounter, workdir=tmp_path, env={"SSLBENCH_CACHE": str(tmp_path / "cache")})
