"""The sparse-aware negative binomial equals scvi-tools' own, in value and gradient."""

import numpy as np
import pytest
import torch
from scipy import sparse
from scvi.distributions import NegativeBinomial

from scinfl.federated import SiteData
from scinfl.module import NONZERO_KEY, KeyedVAE, nb_log_likelihood
from scinfl.module._likelihood import digamma_positive


def _counts(n=32, p=50, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.poisson(torch.rand(n, p, generator=generator) * 0.8, generator=generator)


@pytest.mark.parametrize("per_feature", [True, False])
def test_value_and_gradients_match_scvi(per_feature):
    x = _counts()
    x[0, :] = 0  # a row of zeros
    x[1, 3] = 250.0  # a large count
    mu = (torch.rand(*x.shape) * 5 + 1e-3).requires_grad_()
    shape = (x.shape[1],) if per_feature else x.shape
    theta = (torch.rand(*shape) * 4 + 0.05).requires_grad_()
    reference = NegativeBinomial(mu=mu, theta=theta).log_prob(x).sum(-1)
    ours = nb_log_likelihood(x, mu, theta)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-3)
    for a, b in zip(
        torch.autograd.grad(ours.sum(), [mu, theta]),
        torch.autograd.grad(reference.sum(), [mu, theta]),
        strict=True,
    ):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_given_positions_give_the_same_value():
    x = _counts(seed=1)
    mu, theta = torch.rand(*x.shape) + 0.1, torch.rand(x.shape[1]) + 0.5
    flat = torch.nonzero(x.reshape(-1)).squeeze(1)
    zeros = torch.nonzero(x.reshape(-1) == 0).squeeze(1)[:2]
    with_zeros = torch.cat([flat, zeros])  # stored zeros of a sparse matrix
    expected = nb_log_likelihood(x, mu, theta)
    torch.testing.assert_close(nb_log_likelihood(x, mu, theta, nonzero=flat), expected)
    torch.testing.assert_close(nb_log_likelihood(x, mu, theta, nonzero=with_zeros), expected)


def test_sparse_site_minibatches_carry_the_nonzero_positions():
    x = _counts(n=20, p=9, seed=2).numpy()
    site = SiteData.from_arrays("a", sparse.csr_matrix(x), validation_size=0)
    batch = site.tensors(np.array([4, 0, 11]))
    expected = torch.nonzero(batch["X"].reshape(-1)).squeeze(1)
    assert torch.equal(batch[NONZERO_KEY], expected)
    assert NONZERO_KEY not in SiteData.from_arrays("d", x).tensors(np.array([0]))


def test_the_module_loss_is_scvi_tools_nb_loss():
    torch.manual_seed(0)
    x = _counts(n=16, p=12, seed=3)
    vae = KeyedVAE(n_input=12, key_mode=None)
    tensors = {"X": x, "batch": torch.zeros(16, 1), "labels": torch.zeros(16, 1)}
    inference, generative, loss = vae(tensors, compute_loss=True)
    expected = -generative["px"].log_prob(x).sum(-1)
    torch.testing.assert_close(loss.reconstruction_loss["reconstruction_loss"], expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_vectorised_digamma_is_as_accurate_as_torch(dtype):
    z = torch.cat([torch.logspace(-6, 8, 3000, dtype=torch.float64), torch.rand(3000) * 30 + 1])
    exact = torch.digamma(z.double())
    relative = (digamma_positive(z.to(dtype)).double() - exact).abs() / exact.abs().clamp(min=1)
    assert relative.max() < (1e-6 if dtype == torch.float32 else 5e-8)


def test_second_derivatives_for_gradient_matching_attacks():
    # the audit's gradient inversion differentiates the loss's gradient again
    x = _counts(n=6, p=5, seed=4).double()
    mu = (torch.rand(*x.shape, dtype=torch.float64) * 3 + 0.1).requires_grad_()
    theta = (torch.rand(5, dtype=torch.float64) * 2 + 0.2).requires_grad_()
    assert torch.autograd.gradgradcheck(lambda m, t: nb_log_likelihood(x, m, t), (mu, theta))
    # and forward mode (torch.func's jacfwd, hessian)
    assert torch.autograd.gradcheck(
        lambda t: nb_log_likelihood(x, mu.detach(), t), (theta,), check_forward_ad=True
    )
