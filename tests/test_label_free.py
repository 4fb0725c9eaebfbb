"""Label-free feature metrics (alignment, uniformity, RankMe, feature std) equal their papers'
formulas and give the known answers; they score data without labels; and probes at a projector
depth (`--features proj1`) equal the probe on that layer's output computed by hand."""

import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sslbench.commands.cli import main
from sslbench.evals.label_free import RANKME_EPS, alignment, feature_std, rankme, uniformity
from sslbench.results import read_rows

TINY = ["--set", "backbone_kwargs.channels=8,16,32,64"]


@pytest.fixture(autouse=True)
def _env(monkeypatch, tmp_path):
    monkeypatch.setenv("SSLBENCH_CACHE", str(tmp_path / "cache"))
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------------------------------------
# The formulas, written independently (NumPy, float64, explicit pairs)


def _unit(x):
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _alignment_ref(x, y, alpha):
    return float(np.mean([np.linalg.norm(a - b) ** alpha for a, b in zip(_unit(x), _unit(y))]))


def _uniformity_ref(z, t):
    u = _unit(z)
    terms = [math.exp(-t * float(np.sum((u[i] - u[j]) ** 2))) for i in range(len(u)) for j in range(i + 1, len(u))]
    return math.log(sum(terms) / len(terms))


def _rankme_ref(z, eps=1e-7):
    s = np.linalg.svd(np.asarray(z, dtype=np.float64), compute_uv=False)
    p = s / s.sum() + eps
    return float(np.exp(-np.sum(p * np.log(p))))


def _std_ref(z):
    return float(np.mean(np.std(_unit(z), axis=0)))  # NumPy's std is the population one (ddof=0)


def test_each_metric_equals_its_formula_on_random_embeddings():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(60, 7, generator=gen) + 0.5
    y = x + 0.3 * torch.randn(60, 7, generator=gen)
    for alpha in (1.0, 2.0, 3.0):
        assert alignment(x, y, alpha) == pytest.approx(_alignment_ref(x, y, alpha), rel=1e-12)
    for t in (0.5, 2.0):
        assert uniformity(x, t, chunk=16) == pytest.approx(_uniformity_ref(x, t), rel=1e-10)
    assert rankme(x) == pytest.approx(_rankme_ref(x), rel=1e-10)
    assert feature_std(x) == pytest.approx(_std_ref(x), rel=1e-10)
    assert RANKME_EPS == 1e-7  # Garrido et al.


def test_collapsed_embeddings_rank_one_uniformity_zero_std_zero():
    z = torch.tensor([[0.3, -1.2, 2.0, 0.5]]).repeat(100, 1) * torch.linspace(1, 3, 100)[:, None]  # one direction
    assert rankme(z) == pytest.approx(1.0, abs=1e-4)  # rank one: exp(entropy of (1, 0, 0, 0) + eps) ~ 1
    assert uniformity(z) == pytest.approx(0.0, abs=1e-9)  # every normalised distance is 0
    assert feature_std(z) == pytest.approx(0.0, abs=1e-6)  # (float32 rows: rounding only)
    assert alignment(z, z * 7) == pytest.approx(0.0, abs=1e-9)  # views that map to one point


def test_isotropic_gaussian_embeddings_have_full_rank_and_std_one_over_sqrt_d():
    d = 32
    z = torch.randn(20000, d, generator=torch.Generator().manual_seed(0))
    assert d * 0.97 < rankme(z) <= d  # near the dimension (equal singular values give exactly d)
    assert feature_std(z) == pytest.approx(1 / math.sqrt(d), rel=0.01)
    # E exp(-t|u - v|^2) = exp(-2t) E exp(2t cos) over independent uniform directions; for large d,
    # cos ~ N(0, 1/d) so uniformity ~ -2t + 2t^2/d = -4 + 0.25
    assert uniformity(z[:3000]) == pytest.approx(-4 + 8 / d, abs=0.02)


def test_known_answers_on_hand_made_embeddings():
    eye = torch.eye(5)
    assert rankme(eye) == pytest.approx(math.exp(-5 * (0.2 + 1e-7) * math.log(0.2 + 1e-7)), rel=1e-12)  # ~5
    assert uniformity(eye, t=2) == pytest.approx(-4.0)  # every pair of orthonormal vectors: |u - v|^2 = 2
    assert uniformity(torch.tensor([[1.0, 0.0], [-3.0, 0.0]]), t=2) == pytest.approx(-8.0)  # antipodal: |u - v|^2 = 4
    assert alignment(eye[:1], eye[1:2], alpha=2) == pytest.approx(2.0)
    assert alignment(eye[:1], eye[1:2], alpha=1) == pytest.approx(math.sqrt(2))
    assert feature_std(torch.tensor([[2.0, 0.0], [-1.0, 0.0]])) == pytest.approx(0.5)  # dims: std 1 and 0


# ---------------------------------------------------------------------------------------------
# Protocols on a trained run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny SimCLR v1 run on digits (two steps)."""
    tmp = tmp_path_factory.mktemp("lf")
    out = tmp / "runs" / "simclr"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SSLBENCH_CACHE", str(tmp / "cache"))
        assert (
            main(
                [
                    "train",
                    "--steps",
                    "2",
                    "--batch-size",
                    "32",
                    "--output",
                    str(out),
                    "--quiet",
                    *TINY,
                    "--set",
                    "train_subset=64",
                    "--set",
                    "quick_knn=false",
                    "--set",
                    "proj_hidden_dim=64",
                    "--set",
                    "proj_dim=16",
                ]
            )
            == 0
        )
    return out


def test_a_probe_at_proj1_equals_the_probe_on_that_layers_output_computed_by_hand(run, tmp_path):
    from sslbench.config.build import load_encoder
    from sslbench.data import load_split
    from sslbench.evals.knn import knn_eval
    from sslbench.evals.linear import linear_probe
    from sslbench.evaluation.features import split_features

    results = tmp_path / "results.jsonl"
    assert (
        main(
            [
                "eval",
                str(run),
                "--protocol",
                "knn,linear",
                "--features",
                "proj1",
                "--linear-epochs",
                "3",
                "--results",
                str(results),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    rows = {r["protocol"]["name"]: r for r in read_rows(results)}
    assert rows["linear"]["protocol"]["features"] == rows["knn"]["protocol"]["features"] == "proj1"

    # proj1 by hand: the projector's first hidden layer Linear (no bias: BN follows) -> BatchNorm (running stats) -> ReLU
    state = load_file(str(run / "method.safetensors"))
    w = state["projector.0.weight"].double()
    mean, var = state["projector.1.running_mean"].double(), state["projector.1.running_var"].double()
    gamma, beta = state["projector.1.weight"].double(), state["projector.1.bias"].double()
    assert "projector.0.bias" not in state and w.shape == (64, 64)  # proj_hidden_dim x h (the 8-16-32-64 ResNet: 64)
    encoder = load_encoder(run)

    def proj1(split):
        h = split_features(encoder, load_split("digits", split, 16), image_size=16).double()
        return torch.relu((h @ w.T - mean) / torch.sqrt(var + 1e-5) * gamma + beta).float()

    train, test = load_split("digits", "train", 16), load_split("digits", "test", 16)
    f_train, f_test = proj1("train"), proj1("test")
    assert f_train.shape == (len(train), 64)
    by_hand = linear_probe(f_train, train.labels, f_test, test.labels, epochs=3, seed=0)
    for name in ("linear_top1", "linear_top5", "linear_val_top1"):
        assert rows["linear"]["metrics"][name] == pytest.approx(by_hand[name], abs=1e-9), name
    knn = knn_eval(f_train, train.labels, f_test, test.labels, k=200, temperature=0.1)
    assert rows["knn"]["metrics"]["knn_top1"] == pytest.approx(knn["knn_top1"], abs=1e-9)


def test_depths_are_separate_rows_and_a_missing_depth_is_one_line(run, tmp_path, capsys):
    results = tmp_path / "results.jsonl"
    assert main(["eval", str(run), "--protocol", "knn", "--features", "h,z,proj1", "--results", str(results)]) == 0
    rows = read_rows(results)
    assert [r["protocol"]["features"] for r in rows] == ["h", "z", "proj1"]
    assert len({r["metrics"]["knn_top1"] for r in rows}) == 3  # three different representations
    capsys.readouterr()
    assert main(["eval", str(run), "--protocol", "knn", "--features", "proj2", "--results", str(results)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--features proj2: simclr has a projector with the depths h, proj1, z" in err[0]
    assert main(["eval", str(run), "--protocol", "knn", "--features", "deep", "--results", str(results)]) == 2
    assert "'deep' is not a feature depth" in capsys.readouterr().err


def test_the_label_free_metrics_score_data_without_labels(run, tmp_path, capsys):
    """Unlabelled images are an image folder with one class folder: every label is the same, and
    the label-free protocols never read them."""
    from _reliability import make_image_folder

    data = make_image_folder(tmp_path / "unlabelled", classes=1, train=6, test=40, size=16)
    results = tmp_path / "results.jsonl"
    argv = [
        "eval",
        str(run),
        "--data",
        f"imagefolder:{data}",
        "--protocol",
        "alignment,uniformity,rankme,feature_std",
        "--features",
        "h,z",
        "--metric-samples",
        "32",
        "--results",
        str(results),
    ]
    capsys.readouterr()
    assert main(argv) == 0
    table = [line.split() for line in capsys.readouterr().out.splitlines() if line.split()[:1] in (["alignment"], ["rankme"])]
    assert table and all(line[2] == "-" for line in table), table  # no label fraction for protocols without labels (issue 34)
    rows = read_rows(results)
    assert [(r["protocol"]["name"], r["protocol"]["features"]) for r in rows] == [
        (name, depth) for name in ("alignment", "uniformity", "rankme", "feature_std") for depth in ("h", "z")
    ]
    for r in rows:
        assert r["protocol"]["labels"] == "not used" and r["protocol"]["samples"] == 32 and r["data"].endswith("unlabelled")
        assert all(math.isfinite(v) for v in r["metrics"].values())
    by = {(r["protocol"]["name"], r["protocol"]["features"]): r["metrics"] for r in rows}
    assert 1.0 <= by["rankme", "z"]["rankme"] <= 16 and 1.0 <= by["rankme", "h"]["rankme"] <= 32
    assert -4.0 <= by["uniformity", "h"]["uniformity"] <= 0.0 and 0 <= by["alignment", "z"]["alignment"] <= 4.0
    assert by["feature_std", "z"]["feature_std_sqrt_d"] == pytest.approx(by["feature_std", "z"]["feature_std"] * 4)
