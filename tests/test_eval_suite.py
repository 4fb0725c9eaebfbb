"""The fewshot, transfer, robustness and ood protocols end to end from the CLI on a tiny digits run,
each against a reference computed here without the protocol: `sslbench eval --data` with the linear
protocol (transfer), numpy-corrupted images through the linear probe (robustness), scikit-learn's
AUROC on numpy k-NN distances (ood), scikit-learn's LogisticRegression (fewshot)."""

import dataclasses

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from sslbench.commands.cli import main
from sslbench.config import TrainConfig, load_run_config
from sslbench.config.build import load_encoder
from sslbench.data import load_split
from sslbench.evals.fewshot import fewshot_indices
from sslbench.evals.linear import linear_probe
from sslbench.evaluation.features import extract_features, split_features
from sslbench.evaluation.protocols import EvalOptions, reusable
from sslbench.results import read_rows

TINY = "backbone_kwargs.channels=8,16,32,64"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def run(tmp_path_factory, _one_thread):
    """A 4-step SimCLR run on 64 digits, a 3-class image folder of 20 px images, and one evaluation
    by the four protocols (and the linear probe) whose rows the tests read."""
    root = tmp_path_factory.mktemp("suite")
    mp = pytest.MonkeyPatch()
    mp.setenv("SSLBENCH_CACHE", str(root / "cache"))
    from _reliability import make_image_folder

    folder = make_image_folder(root / "pets", classes=3, train=12, test=6, size=20)
    out = root / "runs" / "simclr"
    sets = ["--set", TINY]
    if "quick_knn" in {f.name for f in dataclasses.fields(TrainConfig)}:
        sets += ["--set", "quick_knn=false"]
    argv = ["train", "--method", "simclr", "--steps", "4", "--batch-size", "32", "--train-subset", "64", "--output", str(out), "--quiet", *sets]
    assert main(argv) == 0
    common = ["--linear-epochs", "3", "--results", str(root / "suite.jsonl")]
    argv = [
        "eval",
        str(out),
        "--protocol",
        "linear,fewshot,transfer,robustness,ood",
        "--fewshot-k",
        "1,5",
        "--fewshot-draws",
        "2",
        "--transfer-data",
        f"digits,imagefolder:{folder}",
        "--robustness-corruptions",
        "contrast,gaussian_noise",
        "--robustness-severities",
        "2,5",
        "--ood-data",
        f"corrupt:gaussian_noise:5,imagefolder:{folder}",
        "--ood-k",
        "5",
        *common,
    ]
    assert main(argv) == 0
    rows = {r["protocol"]["name"]: r for r in read_rows(root / "suite.jsonl")}
    # the reference for the image folder's transfer: `sslbench eval --data` with the linear protocol
    assert (
        main(["eval", str(out), "--data", f"imagefolder:{folder}", "--protocol", "linear", *common[:2], "--results", str(root / "data.jsonl")]) == 0
    )
    yield {"dir": out, "rows": rows, "folder": folder, "by_data": read_rows(root / "data.jsonl")[0], "argv": argv}
    mp.undo()


@pytest.fixture(scope="module")
def features(run):
    """The run's frozen features of digits train and test, computed here."""
    encoder = load_encoder(run["dir"])
    train, test = load_split("digits", "train", 16), load_split("digits", "test", 16)
    return encoder, train, test, split_features(encoder, train, image_size=16), split_features(encoder, test, image_size=16)


def test_list_protocols_shows_the_four_with_a_description(capsys):
    assert main(["list", "protocols"]) == 0
    out = capsys.readouterr().out
    for name, words in (("fewshot", "labelled images per class"), ("transfer", "other data sets"), ("robustness", "corruptions"), ("ood", "AUROC")):
        line = next(line for line in out.splitlines() if line.split()[:1] == [name])
        assert words in line


def test_transfer_equals_the_linear_probe_of_eval_data(run):
    """Each target is probed as `sslbench eval --data SPEC --protocol linear` probes it: digits is
    the run's own data (so the linear row), the 20 px image folder is read at the run's 16 px."""
    row = run["rows"]["transfer"]
    assert row["metrics"]["transfer_digits_top1"] == run["rows"]["linear"]["metrics"]["linear_top1"]
    assert row["metrics"]["transfer_digits_top5"] == run["rows"]["linear"]["metrics"]["linear_top5"]
    assert row["metrics"]["transfer_pets_top1"] == run["by_data"]["metrics"]["linear_top1"]
    assert "transfer_pets_top5" not in row["metrics"]  # 3 classes
    assert row["protocol"]["targets"] == ["digits", f"imagefolder:{run['folder']}"]
    assert row["protocol"]["by_name"]["pets"] == {**row["protocol"]["by_name"]["pets"], "train_images": 36, "test_images": 18, "classes": 3}
    assert (row["protocol"]["epochs"], row["protocol"]["seed"], row["protocol"]["image_size"]) == (3, 0, 16)


def test_robustness_equals_the_probe_on_numpy_corrupted_images(run, features):
    """contrast at severity 2 and 5, applied here with the official numpy formula, through the
    linear probe trained on the clean training features."""
    encoder, train, test, ftr, fte = features
    row = run["rows"]["robustness"]
    clean = linear_probe(ftr, train.labels, fte, test.labels, epochs=3, seed=0)
    assert row["metrics"]["robustness_clean_top1"] == clean["linear_top1"] == run["rows"]["linear"]["metrics"]["linear_top1"]
    x = test.images.permute(0, 2, 3, 1).numpy() / 255.0
    accs = []
    for c in (0.5, 0.15):  # make_cifar_c.py's contrast at severities 2 and 5
        means = x.mean(axis=(1, 2), keepdims=True)
        images = torch.from_numpy(np.uint8(np.clip((x - means) * c + means, 0, 1) * 255)).permute(0, 3, 1, 2).contiguous()
        fc = extract_features(encoder, images, image_size=16)
        accs.append(linear_probe(ftr, train.labels, fc, test.labels, epochs=3, seed=0)["linear_top1"])
    assert row["protocol"]["top1_by_severity"]["contrast"] == pytest.approx({"2": accs[0], "5": accs[1]}, abs=0.3)  # one image in 360
    assert row["metrics"]["robustness_contrast_top1"] == pytest.approx(np.mean(accs), abs=0.3)
    m = row["metrics"]
    assert m["robustness_mca"] == pytest.approx((m["robustness_contrast_top1"] + m["robustness_gaussian_noise_top1"]) / 2)
    assert (row["protocol"]["corruptions"], row["protocol"]["severities"]) == (["contrast", "gaussian_noise"], [2, 5])


def test_ood_equals_scikit_learn_on_knn_distances_computed_here(run, features):
    encoder, _, _, ftr, fte = features
    far = split_features(encoder, load_split(f"imagefolder:{run['folder']}", "test", 16), image_size=16)
    norm = lambda f: (f / f.norm(dim=1, keepdim=True)).double().numpy()  # noqa: E731
    bank = norm(ftr)

    def score(f):
        return -np.sort(1.0 - norm(f) @ bank.T, axis=1)[:, 4]  # the 5th nearest

    s_in, s_out = score(fte), score(far)
    metrics = run["rows"]["ood"]["metrics"]
    y = np.r_[np.ones_like(s_in), np.zeros_like(s_out)]
    assert metrics["ood_pets_auroc"] == pytest.approx(100 * roc_auc_score(y, np.r_[s_in, s_out]), abs=1e-3)
    t = np.sort(s_in)[::-1][int(np.ceil(0.95 * len(s_in))) - 1]
    assert metrics["ood_pets_fpr95"] == pytest.approx(100 * np.mean(s_out >= t), abs=1e-9)
    assert 0 <= metrics["ood_corrupt_gaussian_noise_5_auroc"] <= 100 and 0 <= metrics["ood_corrupt_gaussian_noise_5_fpr95"] <= 100
    assert (run["rows"]["ood"]["protocol"]["k"], run["rows"]["ood"]["label_fraction"]) == (5, None)


def test_fewshot_row_equals_scikit_learn_on_the_runs_features(run, features):
    _, train, test, ftr, fte = features
    row = run["rows"]["fewshot"]
    assert set(row["metrics"]) == {"fewshot_1_mean", "fewshot_1_std", "fewshot_5_mean", "fewshot_5_std"}
    norm = lambda f: (f / f.norm(dim=1, keepdim=True)).double().numpy()  # noqa: E731
    for k in (1, 5):
        accs = []
        for d in range(2):
            idx = fewshot_indices(train.labels, k, d, 0).numpy()
            clf = LogisticRegression(C=1.0, max_iter=10000, tol=1e-12).fit(norm(ftr)[idx], train.labels.numpy()[idx])
            accs.append(100.0 * float((clf.predict(norm(fte)) == test.labels.numpy()).mean()))
        assert row["protocol"]["top1_by_draw"][str(k)] == accs
        assert row["metrics"][f"fewshot_{k}_mean"] == pytest.approx(np.mean(accs))
    assert (row["protocol"]["shots"], row["protocol"]["draws"], row["protocol"]["C"], row["protocol"]["features"]) == ([1, 5], 2, 1.0, "h")


def test_compare_reuses_a_row_only_under_the_same_settings(run):
    """The reuse keys: the stored rows are reused for the options they were scored with, not for others."""
    cfg = load_run_config(run["dir"])
    rows = list(run["rows"].values())
    settings = {
        "linear_epochs": 3,
        "fewshot_k": "1,5",
        "fewshot_draws": 2,
        "transfer_data": f"digits,imagefolder:{run['folder']}",
        "robustness_corruptions": "contrast,gaussian_noise",
        "robustness_severities": "2,5",
        "ood_data": f"corrupt:gaussian_noise:5,imagefolder:{run['folder']}",
        "ood_k": 5,
    }
    names = ["fewshot", "transfer", "robustness", "ood"]
    found, left = reusable(EvalOptions(protocols=names, settings=settings), cfg, rows)
    assert left is None and sorted(r["protocol"]["name"] for r in found) == sorted(names)
    for name, change in (
        ("fewshot", {"fewshot_draws": 3}),
        ("transfer", {"transfer_data": "digits"}),
        ("robustness", {"robustness_severities": "1,2,5"}),
        ("ood", {"ood_k": 6}),
    ):
        _, left = reusable(EvalOptions(protocols=[name], settings={**settings, **change}), cfg, rows)
        assert left is not None and left.protocols == [name], name


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--fewshot-k", "0,5", "--fewshot-k must be comma-separated ints >= 1"),
        ("--transfer-data", "nosuchdata", "--transfer-data is not a list of data specs"),
        ("--robustness-severities", "6", "--robustness-severities"),
        ("--robustness-corruptions", "fog", "--robustness-corruptions"),
        ("--ood-data", "corrupt:fog:3", "corrupt:NAME:SEVERITY"),
    ],
)
def test_bad_options_are_one_line_errors(run, capsys, flag, value, message):
    capsys.readouterr()
    assert main(["eval", str(run["dir"]), "--protocol", "fewshot", flag, value]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sslbench: error: ") and message in err[0], err
