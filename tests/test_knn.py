"""Tests for the k-NN evaluator (evals/knn.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.neighbors import KNeighborsClassifier
from torch.overrides import TorchFunctionMode

from sslbench.core.errors import UserError
from sslbench.evals.knn import knn_classify, knn_eval, knn_protocol, topk_accuracy


def _data(n_train: int, n_test: int, dim: int, n_classes: int, seed: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    train = torch.randn(n_train, dim, generator=g, dtype=dtype) * 3.0  # not normalised on purpose
    test = torch.randn(n_test, dim, generator=g, dtype=dtype)
    train_labels = torch.randint(0, n_classes, (n_train,), generator=g)
    test_labels = torch.randint(0, n_classes, (n_test,), generator=g)
    return train, train_labels, test, test_labels


def _reference_scores(train, train_labels, test, *, k, temperature, weighted, n_classes):
    """Brute-force double loop in float64 Python arithmetic."""
    train = train.double().tolist()
    test = test.double().tolist()
    labels = train_labels.tolist()

    def cos(u, v):
        dot = sum(a * b for a, b in zip(u, v))
        return dot / (math.sqrt(sum(a * a for a in u)) * math.sqrt(sum(b * b for b in v)))

    out = []
    for q in test:
        sims = sorted(((cos(q, x), j) for j, x in enumerate(train)), reverse=True)[: min(k, len(train))]
        row = [0.0] * n_classes
        for s, j in sims:
            # exp(sim / T) divided by exp(best / T): knn_classify's per-row scale (same ranking)
            row[labels[j]] += math.exp((s - sims[0][0]) / temperature) if weighted else 1.0
        out.append(row)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("weighted", [True, False])
def test_matches_bruteforce_reference_float32(weighted: bool) -> None:
    train, ytr, test, _ = _data(80, 25, 12, 6, seed=0)
    got = knn_classify(train, ytr, test, k=15, temperature=0.1, weighted=weighted, num_classes=6)
    ref = _reference_scores(train, ytr, test, k=15, temperature=0.1, weighted=weighted, n_classes=6)
    assert got.dtype == torch.float32 and got.shape == (25, 6)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)


def test_matches_bruteforce_reference_float64() -> None:
    # Continuous random features: no two similarities tie, so the neighbour sets are exact
    # and float64 scores agree with the reference to rounding error.
    train, ytr, test, yte = _data(70, 30, 9, 7, seed=1, dtype=torch.float64)
    got = knn_classify(train, ytr, test, k=20, temperature=0.07, num_classes=7)
    ref = _reference_scores(train, ytr, test, k=20, temperature=0.07, weighted=True, n_classes=7)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=0.0)
    assert torch.equal(got.argmax(1), ref.argmax(1))


@pytest.mark.parametrize("k", [1, 2, 4, 9])
def test_majority_vote_matches_sklearn_including_ties(k: int) -> None:
    train, ytr, test, yte = _data(60, 200, 5, 4, seed=2, dtype=torch.float64)
    scores = knn_classify(train, ytr, test, k=k, weighted=False, num_classes=4)
    ours = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, 0]
    clf = KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute")
    clf.fit(train.numpy(), ytr.numpy())
    theirs = clf.predict(test.numpy())
    np.testing.assert_array_equal(ours.numpy(), theirs)
    if k in (2, 4):  # the tie rule is really exercised
        top = scores.max(dim=1, keepdim=True).values
        assert ((scores == top).sum(dim=1) > 1).any()
    # knn_eval uses the same rule for its top-1.
    acc = knn_eval(train, ytr, test, yte, k=k, weighted=False)
    assert acc["knn_top1"] == pytest.approx(100.0 * (theirs == yte.numpy()).mean())


def test_tie_goes_to_smallest_class() -> None:
    # Two neighbours of class 3 and two of class 1 around the query: class 1 must win.
    train = torch.tensor([[1.0, 0.1], [1.0, -0.1], [1.0, 0.2], [1.0, -0.2], [-1.0, 0.0]])
    labels = torch.tensor([3, 1, 1, 3, 0])
    test = torch.tensor([[1.0, 0.0]])
    scores = knn_classify(train, labels, test, k=4, weighted=False, num_classes=4)
    assert scores.tolist() == [[0.0, 2.0, 0.0, 2.0]]
    assert knn_eval(train, labels, test, torch.tensor([1]), k=4, weighted=False)["knn_top1"] == 100.0
    assert knn_eval(train, labels, test, torch.tensor([3]), k=4, weighted=False)["knn_top1"] == 0.0


@pytest.mark.parametrize("weighted", [True, False])
def test_chunk_size_changes_nothing(weighted: bool) -> None:
    train, ytr, test, _ = _data(150, 41, 16, 10, seed=3)
    full = knn_classify(train, ytr, test, k=30, weighted=weighted, chunk_size=41)
    for chunk in (1, 7, 1000):
        part = knn_classify(train, ytr, test, k=30, weighted=weighted, chunk_size=chunk)
        # Only the last bits of a BLAS dot product may depend on the block shape (amplified
        # tenfold by exp(sim / 0.1)); the neighbour sets, hence the vote counts, are identical.
        if weighted:
            torch.testing.assert_close(part, full, rtol=1e-5, atol=0.0)
        else:
            assert torch.equal(part, full)
        assert torch.equal(part.argmax(1), full.argmax(1))


def test_similarity_is_never_held_whole() -> None:
    train, ytr, test, _ = _data(300, 200, 4, 3, seed=4)
    largest = 0

    class Record(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            nonlocal largest
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, tuple) else (out,):
                if isinstance(t, torch.Tensor):
                    largest = max(largest, t.numel())
            return out

    with Record():
        knn_classify(train, ytr, test, k=10, chunk_size=16)
    assert largest == 16 * 300  # one (chunk, N_train) block, never (200, 300)


def test_k_is_clipped_to_train_size() -> None:
    train, ytr, test, _ = _data(12, 5, 6, 3, seed=5)
    big = knn_classify(train, ytr, test, k=200)
    exact = knn_classify(train, ytr, test, k=12)
    assert torch.equal(big, exact)
    # With every training row voting uniformly, the scores are the class counts.
    votes = knn_classify(train, ytr, test, k=200, weighted=False)
    assert torch.equal(votes, torch.bincount(ytr, minlength=3).float().expand(5, 3))


def test_knn_eval_metrics() -> None:
    # Well separated clusters: 100 % top-1; top-5 only reported with >= 5 classes.
    g = torch.Generator().manual_seed(6)
    centers = torch.randn(6, 32, generator=g) * 10
    ytr = torch.arange(6).repeat(20)
    yte = torch.arange(6).repeat(5)
    train = centers[ytr] + torch.randn(120, 32, generator=g)
    test = centers[yte] + torch.randn(30, 32, generator=g)
    acc = knn_eval(train, ytr, test, yte, k=200)
    assert acc == {"knn_top1": 100.0, "knn_top5": 100.0}
    four = ytr < 4
    acc4 = knn_eval(train[four], ytr[four], test[yte < 4], yte[yte < 4], k=5)
    assert set(acc4) == {"knn_top1"}
    assert acc4["knn_top1"] == 100.0


def test_topk_accuracy() -> None:
    scores = torch.tensor([[0.1, 0.5, 0.4], [1.0, 1.0, 0.0], [0.0, 0.2, 0.9]])
    labels = torch.tensor([2, 1, 0])
    acc = topk_accuracy(scores, labels, ks=(1, 2))
    assert acc[1] == 0.0  # row 1 ties 0/1 -> class 0 ranks first
    assert acc[2] == pytest.approx(200 / 3)


def test_bad_inputs_raise_user_error() -> None:
    train, ytr, test, yte = _data(10, 4, 3, 2, seed=7)
    with pytest.raises(UserError):
        knn_classify(train, ytr, test[:, :2])
    with pytest.raises(UserError):
        knn_classify(train, ytr, test, k=0)
    with pytest.raises(UserError):
        knn_classify(train, ytr, test, num_classes=1)
    with pytest.raises(UserError):
        knn_eval(train, ytr, test, yte[:2])


def test_protocol_record() -> None:
    p = knn_protocol(200, 0.1, True)
    assert p["k"] == 200 and p["temperature"] == 0.1 and p["metric"] == "cosine"
    assert "Wu" in p["reference"]
    assert knn_protocol(20, 0.1, False)["temperature"] is None


def test_protocol_record_says_the_k_that_ran_and_warns_when_k_exceeds_the_bank() -> None:
    """k is clipped to the training images (the memory bank): the record says the k that ran and,
    when clipped, carries one warning (issue 34)."""
    clipped = knn_protocol(200, 0.1, bank=48)
    assert clipped["k"] == 200 and clipped["k_effective"] == 48
    (warning,) = clipped["warnings"]
    assert warning.startswith("k-NN k=200 is more than the 48 training images in its memory bank, so it runs with k=48")
    assert "knn_k" in warning
    assert knn_protocol(200, 0.1, bank=200)["k_effective"] == 200 and "warnings" not in knn_protocol(200, 0.1, bank=200)
    assert "k_effective" not in knn_protocol(200, 0.1)  # (bank not given)


@pytest.mark.parametrize("temperature", [0.02, 0.01, 0.002])
def test_low_temperatures_neither_overflow_nor_tie(temperature: float) -> None:
    """exp(sim / T) overflows float32 once 1/T > 88.7: two classes with a near neighbour both
    scored inf and the tie went to class 0. The query equals a class-1 point; two class-0 points
    have cosine 0.95 with it, so class 1 wins at every temperature below ~0.1."""
    q = torch.tensor([[1.0, 0.0]])
    other = torch.tensor([0.95, math.sqrt(1 - 0.95**2)])
    train = torch.stack([q[0], other, other])
    labels = torch.tensor([1, 0, 0])
    scores = knn_classify(train, labels, q, k=3, temperature=temperature, num_classes=2)
    assert torch.isfinite(scores).all(), scores
    assert scores.argmax(1).tolist() == [1], scores
    assert knn_eval(train, labels, q, torch.tensor([1]), k=3, temperature=temperature)["knn_top1"] == 100.0
