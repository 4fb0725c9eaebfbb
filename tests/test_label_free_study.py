"""benchmarks/label_free_study.py: Spearman's rho equals scipy's, the bootstrap is the seeded
percentile bootstrap, and the committed README is what the committed rows give (issue 30)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("label_free_study", REPO / "benchmarks" / "label_free_study.py")
study = importlib.util.module_from_spec(spec)
sys.modules["label_free_study"] = study  # (dataclasses look their module up)
spec.loader.exec_module(study)

scipy_stats = pytest.importorskip("scipy.stats")


@pytest.mark.parametrize("seed", range(6))
def test_spearman_equals_scipy_with_and_without_ties(seed) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(3, 40))
    x = rng.integers(0, 6, n).astype(float) if seed % 2 else rng.normal(size=n)  # odd seeds: many ties
    y = 0.5 * x + rng.normal(size=n)
    expected = scipy_stats.spearmanr(x, y).statistic
    assert study.spearman(list(x), list(y)) == pytest.approx(expected, abs=1e-12)
    if seed % 2 == 0:  # no ties: the textbook formula 1 - 6 sum d^2 / (n (n^2 - 1))
        d = np.argsort(np.argsort(x)) - np.argsort(np.argsort(y))
        assert study.spearman(list(x), list(y)) == pytest.approx(1 - 6 * float(d @ d) / (n * (n * n - 1)), abs=1e-12)


def test_spearman_is_undefined_for_a_constant_side() -> None:
    assert study.spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]) is None
    assert study.spearman([1.0], [2.0]) is None


def test_bootstrap_is_the_seeded_percentile_bootstrap() -> None:
    rng = np.random.default_rng(7)
    x = rng.normal(size=12)
    y = x + rng.normal(size=12)
    got = study.bootstrap_interval(list(x), list(y), resamples=300, seed=3)
    assert got == study.bootstrap_interval(list(x), list(y), resamples=300, seed=3)  # deterministic
    assert got != study.bootstrap_interval(list(x), list(y), resamples=300, seed=4)
    # independently: the same resamples (numpy's generator, seeded), rho by scipy, numpy's percentiles
    picks = np.random.default_rng(3).integers(0, 12, size=(300, 12))
    rhos = [scipy_stats.spearmanr(x[p], y[p]).statistic for p in picks]
    rhos = [r for r in rhos if np.isfinite(r)]
    lo, hi = np.quantile(rhos, [0.025, 0.975])
    assert got is not None and got[0] == pytest.approx(lo, abs=1e-12) and got[1] == pytest.approx(hi, abs=1e-12) and got[2] == len(rhos)
    assert got[0] <= study.spearman(list(x), list(y)) <= got[1]


def _row(run: str, protocol: str, metrics: dict, *, time: str, features: str | None = None, fraction=None, health=None) -> dict:
    return {
        "time": time,
        "method": "simclr",
        "data": "digits",
        "run_dir": run,
        "label_fraction": fraction,
        "metrics": metrics,
        "protocol": {"name": protocol, **({"features": features} if features else {})},
        "health": health,
        "env": {"git_commit": "abc123"},
    }


def test_rows_to_table_numbers() -> None:
    """Newest row wins, only depth h and no label fraction count; rho in the table is scipy's."""
    rankme = [3.0, 9.0, 5.0, 7.0, 1.0]
    knn = [40.0, 70.0, 55.0, 50.0, 30.0]
    rows = []
    for i, (r, k) in enumerate(zip(rankme, knn)):
        run = f"/runs/r{i}"
        rows += [
            _row(run, "knn", {"knn_top1": 0.0}, time="2026-01-01T00:00:00"),  # older: replaced
            _row(run, "knn", {"knn_top1": k}, time="2026-01-02T00:00:00"),
            _row(run, "knn", {"knn_top1": 99.0}, time="2026-01-03T00:00:00", features="z"),  # another depth: ignored
            _row(run, "rankme", {"rankme": r}, time="2026-01-02T00:00:00"),
            _row(run, "rankme", {"rankme": 1000.0 - r}, time="2026-01-02T00:00:00", features="z"),
            _row(run, "finetune", {"knn_top1": 1.0}, time="2026-01-04T00:00:00", fraction=0.1),  # a label fraction: ignored
        ]
    text = study.readme({"leaderboards/x/results.jsonl": rows})
    rho = scipy_stats.spearmanr(rankme, knn).statistic
    line = next(li for li in text.splitlines() if li.startswith("| `rankme` | protocol | `knn_top1` |"))
    assert f"| 5 | {rho:+.2f} | [" in line
    assert "| `leaderboards/x/results.jsonl` | 30 | 5 | 5 | `digits` | abc123 |" in text
    assert "never scored with the label-free protocols" not in text
    assert study.readme({"leaderboards/x/results.jsonl": rows}) == text  # a function of the rows


def test_the_committed_readme_is_regenerated_from_the_committed_rows() -> None:
    rows = study.read_committed(study.ROWS_DIR)
    assert rows, "no committed results stores under leaderboards/"
    committed = (study.OUT_DIR / "README.md").read_text()
    assert study.readme(rows) == committed, "run: python benchmarks/label_free_study.py"


def test_the_plot_is_written(tmp_path) -> None:
    rows = [_row(f"/r{i}", "knn", {"knn_top1": 10.0 * i}, time="t", health={"embedding_rank": float(i)}) for i in range(4)]
    study.plot({"f.jsonl": rows}, tmp_path / "s.png")
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
