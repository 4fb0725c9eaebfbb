"""`sslbench compare --vary`: ablation grids over any config key, one budget and the same seeds;
runs named by their settings; an interrupted grid continues without retraining finished runs; the
leaderboard renders one row per setting with mean +- std over seeds."""

import statistics
from pathlib import Path

import pytest
import torch
import yaml

import sslbench.commands.pipeline
from sslbench.commands.cli import main
from sslbench.results import read_rows
from sslbench.results.grid import parse_vary, run_name, split_values
from sslbench.results.leaderboard import aggregate, render

TINY = ["--set", "backbone_kwargs.channels=8,16,32,64", "--set", "train_subset=32"]
GRID = [
    "compare",
    "--methods",
    "simclr",
    "--steps",
    "1",
    "--seeds",
    "0,1",
    "--protocol",
    "knn",
    "--quiet",
    "--vary",
    "method_cfg.temperature=0.2,0.5",
    "--vary",
    "batch_size=8,16",
    *TINY,
]


@pytest.fixture(autouse=True)
def _env(monkeypatch, tmp_path):
    monkeypatch.setenv("SSLBENCH_CACHE", str(tmp_path / "cache"))
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sslbench: error: "), err
    return err[0]


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    """A 2 x 2 grid (temperature x batch size) with 2 seeds, interrupted (SIGINT-like) when its
    fourth run starts training, then run again: what was trained, in which order, and the output."""
    tmp = tmp_path_factory.mktemp("grid")
    out = tmp / "cmp"
    trained: list[str] = []
    real = sslbench.commands.pipeline.train_and_score

    def counting(cfg, **kwargs):
        trained.append(Path(cfg.output).name)
        if len(trained) == 4 and not interrupted:
            interrupted.append(True)
            raise KeyboardInterrupt
        return real(cfg, **kwargs)

    interrupted: list[bool] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SSLBENCH_CACHE", str(tmp / "cache"))
        mp.setattr(sslbench.commands.pipeline, "train_and_score", counting)
        first = main([*GRID, "--output", str(out)])
        after_first = list(trained)
        second = main([*GRID, "--output", str(out)])
    return {"out": out, "codes": (first, second), "first": after_first, "all": trained}


def test_a_2x2_grid_with_2_seeds_trains_8_runs_with_the_right_settings_and_renders_4_rows(grid):
    out = grid["out"]
    assert grid["codes"] == (130, 0)
    runs = sorted(p.name for p in out.iterdir() if p.is_dir())
    expected = sorted(f"simclr-temperature={t}-batch_size={b}-seed{s}" for t in ("0.2", "0.5") for b in (8, 16) for s in (0, 1))
    assert runs == expected
    for name in runs:  # each run trained with its own setting, and only that
        cfg = yaml.safe_load((out / name / "config.yaml").read_text())
        t, b, s = name.split("-")[1:]
        assert cfg["method_cfg"]["temperature"] == float(t.split("=")[1]) and cfg["batch_size"] == int(b.split("=")[1])
        assert cfg["seed"] == int(s.removeprefix("seed")) and cfg["steps"] == 1
    rows = read_rows(out / "results.jsonl")
    assert len(rows) == 8 and sorted(Path(r["run_dir"]).name for r in rows) == expected
    for r in rows:  # every row records the grid setting it belongs to
        name = Path(r["run_dir"]).name
        assert r["vary"] == {"method_cfg.temperature": float(name.split("-")[1].split("=")[1]), "batch_size": int(name.split("-")[2].split("=")[1])}

    entries = aggregate(rows)
    assert len(entries) == 4 and all(e["n_seeds"] == 2 for e in entries)
    assert [(e["settings"]["method_cfg.temperature"], e["settings"]["batch_size"]) for e in entries] == [(0.2, 8), (0.2, 16), (0.5, 8), (0.5, 16)]
    for e in entries:  # mean and sample std over the two seeds of exactly that setting
        mine = [r["metrics"]["knn_top1"] for r in rows if r["vary"] == e["settings"]]
        assert e["metrics"]["knn_top1"]["mean"] == pytest.approx(statistics.mean(mine))
        assert e["metrics"]["knn_top1"]["std"] == pytest.approx(statistics.stdev(mine))
        assert e["config"] == ""  # the settings are columns, not a label
    board = (out / "leaderboard.md").read_text()
    table = [line for line in board.splitlines() if line.startswith("| simclr")]
    header = next(line for line in board.splitlines() if line.startswith("| method"))
    assert [c.strip() for c in header.strip("|").split("|")][:4] == ["method", "method_cfg.temperature", "batch_size", "knn_top1"]
    assert len(table) == 4 and all(" ± " in line for line in table)
    assert [[c.strip() for c in line.strip("|").split("|")][1:3] for line in table] == [["0.2", "8"], ["0.2", "16"], ["0.5", "8"], ["0.5", "16"]]
    assert board == render(rows, "md")


def test_an_interrupted_grid_continues_without_retraining_finished_runs(grid):
    first, trained = grid["first"], grid["all"]
    assert len(first) == 4  # three runs finished, the fourth was interrupted as it started
    assert len(trained) == 4 + 5  # the second command trained the interrupted run and the four never started
    assert not set(first[:3]) & set(trained[4:]), "a finished run was trained again"
    assert sorted(set(trained)) == sorted(set(first) | set(trained[4:])) and len(set(trained)) == 8
    rows = read_rows(grid["out"] / "results.jsonl")
    assert len({r["run_dir"] for r in rows}) == len(rows) == 8  # nothing scored (or stored) twice


def test_rerunning_a_finished_grid_trains_and_scores_nothing(grid, monkeypatch, capsys):
    monkeypatch.setenv("SSLBENCH_CACHE", str(grid["out"].parent / "cache"))
    monkeypatch.setattr(sslbench.commands.pipeline, "train_and_score", lambda *a, **k: pytest.fail("trained a finished run"))
    before = read_rows(grid["out"] / "results.jsonl")
    assert main([*GRID, "--output", str(grid["out"])]) == 0
    assert capsys.readouterr().err.count("reusing its stored rows") == 8
    assert read_rows(grid["out"] / "results.jsonl") == before


@pytest.mark.parametrize(
    "vary, message",
    [
        (
            ["--vary", "method_cfg.temprature=0.1,0.5"],
            "--vary method_cfg.temprature=0.1: unknown config key 'method_cfg.temprature' (did you mean method_cfg.temperature?)",
        ),
        (["--vary", "temperature=0.1,hot"], "--vary temperature=hot: method_cfg.temperature expects float, got 'hot'"),
        (["--vary", "temperature=0.1,-1"], "--vary temperature=-1: method_cfg.temperature must be > 0"),
        (["--vary", "aug.jitter_p=0,2"], "--vary aug.jitter_p=2: aug.jitter_p is a probability in [0, 1]"),
        (["--vary", "seed=0,1"], "--vary seed: compare sets seed itself; use --seeds"),
        (["--vary", "temperature"], "--vary expects KEY=V1,V2"),
        (["--vary", "temperature=0.1,,0.5"], "give a key and non-empty comma-separated values"),
        (["--vary", "temperature=0.1,0.1"], "--vary temperature: the value '0.1' is given twice"),
        (["--vary", "temperature=0.1", "--vary", "method_cfg.temperature=0.5"], "method_cfg.temperature is varied twice"),
        (["--vary", "temperature=0.1,0.5", "--set", "method_cfg.temperature=0.2"], "a key is either set for every run or varied"),
        (["--vary", "aug.crop_scale=[0.2,1.0"], "--vary aug.crop_scale: unbalanced brackets"),
    ],
)
def test_a_bad_vary_is_one_line_naming_the_flag_before_anything_trains(tmp_path, capsys, vary, message):
    out = tmp_path / "cmp"
    assert main(["compare", "--methods", "simclr", "--steps", "1", "--output", str(out), *vary]) == 2
    assert message in _error_line(capsys)
    assert not out.exists()


def test_a_depth_the_grid_would_not_have_fails_before_anything_trains(tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = ["compare", "--methods", "simclr", "--steps", "1", "--output", str(out), "--vary", "method_cfg.projector=none,v1", "--features", "h,proj1"]
    assert main(argv) == 2
    assert "--features proj1:" in _error_line(capsys) and not out.exists()


def test_values_names_and_parsing():
    assert split_values("0.1, 0.5") == ["0.1", "0.5"]
    assert split_values("[0.08,1.0],(0.5,1)") == ["[0.08,1.0]", "(0.5,1)"]
    assert parse_vary(["aug.crop_scale=[0.08,1.0],[0.5,1.0]"]) == [("aug.crop_scale", ["[0.08,1.0]", "[0.5,1.0]"])]
    named = ["method_cfg.temperature", "aug.crop_scale", "backbone_kwargs.channels", "data"]
    settings = {"method_cfg.temperature": 0.1, "aug.crop_scale": [0.08, 1.0], "backbone_kwargs.channels": [8, 16], "data": "imagefolder:/a b/c"}
    assert (
        run_name("simclr", 3, settings, named)
        == "simclr-temperature=0.1-aug.crop_scale=0.08_1-backbone_kwargs.channels=8_16-data=imagefolder_a_b_c-seed3"
    )
    long = run_name("simclr", 0, {"data": "x" * 300}, ["data"])
    assert len(long) <= 120 and long.endswith("-seed0") and long != run_name("simclr", 0, {"data": "x" * 299}, ["data"])


def test_a_tuple_valued_key_can_be_varied(tmp_path):
    from sslbench.commands.compare import plan_grid

    plans = plan_grid(["simclr"], [0], ("steps", 1), out_dir=tmp_path, vary=["aug.crop_scale=[0.08,1.0],[0.5,1.0]"])
    assert [p.cfg.aug.crop_scale for p in plans] == [(0.08, 1.0), (0.5, 1.0)]
    assert [Path(p.cfg.output).name for p in plans] == ["simclr-aug.crop_scale=0.08_1-seed0", "simclr-aug.crop_scale=0.5_1-seed0"]
    assert [p.settings for p in plans] == [{"aug.crop_scale": [0.08, 1.0]}, {"aug.crop_scale": [0.5, 1.0]}]


def _row(seed, value, *, vary=None, features=None, method="simclr", **protocol):
    record = {"name": "linear", **({"features": features} if features else {}), **protocol}
    row = {
        "time": f"2026-01-01T00:00:0{seed}",
        "method": method,
        "backbone": "resnet18",
        "data": "digits",
        "budget_kind": "epochs",
        "budget": 1,
        "image_size": 16,
        "seed": seed,
        "metrics": {"linear_top1": value},
        "protocol": record,
        "train_config": {"method_cfg.projector": (vary or {}).get("method_cfg.projector", "v1")},
    }
    if vary is not None:
        row["vary"] = vary
    return row


def test_depths_are_separate_entries_with_a_features_column():
    rows = [_row(0, 50.0), _row(1, 52.0), _row(0, 40.0, features="z"), _row(1, 41.0, features="z"), _row(0, 45.0, features="proj1")]
    entries = aggregate(rows)
    assert [(e["features"], e["n_seeds"], e["metrics"]["linear_top1"]["mean"]) for e in entries] == [
        (None, 2, 51.0),
        ("proj1", 1, 45.0),
        ("z", 2, 40.5),
    ]
    table = render(rows, "md")
    assert "| method | features | linear_top1 |" in table.replace("  ", " ").replace("  ", " ")
    assert [line.split("|")[2].strip() for line in table.splitlines() if line.startswith("| simclr")] == ["h", "proj1", "z"]
    assert "features" in render(rows, "csv").splitlines()[0].split(",")
    # a fine-tuning row from an older version names its start layer only: proj1, not merged with h
    legacy = [_row(0, 30.0), _row(0, 35.0, from_projector_layer=1)]
    assert [e["features"] for e in aggregate(legacy)] == [None, "proj1"]
    # rows without depths or grids render as before (no new columns)
    assert "features" not in render([_row(0, 50.0)], "md") and "features" not in render([_row(0, 50.0)], "csv")


def test_a_grid_table_has_one_row_per_setting_in_value_order_and_the_plot_draws_each_metric(tmp_path):
    rows = [_row(s, 40.0 + b / 64 + s, vary={"batch_size": b}) for b in (512, 64, 128) for s in (0, 1, 2)]
    rows = [dict(r, train_config={"batch_size": r["vary"]["batch_size"]}) for r in rows]
    entries = aggregate(rows)
    assert [e["settings"]["batch_size"] for e in entries] == [64, 128, 512]  # numbers in numeric order
    assert [e["metrics"]["linear_top1"]["std"] for e in entries] == [pytest.approx(1.0)] * 3
    table = render(rows, "md")
    lines = [line for line in table.splitlines() if line.startswith("| simclr")]
    assert [[c.strip() for c in line.strip("|").split("|")][:3] for line in lines] == [
        ["simclr", "64", "42.00 ± 1.00"],
        ["simclr", "128", "43.00 ± 1.00"],
        ["simclr", "512", "49.00 ± 1.00"],
    ]
    from sslbench.results.plot import plot

    plot(rows, tmp_path / "grid.png")
    assert (tmp_path / "grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_compare_scored_at_h_then_at_h_and_z_scores_only_z(tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = ["compare", "--methods", "simclr", "--steps", "1", "--batch-size", "16", "--protocol", "knn", "--output", str(out), "--quiet", *TINY]
    assert main(argv) == 0
    (first,) = read_rows(out / "results.jsonl")
    assert first["protocol"]["features"] == "h"
    capsys.readouterr()
    assert main([*argv, "--features", "h,z"]) == 0
    assert "evaluating knn" in capsys.readouterr().err
    rows = read_rows(out / "results.jsonl")
    assert [r["protocol"]["features"] for r in rows] == ["h", "z"] and rows[0] == first
    board = (out / "leaderboard.md").read_text()
    assert [line.split("|")[2].strip() for line in board.splitlines() if line.startswith("| simclr")] == ["h", "z"]


@pytest.mark.parametrize(
    "projector, depths, z_dim",
    [("none", ["h", "z"], 64), ("linear", ["h", "z"], 16), ("v1", ["h", "proj1", "z"], 16), ("v2", ["h", "proj1", "proj2", "z"], 16)],
)
def test_simclr_projector_ablation_heads(projector, depths, z_dim):
    """SimCLR Fig. 8's heads: none (z = h), linear, nonlinear (v1) and SimCLR v2's 3-layer one."""
    from sslbench.backbones import create_backbone
    from sslbench.evaluation.features import depth_head, projector_depths
    from sslbench.methods.simclr import SimCLR, SimCLRConfig

    model = SimCLR(create_backbone("resnet18", 16, channels=(8, 16, 32, 64)), SimCLRConfig(projector=projector, proj_hidden_dim=32, proj_dim=16))
    assert projector_depths(model.projector) == depths
    h = torch.randn(4, 64)
    z = depth_head(model.projector, "z")(h)
    assert z.shape == (4, z_dim) and (projector != "none" or torch.equal(z, h))


def test_reuse_from_scores_another_grids_finished_run_of_the_same_config_instead_of_training_it(tmp_path, monkeypatch, capsys):
    base = ["compare", "--methods", "simclr", "--steps", "1", "--batch-size", "16", "--protocol", "knn", "--quiet", *TINY]
    assert main([*base, "--vary", "method_cfg.temperature=0.2,0.5", "--output", str(tmp_path / "runs" / "tau")]) == 0
    trained = []
    real = sslbench.commands.pipeline.train_and_score
    monkeypatch.setattr(sslbench.commands.pipeline, "train_and_score", lambda cfg, **kw: trained.append(Path(cfg.output).name) or real(cfg, **kw))
    argv = [*base, "--vary", "method_cfg.projector=v1,linear", "--output", str(tmp_path / "runs" / "head"), "--reuse-from", str(tmp_path / "runs")]
    assert main(argv) == 0
    assert trained == ["simclr-projector=linear-seed0"]  # projector v1 at tau 0.5 is the tau grid's run
    linked = tmp_path / "runs" / "head" / "simclr-projector=v1-seed0"
    assert linked.is_symlink() and linked.resolve() == (tmp_path / "runs" / "tau" / "simclr-temperature=0.5-seed0").resolve()
    rows = read_rows(tmp_path / "runs" / "head" / "results.jsonl")
    assert [r["vary"] for r in rows] == [{"method_cfg.projector": "v1"}, {"method_cfg.projector": "linear"}]
