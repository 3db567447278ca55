"""The sampler against known posteriors, with tolerances gated on the effective sample size.

Two exact checks and one bracket:

* Gaussian law (full gradients, constant M): the chain's stationary covariance solves a discrete
  Lyapunov equation; for a scalar N(m, sigma^2) target with M = p it is
  sigma^2 / (1 - eps p / (4 sigma^2)) (DESIGN.md section 3).
* Conjugate linear regression with badly scaled, non-centred features, N = 2000, batch 100: the
  sample mean must match the exact posterior mean (mini-batch noise does not bias it); the sample
  variances must lie between the exact posterior variances and the variances predicted for SGLD with
  i.i.d. mini-batches (an upper bound: our epochs without replacement remove part of that noise),
  each side widened by 4 Monte Carlo standard errors.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import ess_per_coordinate
from pyro.infer import MCMC
from sgld_models import (
    badly_scaled_features,
    conjugate_linreg,
    exact_posterior,
    gaussian_target,
    sgld_stationary_covariance,
)

from pyro_bnp import RMSprop
from pyro_bnp.kernel import SGLD

Z = 4.0  # standard errors allowed


def _run(kernel, *args, num_samples, warmup_steps):
    mcmc = MCMC(kernel, num_samples=num_samples, warmup_steps=warmup_steps, disable_progbar=True)
    mcmc.run(*args)
    return mcmc


def _check_variance_law(draws: torch.Tensor, predicted: torch.Tensor, naive: torch.Tensor):
    """draws [1, n, d]; predicted/naive per-coordinate variances. Pooled ratio test."""
    ess = ess_per_coordinate(draws)
    var = draws[0].double().var(0)
    ratio = var / predicted
    # Var(sample variance) ~ 2 var^2 / ESS for a Gaussian; pool the d coordinates.
    se = torch.sqrt((2.0 / ess).sum()) / len(ess)
    print(f"mean ratio to prediction {ratio.mean():.4f} +- {se:.4f}, min ESS {ess.min():.0f}")
    assert abs(ratio.mean().item() - 1.0) < Z * se.item()
    # Power: the prediction must be distinguishable from the naive sigma^2.
    naive_ratio = (var / naive).mean().item()
    assert abs(naive_ratio - 1.0) > Z * se.item()


def test_gaussian_law_identity(seed):
    d, sigma, eps = 100, 1.5, 4.5  # eps p / (4 sigma^2) = 0.5: variance doubles
    loc = torch.linspace(-3, 3, d, dtype=torch.float64)
    kernel = SGLD(gaussian_target, step_size=eps, preconditioner="identity")
    mcmc = _run(kernel, loc, sigma, num_samples=3000, warmup_steps=200)
    draws = mcmc.get_samples(group_by_chain=True)["theta"]
    predicted = torch.full((d,), sigma**2 / (1 - eps / (4 * sigma**2)), dtype=torch.float64)
    _check_variance_law(draws, predicted, torch.full((d,), sigma**2, dtype=torch.float64))


def test_gaussian_law_rmsprop_frozen(seed):
    d, sigma, eps = 100, 1.5, 2.0
    loc = torch.linspace(-3, 3, d, dtype=torch.float64)
    pre = RMSprop(alpha=0.9, freeze_after_warmup=True)
    kernel = SGLD(gaussian_target, step_size=eps, preconditioner=pre)
    mcmc = _run(kernel, loc, sigma, num_samples=3000, warmup_steps=300)
    draws = mcmc.get_samples(group_by_chain=True)["theta"]
    p = pre.diagonal()["theta"].double()
    assert torch.all(eps * p / (4 * sigma**2) < 1)
    predicted = sigma**2 / (1 - eps * p / (4 * sigma**2))
    _check_variance_law(draws, predicted, torch.full((d,), sigma**2, dtype=torch.float64))


def test_temperature_scales_stationary_variance(seed):
    d, sigma, eps, temp = 100, 1.0, 0.2, 0.25
    loc = torch.zeros(d, dtype=torch.float64)
    kernel = SGLD(gaussian_target, step_size=eps, preconditioner="identity", temperature=temp)
    mcmc = _run(kernel, loc, sigma, num_samples=3000, warmup_steps=200)
    draws = mcmc.get_samples(group_by_chain=True)["theta"]
    # target exp(-U/T): variance T sigma^2, inflated by the same discretisation factor
    predicted = torch.full((d,), temp * sigma**2 / (1 - eps / (4 * sigma**2)), dtype=torch.float64)
    _check_variance_law(draws, predicted, torch.full((d,), sigma**2, dtype=torch.float64))


# -- conjugate regression ------------------------------------------------------------------
def _conjugate_check(draws, x, y, prior, noise, eps, batch, m=None, max_bound=1.75):
    mean, cov = exact_posterior(x, y, prior, noise)
    upper = sgld_stationary_covariance(x, y, prior, noise, eps, batch, m=m).diag()
    ess = ess_per_coordinate(draws)
    d = draws[0].double()
    z_mean = (d.mean(0) - mean) / torch.sqrt(upper / ess)
    var = d.var(0)
    se = torch.sqrt(2.0 / ess)
    print("ESS", ess.numpy().round(0), "mean z", z_mean.numpy().round(2))
    print("var / exact", (var / cov.diag()).numpy().round(3))
    print("iid-batch bound / exact", (upper / cov.diag()).numpy().round(3))
    assert ess.min() > 30, "too few effective draws for a meaningful test"
    assert torch.all(z_mean.abs() < Z), z_mean
    assert torch.all(var > cov.diag() * (1 - Z * se)), "variance below the exact posterior"
    assert torch.all(var < upper * (1 + Z * se)), "variance above the SGLD bound"
    assert torch.all(upper / cov.diag() < max_bound)  # the bracket stays informative


def _stack(samples):
    return torch.cat([samples["b"][..., None], samples["w"]], -1)


@pytest.mark.parametrize("preconditioner", ["identity", "rmsprop"])
def test_conjugate_regression_fast(seed, preconditioner):
    n, batch, prior, noise = 2000, 100, 10.0, 1.0
    x, y = badly_scaled_features(n, scales=[0.7, 1.0, 1.4], means=[0.5, -0.5, 0.3])
    print(f"N={n} batch={batch} preconditioner={preconditioner}")
    if preconditioner == "identity":
        eps, pre, warm = 2e-5, "identity", 1000
    else:
        eps, pre, warm = 5e-6, RMSprop(freeze_after_warmup=True), 3000
    kernel = SGLD(
        conjugate_linreg, step_size=eps, subsample_size={"data": batch}, preconditioner=pre
    )
    mcmc = _run(kernel, x, y, prior, noise, num_samples=15000, warmup_steps=warm)
    draws = _stack(mcmc.get_samples(group_by_chain=True))
    m = None
    if preconditioner == "rmsprop":
        g = pre.diagonal()
        m = torch.diag(torch.cat([g["b"].reshape(1), g["w"]]).double())
    _conjugate_check(draws, x, y, prior, noise, eps, batch, m=m)


def test_full_batch_matches_lyapunov_exactly(seed):
    """Full gradients: the SGLD covariance equals the Lyapunov solution (no mini-batch term)."""
    n, prior, noise, eps = 300, 10.0, 1.0, 2e-3
    x, y = badly_scaled_features(n, scales=[0.5, 1.0], means=[0.5, -0.5])
    kernel = SGLD(conjugate_linreg, step_size=eps, preconditioner="identity")
    mcmc = _run(kernel, x, y, prior, noise, num_samples=8000, warmup_steps=500)
    draws = _stack(mcmc.get_samples(group_by_chain=True))
    predicted = sgld_stationary_covariance(x, y, prior, noise, eps, n).diag()
    _, cov = exact_posterior(x, y, prior, noise)
    assert (predicted / cov.diag()).max() > 1.1  # the discretisation bias is visible
    ess = ess_per_coordinate(draws)
    ratio = draws[0].var(0) / predicted
    se = torch.sqrt(2.0 / ess)
    print("ratio to Lyapunov", ratio.numpy().round(3), "se", se.numpy().round(3))
    assert torch.all((ratio - 1).abs() < Z * se)
    assert math.isfinite(float(ratio.sum()))
