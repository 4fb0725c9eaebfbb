"""NT-Xent equals the paper's formula, written as a plain loop."""

import math

import pytest
import torch
import torch.nn.functional as F

from sslbench.methods.simclr import NTXentLoss


def reference_ntxent(z0: torch.Tensor, z1: torch.Tensor, tau: float) -> torch.Tensor:
    """SimCLR Eq. 1 averaged over all 2N anchors, one anchor at a time."""
    z = torch.cat([z0, z1])
    n2 = z.shape[0]
    n = n2 // 2
    total = z.new_zeros(())
    for i in range(n2):
        j = (i + n) % n2
        sims = [F.cosine_similarity(z[i], z[k], dim=0) / tau for k in range(n2) if k != i]
        pos = F.cosine_similarity(z[i], z[j], dim=0) / tau
        total = total - (pos - torch.logsumexp(torch.stack(sims), dim=0))
    return total / n2


@pytest.mark.parametrize("n,d,tau", [(2, 3, 0.5), (5, 8, 0.1), (8, 16, 1.0), (13, 4, 0.07)])
def test_matches_loop_reference_loss_and_grads(n, d, tau):
    g = torch.Generator().manual_seed(n * 100 + d)
    a = torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True)
    got = NTXentLoss(tau)(a, b)
    ga, gb = torch.autograd.grad(got, (a, b))
    a2, b2 = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    want = reference_ntxent(a2, b2, tau)
    wa, wb = torch.autograd.grad(want, (a2, b2))
    # the loss runs in float32 internally
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5)
    assert torch.allclose(ga.double(), wa, rtol=1e-4, atol=1e-6)
    assert torch.allclose(gb.double(), wb, rtol=1e-4, atol=1e-6)


def test_symmetric_in_views():
    a, b = torch.randn(6, 10), torch.randn(6, 10)
    loss = NTXentLoss(0.3)
    assert torch.allclose(loss(a, b), loss(b, a), atol=1e-6)


def test_closed_form_when_all_views_identical():
    # every similarity is 1: each anchor has 1 positive and 2N-2 negatives, all with logit 1/tau,
    # so the loss is log(2N - 1).
    n, tau = 7, 0.2
    z = torch.randn(1, 5).repeat(n, 1)
    assert math.isclose(NTXentLoss(tau)(z, z.clone()).item(), math.log(2 * n - 1), rel_tol=1e-5)


def test_finite_at_small_temperature():
    a = torch.randn(32, 64, requires_grad=True)
    b = torch.randn(32, 64)
    loss = NTXentLoss(0.01)(a, b)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(a.grad).all()
    # a perfectly aligned pair at tau=0.01 gives logits of 100: still finite and ~0 loss
    z = F.normalize(torch.randn(4, 16), dim=1)
    z = torch.cat([z, -z])  # make negatives dissimilar
    assert torch.isfinite(NTXentLoss(0.01)(z, z.clone()))


def test_bf16_inputs_computed_in_float32():
    a, b = torch.randn(8, 16), torch.randn(8, 16)
    full = NTXentLoss(0.5)(a, b)
    half = NTXentLoss(0.5)(a.bfloat16(), b.bfloat16())
    assert half.dtype == torch.float32
    assert torch.allclose(full, half, atol=2e-2)


def test_bad_temperature_is_a_user_error():
    from sslbench.core.errors import UserError

    with pytest.raises(UserError, match="temperature"):
        NTXentLoss(0.0)
