"""Every write can fail cleanly (issue 20): a full disk at any write site is one line and exit 2,
leaves no temporary file, keeps the last good state, and a later ``--resume`` continues from the
last good checkpoint.

The faults are injected in forked CLI children (``tests/_faults.py``: ``fail_writes`` makes the
n-th write to a path fail as a full disk makes it fail: half the data written, then the writer's
own error, ``OSError`` for Python's files, ``SafetensorError`` for safetensors, ``RuntimeError``
for ``torch.save``), and once through the real writers with a file-size limit (``EFBIG``).

Every run-directory site starts from the same interrupted run: 4 steps, checkpoints every 2,
stopped by SIGTERM after step 2 (checkpoint ``step-00000002``, no final files). Its resume writes
``config.yaml``, cuts ``metrics.jsonl`` back, appends to it, writes the final checkpoint of step 4
(model, optimizer, RNG states, meta, manifest), the encoder, the method, ``results.json`` and the
quick k-NN's rewrite of it; with a fresh cache it also writes the decoded-data cache first.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from _faults import SIGNAL_AT, fail_writes, file_size_limit
from _reliability import TINY, child_env, lines, make_image_folder, run_forked, run_many

from sslbench.train import checkpoint as ckpt

SITES: dict[str, tuple[str, int, str, int]] = {
    "config": (r"config\.yaml\.tmp-", 1, "config.yaml", 2),
    "metrics-cut-back": (r"metrics\.jsonl\.tmp-", 1, "metrics.jsonl", 2),
    "metrics-append": (r"metrics\.jsonl$", 1, "metrics.jsonl", 2),
    "checkpoint-model": (r"\.tmp-step-00000004/model\.safetensors$", 1, "checkpoint", 2),
    "checkpoint-optimizer": (r"\.tmp-step-00000004/optimizer\.bin$", 1, "checkpoint", 2),
    "checkpoint-rng-state": (r"\.tmp-step-00000004/random_states_0\.pkl$", 1, "checkpoint", 2),
    "checkpoint-meta": (r"\.tmp-step-00000004/meta\.json$", 1, "checkpoint", 2),
    "checkpoint-manifest": (r"\.tmp-step-00000004/manifest\.json$", 1, "checkpoint", 2),
    "encoder": (r"encoder\.safetensors\.tmp-", 1, "encoder.safetensors", 4),
    "method": (r"method\.safetensors\.tmp-", 1, "method.safetensors", 4),
    "results-json": (r"results\.json\.tmp-", 1, "results.json", 4),
    "results-json-quick-knn": (r"results\.json\.tmp-", 2, "results.json", 4),
    "data-cache": (r"decoded/.*\.pt\.tmp-", 1, "decoded", 2),
}


def _leftovers(*folders: Path) -> list[str]:
    """Temporary files or directories, and lock files, anywhere under ``folders``."""
    out = []
    for folder in folders:
        for p in folder.rglob("*"):
            if ".tmp" in p.name or p.name.startswith(".old-") or p.name == "run.lock" or p.name.startswith(".sslbench-write-test"):
                out.append(str(p.relative_to(folder)))
    return out


def _one_error(r) -> str:
    assert r.returncode == 2, r.describe()
    assert "Traceback" not in r.stderr, r.describe()
    errors = [line for line in lines(r.stderr) if line.startswith("sslbench: error")]
    assert len(errors) == 1, r.describe()
    assert [line for line in lines(r.stderr) if "error" in line.lower()] == errors, r.describe()
    return errors[0]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    env = child_env(root / "cache")
    data = make_image_folder(root / "data")
    run = root / "base"
    argv = [
        "train",
        "--data",
        f"imagefolder:{data}",
        "--steps",
        "4",
        *TINY,
        "--set",
        "checkpoint_every=2",
        "--set",
        "log_every=1",
        "--output",
        str(run),
    ]
    r = run_forked(argv, {**env, SIGNAL_AT: "2"})
    assert r.returncode == 143, r.describe()
    assert [p.name for p in ckpt.list_checkpoints(run / "checkpoints")] == ["step-00000002"]
    assert not (run / "encoder.safetensors").exists()
    return {"root": root, "env": env, "data": data, "run": run}


@pytest.fixture(scope="module")
def site_runs(base):
    """Each site: a copy of the interrupted run resumed with the fault, then resumed again without it."""
    root, env = base["root"], base["env"]
    jobs, firsts = {}, {}
    for site, (pattern, nth, _, _) in SITES.items():
        run = root / f"site-{site}"
        shutil.copytree(base["run"], run)
        site_env = {**env, "SSLBENCH_CACHE": str(root / f"cache-{site}")} if site == "data-cache" else env
        firsts[site] = {"run": run, "env": site_env, "config": (run / "config.yaml").read_bytes()}
        jobs[site] = (["train", "--output", str(run), "--resume", "--quiet"], site_env, fail_writes(pattern, nth=nth))
    failed = run_many(jobs, max_running=4)
    for site, r in failed.items():
        firsts[site]["failed"] = r
        firsts[site]["after_failure"] = _leftovers(firsts[site]["run"], root / f"cache-{site}" if site == "data-cache" else firsts[site]["run"])
        firsts[site]["checkpoints"] = [(p.name, ckpt.verify(p)) for p in ckpt.list_checkpoints(firsts[site]["run"] / "checkpoints")]
        firsts[site]["config_after"] = (firsts[site]["run"] / "config.yaml").read_bytes()
    again = run_many(
        {site: (["train", "--output", str(rec["run"]), "--resume", "--quiet"], rec["env"], None) for site, rec in firsts.items()}, max_running=4
    )
    for site, r in again.items():
        firsts[site]["resumed"] = r
    return firsts


@pytest.mark.parametrize("site", list(SITES))
def test_a_full_disk_at_each_write_site_is_one_line_and_exit_2(site_runs, site):
    rec = site_runs[site]
    error = _one_error(rec["failed"])
    phrase = SITES[site][2]
    assert "No space left on device" in error or "torch.save failed" in error, error
    assert phrase in error, error
    assert "--resume" in error or "sslbench eval" in error or "cache_dir" in error, error  # says how to go on


@pytest.mark.parametrize("site", list(SITES))
def test_a_full_disk_leaves_no_temporary_file_and_the_last_good_state(site_runs, site):
    rec = site_runs[site]
    assert rec["after_failure"] == [], rec["after_failure"]
    assert all(problem is None for _, problem in rec["checkpoints"]), rec["checkpoints"]
    names = [name for name, _ in rec["checkpoints"]]
    assert "step-00000002" in names, names  # the checkpoint the run was resumed from is intact
    if SITES[site][3] == 2:
        assert names == ["step-00000002"], names  # the failed final checkpoint left nothing
    if site == "config":
        assert rec["config_after"] == rec["config"]  # the previous config.yaml, byte for byte


@pytest.mark.parametrize("site", list(SITES))
def test_a_later_resume_continues_from_the_last_good_checkpoint(site_runs, site):
    rec = site_runs[site]
    r = rec["resumed"]
    assert r.returncode == 0, r.describe()
    assert f"from step {SITES[site][3]} (step-{SITES[site][3]:08d})" in r.stderr, r.describe()
    run = rec["run"]
    summary = json.loads((run / "results.json").read_text())
    assert summary["steps"] == 4 and "knn_top1" in summary["metrics"], summary
    assert (run / "encoder.safetensors").is_file() and (run / "method.safetensors").is_file()
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4], steps  # each step logged once: a torn line of the failed append is gone
    assert _leftovers(run) == []


def test_a_real_writer_failure_is_one_line_too(base):
    """No patched writer: the file-size limit makes the real safetensors/torch writers fail (EFBIG)
    while writing the final checkpoint; their own exceptions are recognised as write failures."""
    run = base["root"] / "efbig"
    shutil.copytree(base["run"], run)
    r = run_forked(["train", "--output", str(run), "--resume", "--quiet"], base["env"], before=file_size_limit(600_000))
    error = _one_error(r)
    assert "cannot write checkpoint" in error and "step-00000004" in error and ("File too large" in error or "torch.save failed" in error), error
    assert _leftovers(run) == []
    assert [p.name for p in ckpt.list_checkpoints(run / "checkpoints")] == ["step-00000002"]
    r = run_forked(["train", "--output", str(run), "--resume", "--quiet"], base["env"])
    assert r.returncode == 0 and "from step 2" in r.stderr, r.describe()


# ---------------------------------------------------------------------------------------------
# Results store, leaderboard table and plot, and a comparison's files


@pytest.fixture(scope="module")
def finished(base):
    """A finished run (the base run resumed) and a results store next to it with one row."""
    run = base["root"] / "finished"
    shutil.copytree(base["run"], run)
    r = run_forked(["train", "--output", str(run), "--resume", "--quiet"], base["env"])
    assert r.returncode == 0, r.describe()
    store = base["root"] / "store" / "results.jsonl"
    r = run_forked(["eval", str(run), "--protocol", "knn", "--results", str(store)], base["env"])
    assert r.returncode == 0, r.describe()
    return {"run": run, "store": store}


def test_a_full_disk_while_appending_a_result_row_keeps_the_store_as_it_was(base, finished):
    before = finished["store"].read_bytes()
    r = run_forked(
        ["eval", str(finished["run"]), "--protocol", "knn", "--results", str(finished["store"])],
        base["env"],
        before=fail_writes(r"store/results\.jsonl$", nth=2),
    )  # (the 1st: the check that the store is writable)
    error = _one_error(r)
    assert "could not append a result row to" in error and "No space left on device" in error, error
    assert finished["store"].read_bytes() == before  # the half row was cut off again


def test_a_full_disk_while_writing_a_leaderboard_keeps_the_previous_table_and_plot(base, finished, tmp_path):
    table, plot = tmp_path / "board.md", tmp_path / "board.png"
    table.write_text("previous table\n")
    r = run_forked(["leaderboard", str(finished["store"]), "--output", str(table)], base["env"], before=fail_writes(r"board\.md\.tmp-"))
    error = _one_error(r)
    assert str(table) in error and "No space left on device" in error, error
    assert table.read_text() == "previous table\n" and sorted(p.name for p in tmp_path.iterdir()) == ["board.md"]
    pytest.importorskip("matplotlib")
    plot.write_bytes(b"previous plot")
    r = run_forked(["leaderboard", str(finished["store"]), "--plot", str(plot)], base["env"], before=fail_writes(r"board\.png\.tmp-"))
    error = _one_error(r)
    assert str(plot) in error and "No space left on device" in error, error
    assert plot.read_bytes() == b"previous plot" and sorted(p.name for p in tmp_path.iterdir()) == ["board.md", "board.png"]


@pytest.mark.parametrize("site", ["budget.json", "results.jsonl", "leaderboard.md", "checkpoint", "encoder.safetensors", "metrics.jsonl"])
def test_a_full_disk_in_a_comparison_loses_nothing_and_the_same_command_finishes_it(base, tmp_path, site):
    out = tmp_path / "cmp"
    argv = [
        "compare",
        "--methods",
        "simclr",
        "--steps",
        "2",
        "--data",
        f"imagefolder:{base['data']}",
        "--image-size",
        "16",
        "--batch-size",
        "16",
        "--precision",
        "no",
        "--set",
        "backbone_kwargs.channels=8,16,32,64",
        "--protocol",
        "knn",
        "--quiet",
        "--output",
        str(out),
    ]
    pattern = {
        "budget.json": r"budget\.json\.tmp-",
        "results.jsonl": r"cmp/results\.jsonl$",
        "leaderboard.md": r"leaderboard\.md\.tmp-",
        "checkpoint": r"\.tmp-step-00000002/model\.safetensors$",
        "encoder.safetensors": r"encoder\.safetensors\.tmp-",
        "metrics.jsonl": r"metrics\.jsonl$",
    }[site]
    error = _one_error(run_forked(argv, base["env"], before=fail_writes(pattern)))
    assert site in error and "No space left on device" in error, error
    if site in ("checkpoint", "encoder.safetensors", "metrics.jsonl"):  # a run of the comparison: the comparison's command finishes it (issue 34)
        assert "`sslbench compare --methods simclr" in error and "sslbench train" not in error, error
    assert _leftovers(out) == []
    r = run_forked(argv, base["env"])
    assert r.returncode == 0, r.describe()
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["method"] == "simclr", rows  # scored once, never twice
    assert (out / "leaderboard.md").is_file() and _leftovers(out) == []
