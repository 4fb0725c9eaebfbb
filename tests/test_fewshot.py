"""evals/fewshot.py: the few-shot classifier is scikit-learn's LogisticRegression (the RFS protocol),
fitted on the same draws; the draws are k per class, a pure function of (seed, draw, k)."""

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from sslbench.api import UserError
from sslbench.evals.fewshot import fewshot_eval, fewshot_indices, fit_logistic


@pytest.fixture(scope="module")
def data():
    """Five noisy classes in 24 dimensions: 40 training and 60 test features per class."""
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(5, 24, generator=g)
    ytr, yte = torch.arange(200) % 5, torch.arange(300) % 5
    xtr = centres[ytr] + 1.3 * torch.randn(200, 24, generator=g)
    xte = centres[yte] + 1.3 * torch.randn(300, 24, generator=g)
    return xtr, ytr, xte, yte


def _sklearn_accuracy(xtr, ytr, xte, yte):
    """RFS's classifier (eval/meta_eval.py): L2-normalised features, LogisticRegression(lbfgs, C=1), tightly converged."""
    norm = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    clf = LogisticRegression(C=1.0, solver="lbfgs", max_iter=10000, tol=1e-12).fit(norm(xtr), ytr)
    return 100.0 * float((clf.predict(norm(xte)) == yte).mean()), clf.predict_proba(norm(xte))


def test_fewshot_equals_scikit_learn_logistic_regression_on_the_same_draws(data):
    xtr, ytr, xte, yte = data
    metrics, per_draw = fewshot_eval(xtr, ytr, xte, yte, shots=[1, 2, 5], draws=3, seed=4)
    assert set(metrics) == {f"fewshot_{k}_{s}" for k in (1, 2, 5) for s in ("mean", "std")}
    for k in (1, 2, 5):
        ref = []
        for d in range(3):
            idx = fewshot_indices(ytr, k, d, 4).numpy()
            acc, proba = _sklearn_accuracy(xtr.numpy()[idx], ytr.numpy()[idx], xte.numpy(), yte.numpy())
            ref.append(acc)
            # the same classifier: its probabilities agree too (the optimum is unique; both stop at a gradient tolerance)
            w, b = fit_logistic(torch.nn.functional.normalize(xtr[idx].double(), dim=1), ytr[idx], 5)
            ours = torch.softmax(torch.nn.functional.normalize(xte.double(), dim=1) @ w + b, dim=1).numpy()
            np.testing.assert_allclose(ours, proba, atol=1e-3)
        assert per_draw[str(k)] == ref  # accuracy equal, draw by draw (same predictions)
        assert metrics[f"fewshot_{k}_mean"] == pytest.approx(np.mean(ref), abs=1e-9)
        assert metrics[f"fewshot_{k}_std"] == pytest.approx(np.std(ref, ddof=1), abs=1e-9)
    assert metrics["fewshot_1_mean"] < metrics["fewshot_5_mean"]  # more labels, better


def test_draws_are_k_per_class_and_a_pure_function_of_seed_draw_k(data):
    _, ytr, _, _ = data
    idx = fewshot_indices(ytr, 3, 0, 0)
    assert torch.bincount(ytr[idx]).tolist() == [3] * 5
    assert torch.equal(idx, fewshot_indices(ytr, 3, 0, 0))
    assert not torch.equal(idx, fewshot_indices(ytr, 3, 1, 0))  # another draw
    assert not torch.equal(idx, fewshot_indices(ytr, 3, 0, 1))  # another seed
    with pytest.raises(UserError, match="class 0 has only 40 training images"):
        fewshot_indices(ytr, 41, 0, 0)
