"""benchmarks/claims.py: the claims README is generated from result rows, and its verdicts follow
from the numbers (a one-sided Welch t-test per comparison), never from the text."""

import importlib.util
import json
import statistics
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("claims", REPO / "benchmarks" / "claims.py")
claims = importlib.util.module_from_spec(spec)
sys.modules["claims"] = claims  # (dataclasses look their module up)
spec.loader.exec_module(claims)


def _rows(values_by_setting, metric="linear_top1", features=None):
    rows = []
    for setting, values in values_by_setting.items():
        for seed, value in enumerate(values):
            rows.append(
                {
                    "time": f"2026-01-01T00:00:{seed:02d}",
                    "method": "simclr",
                    "backbone": "resnet18",
                    "data": "imagefolder:/c",
                    "budget_kind": "epochs",
                    "budget": 8,
                    "image_size": 16,
                    "seed": seed,
                    "run_dir": f"/r/{setting}-{seed}",
                    "wall_time_s": 60.0,
                    "command": "sslbench compare --vary ...",
                    "vary": dict(setting),
                    "train_config": {k: v for k, v in setting},
                    "metrics": {metric: value},
                    "protocol": {"name": "linear", **({"features": features} if features else {})},
                }
            )
    return rows


def _colour(full, crop, jitter):
    return _rows(
        {
            (("aug.jitter_p", 0.8), ("aug.grayscale_p", 0.2)): full,
            (("aug.jitter_p", 0.0), ("aug.grayscale_p", 0.0)): crop,
            (("aug.jitter_p", 0.8), ("aug.grayscale_p", 0.0)): jitter,
        }
    )


def test_welch_matches_scipy():
    from scipy.stats import ttest_ind

    a, b = [40.0, 41.5, 39.0], [37.0, 38.5, 36.0, 38.0]
    s = claims.welch(
        {"mean": statistics.mean(a), "std": statistics.stdev(a), "n": 3}, {"mean": statistics.mean(b), "std": statistics.stdev(b), "n": 4}
    )
    ref = ttest_ind(a, b, equal_var=False, alternative="greater")
    assert s["t"] == pytest.approx(ref.statistic) and s["p_more"] == pytest.approx(ref.pvalue)


@pytest.mark.parametrize(
    "full, crop, expected",
    [
        ([40.0, 41.0, 40.5], [30.0, 31.0, 30.5], "Reproduced"),
        ([30.0, 31.0, 30.5], [40.0, 41.0, 40.5], "Not reproduced at this scale: the opposite holds"),
        ([40.0, 35.0, 45.0], [39.0, 44.0, 36.0], "Not reproduced at this scale: no difference beyond the seed-to-seed spread"),
    ],
)
def test_the_verdict_comes_from_the_numbers(tmp_path, full, crop, expected):
    (tmp_path / "colour.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _colour(full, crop, full)))
    text = claims.readme(tmp_path, REPO / "leaderboards" / "claims" / "run.sh")
    section = text[text.index("## 1. Colour") : text.index("## 2. ")]
    assert f"**Verdict: {expected}**" in section
    assert "| 1. colour distortion is essential | " + expected + " |" in text
    assert "sslbench compare --vary ..." in section  # the command recorded in the rows
    assert "| simclr |" in section and " ± " in section  # the rendered table, mean ± std
    assert ("Why this scale may not show it" in section) == (expected != "Reproduced")
    # the claims without rows are pending, with their command from run.sh
    later = text[text.index("## 2. ") :]
    assert "Pending" in later and "--vary method_cfg.projector=none,linear,v1" in later


def test_run_sh_has_one_compare_per_claim():
    script = REPO / "leaderboards" / "claims" / "run.sh"
    for claim in claims.CLAIMS:
        command = claims.command_from_script(script, claim.slug)
        assert command.startswith("sslbench compare") and "--vary" in command and f'--results "$OUT/{claim.slug}.jsonl"' in command
