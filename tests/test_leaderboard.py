"""Tests for the leaderboard (sslbench/results/leaderboard.py)."""

from __future__ import annotations

import math
import statistics
import sys
from pathlib import Path

import pytest

from sslbench.core.errors import UserError
from sslbench.results.leaderboard import aggregate, render
from sslbench.results.plot import plot


def _row(
    method, seed, metrics, *, data="digits", budget_kind="epochs", budget=10, time="2026-01-01T00:00:00.000+00:00", epochs=10, images_per_s=1000.0
):
    return {
        "time": time,
        "method": method,
        "backbone": "resnet18",
        "data": data,
        "image_size": 32,
        "budget_kind": budget_kind,
        "budget": budget,
        "seed": seed,
        "epochs": epochs,
        "images_per_s": images_per_s,
        "metrics": metrics,
    }


ROWS = [
    _row("simclr", 0, {"knn_top1": 80.0, "linear_top1": 85.0}),
    _row("simclr", 1, {"knn_top1": 82.0, "linear_top1": 86.0}, images_per_s=1200.0),
    _row("byol", 0, {"knn_top1": 10.0}, time="2025-12-31T23:00:00.000+00:00"),  # stale duplicate
    _row("byol", 0, {"knn_top1": 78.5, "linear_top1": 84.25}, images_per_s=900.0),
    _row("moco", 0, {"knn_top1": 70.0, "linear_top1": 75.0}),
    _row("moco", 1, {"knn_top1": 72.0, "linear_top1": 77.0}),
    _row("moco", 2, {"knn_top1": 74.0}),  # no linear probe for this seed
    _row("simsiam", 0, {"knn_top1": 50.0}, data="cifar10", budget_kind="time", budget=60, epochs=2.5, images_per_s=512.4),
    _row("a|<b>", 0, {"knn_top1": 40.0}, data="cifar10", budget_kind="time", budget=60, epochs=3, images_per_s=None),
]

GOLDEN_MD = """\
### cifar10 / resnet18 / time=60 / 32px

| method  | knn_top1 | seeds | epochs | images/s |
| :------ | -------: | ----: | -----: | -------: |
| a\\|<b>  |    40.00 |     1 |      3 |        - |
| simsiam |    50.00 |     1 |    2.5 |      512 |

### digits / resnet18 / epochs=10 / 32px

| method | knn_top1     | linear_top1        | seeds | epochs | images/s |
| :----- | -----------: | -----------------: | ----: | -----: | -------: |
| byol   |        78.50 |              84.25 |     1 |     10 |      900 |
| moco   | 72.00 ± 2.00 | 76.00 ± 1.41 (n=2) |     3 |     10 |     1000 |
| simclr | 81.00 ± 1.41 |       85.50 ± 0.71 |     2 |     10 |     1100 |
"""

GOLDEN_CSV = """\
data,backbone,budget_kind,budget,image_size,method,config,seeds,epochs,images_per_s,knn_top1,knn_top1_std,knn_top1_n,linear_top1,linear_top1_std,linear_top1_n
cifar10,resnet18,time,60,32,a|<b>,,1,3,,40,,1,,,
cifar10,resnet18,time,60,32,simsiam,,1,2.5,512.4,50,,1,,,
digits,resnet18,epochs,10,32,byol,,1,10,900,78.5,,1,84.25,,1
digits,resnet18,epochs,10,32,moco,,3,10,1000,72,2,3,76,1.41421,2
digits,resnet18,epochs,10,32,simclr,,2,10,1100,81,1.41421,2,85.5,0.707107,2
"""

GOLDEN_HTML = """\
<h3>cifar10 / resnet18 / time=60 / 32px</h3>
<table>
<thead>
<tr><th>method</th><th>knn_top1</th><th>seeds</th><th>epochs</th><th>images/s</th></tr>
</thead>
<tbody>
<tr><td>a|&lt;b&gt;</td><td>40.00</td><td>1</td><td>3</td><td>-</td></tr>
<tr><td>simsiam</td><td>50.00</td><td>1</td><td>2.5</td><td>512</td></tr>
</tbody>
</table>
<h3>digits / resnet18 / epochs=10 / 32px</h3>
<table>
<thead>
<tr><th>method</th><th>knn_top1</th><th>linear_top1</th><th>seeds</th><th>epochs</th><th>images/s</th></tr>
</thead>
<tbody>
<tr><td>byol</td><td>78.50</td><td>84.25</td><td>1</td><td>10</td><td>900</td></tr>
<tr><td>moco</td><td>72.00 ± 2.00</td><td>76.00 ± 1.41 (n=2)</td><td>3</td><td>10</td><td>1000</td></tr>
<tr><td>simclr</td><td>81.00 ± 1.41</td><td>85.50 ± 0.71</td><td>2</td><td>10</td><td>1100</td></tr>
</tbody>
</table>
"""


@pytest.mark.parametrize("fmt, golden", [("md", GOLDEN_MD), ("csv", GOLDEN_CSV), ("html", GOLDEN_HTML)])
def test_render_matches_golden(fmt: str, golden: str) -> None:
    assert render(ROWS, fmt) == golden
    assert render(list(reversed(ROWS)), fmt) == golden  # input order does not matter


def test_render_empty_and_unknown_format() -> None:
    assert render([], "md") == "_No results._\n"
    assert render([], "html") == "<p>No results.</p>\n"
    assert render([], "csv").count("\n") == 1
    with pytest.raises(UserError, match="md, csv, html"):
        render(ROWS, "latex")


def test_mean_and_sample_std() -> None:
    values = [71.3, 74.9, 70.2, 73.35]
    rows = [_row("byol", s, {"knn_top1": v}) for s, v in enumerate(values)]
    (entry,) = aggregate(rows)
    stats = entry["metrics"]["knn_top1"]
    assert stats["mean"] == pytest.approx(statistics.mean(values), abs=1e-12)
    assert stats["std"] == pytest.approx(statistics.stdev(values), abs=1e-12)  # ddof = 1
    assert stats["n"] == entry["n_seeds"] == 4
    (single,) = aggregate(rows[:1])
    assert single["metrics"]["knn_top1"] == {"mean": 71.3, "std": None, "n": 1}


def test_most_recent_row_wins() -> None:
    old = _row("simclr", 0, {"knn_top1": 1.0, "linear_top1": 2.0}, time="2026-01-01T00:00:00.000+00:00")
    new = _row("simclr", 0, {"knn_top1": 3.0}, time="2026-01-02T00:00:00.000+00:00", images_per_s=7.0)
    same_time = _row("simclr", 0, {"knn_top1": 5.0}, time="2026-01-02T00:00:00.000+00:00")
    (entry,) = aggregate([new, old])
    # The newer row replaces knn_top1 only; linear_top1 of the same seed is kept.
    assert entry["metrics"]["knn_top1"]["mean"] == 3.0
    assert entry["metrics"]["linear_top1"]["mean"] == 2.0
    assert entry["n_seeds"] == 1 and entry["images_per_s"] == 7.0
    (entry,) = aggregate([new, same_time])  # equal times: the later row in the input wins
    assert entry["metrics"]["knn_top1"]["mean"] == 5.0


def test_groups_are_separate_and_bad_rows_ignored() -> None:
    rows = [
        _row("simclr", 0, {"knn_top1": 80.0}),
        _row("simclr", 0, {"knn_top1": 60.0}, budget=20),
        {"method": None, "metrics": {"knn_top1": 1.0}},
        {"method": "x", "note": "no metrics"},
        _row("simclr", 1, {"knn_top1": None}),  # a non-finite value, stored as null
    ]
    entries = aggregate(rows)
    assert [(e["budget"], e["n_seeds"]) for e in entries] == [(10, 2), (20, 1)]
    assert math.isnan(entries[0]["metrics"]["knn_top1"]["mean"])  # a diverged seed is visible
    assert entries[1]["metrics"]["knn_top1"]["mean"] == 60.0


def test_plot_writes_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    path = tmp_path / "board.png"
    plot(ROWS, path)
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1000
    with pytest.raises(UserError, match="no results"):
        plot([], tmp_path / "empty.png")


def test_plot_without_matplotlib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib...` fail
    with pytest.raises(UserError, match="pip install matplotlib"):
        plot(ROWS, tmp_path / "board.png")
    assert not (tmp_path / "board.png").exists()


def _cfg(**changes):
    base = {"method": "simclr", "backbone_kwargs.channels": [8, 16, 32, 64], "lr": 1.0, "method_cfg.projector": "v1"}
    return {**base, **changes}


def test_runs_that_trained_differently_are_separate_entries_never_merged_or_dropped():
    """Two widths of one method, both seed 0, evaluated into one store: before, one entry showed
    the second run's k-NN next to the first run's linear probe and the first k-NN vanished; and
    seeds of different widths were averaged."""
    narrow, wide = _cfg(), _cfg(**{"backbone_kwargs.channels": [16, 32, 64, 128]})
    rows = [
        {**_row("simclr", 0, {"knn_top1": 47.78, "linear_top1": 64.44}), "train_config": narrow},
        {**_row("simclr", 0, {"knn_top1": 56.22}, time="2026-01-02T00:00:00.000+00:00"), "train_config": wide},
        {**_row("simclr", 1, {"knn_top1": 50.0}), "train_config": wide},
        {**_row("byol", 0, {"knn_top1": 60.0}), "train_config": {**narrow, "method": "byol"}},
    ]
    entries = {(e["method"], e["config"]): e for e in aggregate(rows)}
    assert set(entries) == {("byol", ""), ("simclr", "backbone_kwargs.channels=8,16,32,64"), ("simclr", "backbone_kwargs.channels=16,32,64,128")}
    first = entries["simclr", "backbone_kwargs.channels=8,16,32,64"]
    assert first["n_seeds"] == 1 and first["metrics"]["knn_top1"]["mean"] == 47.78
    assert first["metrics"]["linear_top1"]["mean"] == 64.44
    second = entries["simclr", "backbone_kwargs.channels=16,32,64,128"]
    assert second["n_seeds"] == 2 and second["metrics"]["knn_top1"]["mean"] == pytest.approx(53.11)
    assert "linear_top1" not in second["metrics"]
    md = render(rows, "md")
    assert "| simclr [backbone_kwargs.channels=8,16,32,64] " in md and "| byol " in md
    assert "simclr,backbone_kwargs.channels=16,32,64,128,2," in render(rows, "csv").replace('"', "")
    # several differing settings are all named; a re-run of one run's evaluation still replaces it
    other = _cfg(lr=0.5, **{"method_cfg.projector": "v2"})
    rows2 = [
        {**_row("simclr", 0, {"knn_top1": 1.0}), "train_config": narrow},
        {**_row("simclr", 0, {"knn_top1": 2.0}, time="2026-01-03T00:00:00.000+00:00"), "train_config": narrow},
        {**_row("simclr", 0, {"knn_top1": 3.0}), "train_config": other},
    ]
    labels = {e["config"]: e["metrics"]["knn_top1"]["mean"] for e in aggregate(rows2)}
    assert labels == {"lr=1.0, method_cfg.projector=v1": 2.0, "lr=0.5, method_cfg.projector=v2": 3.0}


def test_rows_without_a_recorded_config_keep_the_old_grouping():
    rows = [_row("simclr", 0, {"knn_top1": 1.0}), _row("simclr", 1, {"knn_top1": 3.0})]
    (entry,) = aggregate(rows)
    assert entry["config"] == "" and entry["n_seeds"] == 2
    mixed = [*rows, {**_row("simclr", 0, {"knn_top1": 9.0}), "train_config": _cfg()}]
    assert sorted(e["config"] for e in aggregate(mixed)) == ["config not recorded", "config recorded"]


def test_a_hand_edited_row_with_a_list_seed_is_grouped_not_a_crash():
    rows = [{**_row("simclr", 0, {"knn_top1": 1.0}), "seed": [1]}, _row("simclr", 2, {"knn_top1": 3.0})]
    (entry,) = aggregate(rows)
    assert entry["n_seeds"] == 2


def test_plot_names_the_formats_it_can_write(tmp_path):
    pytest.importorskip("matplotlib")
    with pytest.raises(UserError, match="one of the suffixes .*png"):
        plot(ROWS, tmp_path / "board.txt")
    with pytest.raises(UserError, match="one of the suffixes"):
        plot(ROWS, tmp_path / "board")  # matplotlib would write board.png while we reported "board"


def test_rows_from_before_feature_depths_share_a_line_with_rows_scored_at_h():
    """Until 2026-11-30 the k-NN record's ``features`` key held a description of the features
    ("l2-normalised, frozen, no augmentation"); rows written since name the depth there (``h``).
    The committed CIFAR-10 table holds both: an old k-NN row on h and a new one are one line
    without a ``features`` column, and the description is not mistaken for a depth; a real depth
    (``z``) still gets its own line."""
    from sslbench.evaluation.protocols import row_depth

    old_knn = {"name": "knn", "features": "l2-normalised, frozen, no augmentation"}
    rows = [
        {**_row("simclr", 0, {"knn_top1": 48.0}), "protocol": old_knn},
        {**_row("simclr", 0, {"linear_top1": 51.0}), "protocol": {"name": "linear"}},
        {**_row("vicreg", 0, {"knn_top1": 45.0}), "protocol": {"name": "knn", "features": "h"}},
        {**_row("vicreg", 0, {"linear_top1": 49.0}), "protocol": {"name": "linear", "features": "h"}},
    ]
    entries = aggregate(rows)
    assert [(e["method"], e["features"], sorted(e["metrics"])) for e in entries] == [
        ("simclr", None, ["knn_top1", "linear_top1"]),
        ("vicreg", None, ["knn_top1", "linear_top1"]),
    ]
    assert "features" not in render(rows, "md")
    assert row_depth(rows[0]) == "h" and row_depth(rows[2]) == "h"
    at_z = {**_row("vicreg", 0, {"knn_top1": 30.0}), "protocol": {"name": "knn", "features": "z"}}
    assert [e["features"] for e in aggregate([*rows, at_z])] == [None, None, "z"]
