"""sslbench.evaluation.protocols: a new evaluation protocol is one registration, and `eval` and `compare`
give it flags, checked values, result rows and the reuse of stored rows like the built-ins."""

import pytest
import torch

from sslbench.commands.cli import main
from sslbench.evaluation.protocols import (
    EvalOptions,
    Option,
    Score,
    get_protocol,
    positive,
    protocol_names,
    register_protocol,
    unregister_protocol,
)
from sslbench.results import read_rows

TINY = "backbone_kwargs.channels=8,16,32,64"


@pytest.fixture(autouse=True)
def _env(monkeypatch, tmp_path):
    monkeypatch.setenv("SSLBENCH_CACHE", str(tmp_path / "cache"))
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def toy():
    """A toy protocol: the feature width times ``--toy-scale``, once per label fraction."""
    calls = []

    @register_protocol(
        "toy",
        options=[Option("--toy-scale", 1.0, "toy: scale of the score (default 1)", type=float, check=positive)],
        reuse_key=lambda cfg, opts: {"scale": opts.toy_scale},
        per_fraction=True,
    )
    def run_toy(ctx, fraction):
        calls.append((fraction, ctx.opts.toy_scale))
        train, test = ctx.features()
        return Score({"toy_width": float(train.shape[1]) * ctx.opts.toy_scale}, {"scale": ctx.opts.toy_scale})

    yield calls
    unregister_protocol("toy")


def _error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sslbench: error: "), err
    return err[0]


def test_the_builtin_protocols_are_registered_in_order():
    assert protocol_names()[:4] == ["knn", "linear", "finetune", "distill"]
    assert [get_protocol(n).per_fraction for n in ("knn", "linear", "finetune", "distill")] == [False, False, True, True]
    opts = EvalOptions()  # protocol options read as attributes, their defaults when unset
    assert (opts.linear_epochs, opts.finetune_lr, opts.finetune_optimizer, opts.distill_student_init) == (100, None, "auto", "random")
    assert EvalOptions(settings={"linear_epochs": 3}).linear_epochs == 3
    with pytest.raises(AttributeError):
        _ = opts.no_such_option


def test_a_toy_protocol_is_one_registration_with_flags_rows_and_reuse(toy, tmp_path, capsys):
    assert "toy" in protocol_names()
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())  # (argparse wraps the list)
    # every protocol in registration order (the built-ins' order depends on which test module imported
    # which protocol module first), the plugin last
    assert protocol_names()[-1] == "toy" and ", ".join(protocol_names()) in help_text and "--toy-scale" in help_text

    # compare: trains one tiny run, scores it with the toy protocol (one row per label fraction) and k-NN
    out = tmp_path / "cmp"
    argv = [
        "compare",
        "--methods",
        "simclr",
        "--steps",
        "1",
        "--batch-size",
        "16",
        "--set",
        TINY,
        "--set",
        "train_subset=32",
        "--output",
        str(out),
        "--quiet",
        "--protocol",
        "toy,knn",
        "--label-fractions",
        "0.1,0.5",
    ]
    assert main([*argv, "--toy-scale", "2"]) == 0
    rows = read_rows(out / "results.jsonl")
    assert [(r["protocol"]["name"], r["label_fraction"]) for r in rows] == [("toy", 0.1), ("toy", 0.5), ("knn", None)]
    width = rows[0]["metrics"]["toy_width"] / 2
    assert width > 0 and rows[1]["metrics"] == {"toy_width": 2 * width}
    assert rows[0]["protocol"]["name"] == "toy" and rows[0]["protocol"]["scale"] == 2.0
    assert rows[0]["protocol"]["eval_data"] == "digits" and rows[0]["method"] == "simclr"
    assert "toy_width" in (out / "leaderboard.md").read_text()
    assert toy == [(0.1, 2.0), (0.5, 2.0)]

    # the same command again: the stored rows are reused, the toy protocol does not run
    capsys.readouterr()
    assert main([*argv, "--toy-scale", "2"]) == 0
    assert "reusing its stored rows" in capsys.readouterr().err
    assert len(read_rows(out / "results.jsonl")) == 3 and len(toy) == 2
    # another toy setting (its reuse key): only the toy rows are scored again, k-NN's is reused
    assert main([*argv, "--toy-scale", "3"]) == 0
    assert "evaluating toy" in capsys.readouterr().err
    assert toy[2:] == [(0.1, 3.0), (0.5, 3.0)]
    assert [(r["protocol"]["name"], r["protocol"].get("scale")) for r in read_rows(out / "results.jsonl")][3:] == [("toy", 3.0), ("toy", 3.0)]

    # eval: the same flags on one run directory, rows appended to the store named
    run = out / "simclr-seed0"
    assert (
        main(["eval", str(run), "--protocol", "toy", "--label-fractions", "1", "--toy-scale", "0.5", "--results", str(tmp_path / "eval.jsonl")]) == 0
    )
    (row,) = read_rows(tmp_path / "eval.jsonl")
    assert (row["label_fraction"], row["metrics"]) == (1.0, {"toy_width": 0.5 * width})
    assert "toy_width" in capsys.readouterr().out  # the printed table

    # its option is checked like the built-ins' before anything runs: one line, exit 2
    assert main(["eval", str(run), "--protocol", "toy", "--toy-scale", "0", "--results", str(tmp_path / "bad.jsonl")]) == 2
    assert "--toy-scale must be > 0, got 0.0" in _error_line(capsys)
    assert not (tmp_path / "bad.jsonl").exists()


def test_unknown_and_unregistered_protocols_are_one_line_errors(toy, tmp_path, capsys):
    unregister_protocol("toy")
    assert main(["eval", str(tmp_path), "--protocol", "toy"]) == 2
    assert "unknown protocol 'toy'; valid: knn, linear, finetune, distill" in _error_line(capsys)


def test_a_second_protocol_under_a_taken_name_is_refused():
    with pytest.raises(ValueError, match="already registered"):
        register_protocol("knn")(lambda ctx, fraction: Score({}, {}))
