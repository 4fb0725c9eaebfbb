"""evals/ood.py: the k-NN distance score (Sun et al. 2022), its AUROC (scikit-learn's roc_auc_score)
and its FPR at 95% TPR (computed directly here, and from scikit-learn's ROC curve)."""

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score, roc_curve

from sslbench.evals.ood import auroc, far_names, fpr_at_tpr, knn_distance, parse_corrupt


def _fpr95_direct(score_in, score_out):
    """The fraction of far scores >= t, t the largest threshold with at least 95% of the in-distribution scores >= t."""
    for t in sorted(set(score_in.tolist()) | set(score_out.tolist()), reverse=True):
        if np.mean(score_in >= t) >= 0.95:
            return float(np.mean(score_out >= t))
    raise AssertionError


@pytest.mark.parametrize("ties", [False, True])
def test_auroc_and_fpr95_equal_scikit_learn_and_the_direct_definition(ties):
    rng = np.random.default_rng(1)
    score_in, score_out = rng.normal(1.0, 1.0, 203), rng.normal(0.0, 1.0, 157)
    if ties:  # coarse scores: many ties within and across the two sets
        score_in, score_out = np.round(score_in * 2) / 2, np.round(score_out * 2) / 2
    y = np.r_[np.ones_like(score_in), np.zeros_like(score_out)]
    s = np.r_[score_in, score_out]
    assert auroc(torch.from_numpy(score_in), torch.from_numpy(score_out)) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    fpr = fpr_at_tpr(torch.from_numpy(score_in), torch.from_numpy(score_out))
    assert fpr == pytest.approx(_fpr95_direct(score_in, score_out), abs=1e-12)
    fprs, tprs, _ = roc_curve(y, s, drop_intermediate=False)
    assert fpr == pytest.approx(fprs[np.argmax(tprs >= 0.95)], abs=1e-12)


def test_knn_distance_is_the_cosine_distance_to_the_kth_nearest_training_feature():
    g = torch.Generator().manual_seed(0)
    bank, queries = torch.randn(300, 16, generator=g), torch.randn(50, 16, generator=g)
    b = bank.double().numpy()
    q = queries.double().numpy()
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    dist = np.sort(1.0 - q @ b.T, axis=1)
    for k in (1, 7, 300, 500):  # (k beyond the bank: its farthest feature)
        ref = dist[:, min(k, 300) - 1]
        np.testing.assert_allclose(knn_distance(bank, queries, k, chunk_size=16).numpy(), ref, atol=1e-5)


def test_far_set_names():
    assert parse_corrupt("corrupt:contrast:5") == ("contrast", 5) and parse_corrupt("digits") is None
    names = far_names(["corrupt:gaussian_noise:5", "digits", "imagefolder:/data/pets/", "imagefolder:/x/pets"])
    assert names == {
        "corrupt:gaussian_noise:5": "corrupt_gaussian_noise_5",
        "digits": "digits",
        "imagefolder:/data/pets/": "pets",
        "imagefolder:/x/pets": "pets_2",
    }
