"""benchmarks/peer_parity.py: the README is a pure function of the result rows, and neither the
script's import nor the rendering needs lightly (a benchmark-only extra, never a test dependency)."""

import importlib.util
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "peer_parity.py"
spec = importlib.util.spec_from_file_location("peer_parity", SCRIPT)
assert spec is not None and spec.loader is not None
peer_parity = importlib.util.module_from_spec(spec)
sys.modules["peer_parity"] = peer_parity  # dataclasses look their module up there
spec.loader.exec_module(peer_parity)

BUDGET = {
    "data": "/tmp/cifar10",
    "subset": 5000,
    "epochs": 5,
    "batch_size": 256,
    "image_size": 32,
    "backbone": "resnet18",
    "channels": "16,32,64,128",
    "vit_backbone": "vit_tiny_patch16_224",
    "seed": 0,
    "num_workers": 2,
    "knn_bank": 0,
    "knn_test": 0,
    "mae_decoder": "128,2,4",
}
ENV = {
    "commit": "abc1234",
    "dirty": False,
    "cpu": "AMD EPYC (2 cores)",
    "threads": 2,
    "versions": {"torch": "2.14.1", "lightly": "1.6.0"},
    "command": "python benchmarks/peer_parity.py --subset 5000",
    "seed": 0,
}


def row(method, side, knn, ips, **extra):
    out = {"method": method, "side": side, "budget": dict(BUDGET), "knn_top1": knn, "images_per_s": ips, "wall_s": 100.0, **ENV, **extra}
    if side == "peer":
        out.update(recipe_source="lightly cifar10_benchmark.py:360-389", recipe="SGD 0.06")
    else:
        out.update(recipe="sgd lr 0.3", sslbench_command="sslbench train --method " + method)
    return out


def test_readme_lists_both_sides_the_difference_and_the_verdicts():
    rows = [
        row("simclr", "peer", 40.0, 50.0),
        row("simclr", "sslbench", 40.5, 120.0),
        row("byol", "peer", 42.0, 40.0),
        row("byol", "sslbench", 39.0, 60.0),
        row("dino", "peer", 30.0, 40.0),  # sslbench side not run yet
    ]
    text = peer_parity.render_readme(rows)
    assert text == peer_parity.render_readme(list(rows))  # a pure function of the rows
    assert "| simclr | 40.00 | 40.50 | +0.50 | 50 | 120 | 2.40x | 100 | 100 | ok |" in text
    assert "| byol | 42.00 | 39.00 | -3.00 | 40 | 60 | 1.50x | 100 | 100 | k-NN trails; < 2x speed |" in text
    assert "trailing by more than 1 point: byol" in text and "below 2x: byol" in text and "methods with both sides: 2" in text
    assert "Pending: dino (sslbench side missing)" in text
    assert "python benchmarks/peer_parity.py --subset 5000" in text and "`abc1234`" in text


def test_a_rerun_row_replaces_the_earlier_one_of_the_same_side_and_budget():
    rows = [row("simclr", "peer", 40.0, 50.0), row("simclr", "sslbench", 30.0, 120.0), row("simclr", "sslbench", 41.0, 110.0)]
    text = peer_parity.render_readme(rows)
    assert "| simclr | 40.00 | 41.00 | +1.00 |" in text and "30.00" not in text


def test_the_script_imports_without_lightly():
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('p', {str(SCRIPT)!r})\n"
        "m = importlib.util.module_from_spec(spec); sys.modules['p'] = m; spec.loader.exec_module(m)\n"
        "m.render_readme([])\n"
        "assert not [k for k in sys.modules if k.split('.')[0] == 'lightly'], 'lightly imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_gap_measurement_is_listed_apart_and_never_replaces_the_recipe_row():
    rows = [
        row("moco", "peer", 35.0, 50.0),
        row("moco", "sslbench", 30.0, 170.0),
        row("moco", "sslbench", 34.5, 90.0, sets=["method_cfg.symmetric=true"], command="python benchmarks/peer_parity.py --set x"),
    ]
    text = peer_parity.render_readme(rows)
    assert "| moco | 35.00 | 30.00 | -5.00 |" in text  # the recipe's row stays in the main table
    assert "| moco | `method_cfg.symmetric=true` | 34.50 | -0.50 | +4.50 | 90 | `abc1234` |" in text
    assert "python benchmarks/peer_parity.py --set x" in text
    budget = peer_parity.Budget(**BUDGET)
    assert peer_parity.done(rows, "moco", "sslbench", budget)["knn_top1"] == 30.0
    assert peer_parity.done(rows, "moco", "sslbench", budget, ["method_cfg.symmetric=true"])["knn_top1"] == 34.5
    assert peer_parity.done(rows, "moco", "sslbench", budget, ["method_cfg.temperature=0.1"]) is None


def test_every_sslbench_method_has_a_peer_recipe_or_a_reason_why_not():
    from sslbench.core.registry import METHODS

    recipes, not_shipped = set(peer_parity.RECIPES), set(peer_parity.NOT_SHIPPED)
    assert not recipes & not_shipped
    assert recipes | not_shipped == set(METHODS.names())
    assert peer_parity.VIT_METHODS <= recipes
    text = peer_parity.render_readme([row("simclr", "peer", 40.0, 50.0)])
    assert all(f"{m}: " in text for m in not_shipped)  # the README says why each is not covered


def test_shared_sizes_are_config_fields_of_the_sslbench_method():
    """The sizes both sides share reach the sslbench side as --set method_cfg.<field>: real fields."""
    import dataclasses

    from sslbench.core.registry import get_method

    for method, sizes in peer_parity.SHARED_SIZES.items():
        fields = {f.name for f in dataclasses.fields(get_method(method).Config)}
        assert set(sizes) <= fields, (method, set(sizes) - fields)


def profile_row(method, side, step_ms, **phases):
    full = {"data": 0.0, "forward": 0.0, "backward": 0.0, "optimizer": 0.0, "other": 0.0, **phases}
    return {"method": method, "side": side, "budget": dict(BUDGET), "steps": 16, "warmup": 3, "step_ms": step_ms, "phases_ms": full, **ENV}


def test_the_step_profile_says_where_the_time_goes_and_whether_2x_is_within_reach():
    profiles = [
        # 2x already: 1000 ms <= 2400 / 2
        profile_row("simclr", "peer", 2400.0, data=400.0, forward=900.0, backward=1000.0, optimizer=100.0),
        profile_row("simclr", "sslbench", 1000.0, data=100.0, forward=300.0, backward=550.0, optimizer=50.0),
        # the model's own arithmetic (1300 ms) is above half the peer's step (1000 ms): the data path cannot close it
        profile_row("byol", "peer", 2000.0, data=10.0, forward=900.0, backward=1000.0, optimizer=90.0),
        profile_row("byol", "sslbench", 1500.0, data=200.0, forward=600.0, backward=650.0, optimizer=50.0),
        # arithmetic 800 ms of the 1000 ms a 2x step allows: the other 400 ms would have to shrink to 200 ms
        profile_row("swav", "peer", 2000.0, forward=900.0, backward=1000.0, optimizer=100.0),
        profile_row("swav", "sslbench", 1200.0, data=350.0, forward=300.0, backward=450.0, optimizer=50.0, other=50.0),
    ]
    rows = [row("simclr", "peer", 40.0, 50.0), row("simclr", "sslbench", 40.5, 120.0)]
    text = peer_parity.render_readme(rows, profiles)
    assert text == peer_parity.render_readme(rows, list(profiles))  # a pure function of the rows
    assert "| byol | sslbench | 1,500 | 200 | 600 | 650 | 50 | 0 | 16 (3) |" in text
    assert "- simclr: model arithmetic (forward + backward + optimizer) 900 ms vs the peer's 2,000 ms (0.45x)" in text
    assert "at most 1,200 ms: already at least 2x." in text
    assert "byol: model arithmetic (forward + backward + optimizer) 1,300 ms vs the peer's 1,990 ms (0.65x)" in text
    assert "not reachable by the data path: sslbench's forward + backward + optimizer alone take 1,300 ms" in text
    assert "take 800 ms of the 1,000 ms a 2x step allows; the other 400 ms (augmentation, other) would have to shrink to 200 ms" in text
    # a later profile of the same side replaces the earlier one
    again = peer_parity.render_readme(rows, [*profiles, profile_row("byol", "sslbench", 900.0, forward=400.0, backward=400.0)])
    assert "| byol | sslbench | 900 |" in again and "| byol | sslbench | 1,500 |" not in again
    # profiles alone (no parity rows yet) are rendered too
    assert "| swav | peer | 2,000 |" in peer_parity.render_readme([], profiles)


def test_the_teacher_entropy_of_both_sides_is_listed_when_recorded():
    peer_health = {"teacher_entropy_frac_step0": 0.95, "teacher_entropy_frac": 0.9, "teacher_entropy_frac_max": 0.97}
    ours_health = {"teacher_entropy_frac_step0": 0.84, "teacher_entropy_frac": 0.85, "collapse": None}
    rows = [row("dino", "peer", 33.0, 50.0, health=peer_health), row("dino", "sslbench", 34.0, 60.0, health=ours_health)]
    text = peer_parity.render_readme(rows)
    assert "dino: peer 0.950 at step 0 -> 0.900 at the end, at most 0.970; sslbench 0.840 at step 0 -> 0.850 at the end." in text
    assert "Teacher entropy" not in peer_parity.render_readme([row("simclr", "peer", 40.0, 50.0), row("simclr", "sslbench", 41.0, 90.0)])


def test_a_side_that_failed_is_shown_failed_and_left_out_of_the_counts():
    rows = [
        row("mmcr", "peer", None, 40.0, failure="step 41: LinAlgError: linalg.svd: The algorithm failed to converge"),
        row("mmcr", "sslbench", 36.0, 60.0),
        row("simclr", "peer", 40.0, 50.0),
        row("simclr", "sslbench", 40.5, 120.0),
    ]
    text = peer_parity.render_readme(rows)
    assert "| mmcr | n/a | 36.00 | n/a | 40 | 60 | n/a | 100 | 100 | peer failed at step 41: LinAlgError" in text
    assert "methods with both sides: 1;" in text and "Failed (no comparison): mmcr (peer failed at step 41" in text
    assert "trailing" not in text
