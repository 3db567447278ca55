"""SGHMC on the shared core: its exact Gaussian law, its reduction to SGLD, momentum rules.

The law (docs/usage.md, "SGHMC"): for ``N(mu, sigma^2)`` with ``M = p`` and full gradients, the
integrator ``m' = d m - h A^T g + s xi``, ``theta' = theta + h A m'`` (``d = 1 - h alpha``,
``s^2 = h T (2 alpha - h T beta)``) has the stationary variance
``T sigma^2 (1 - h T beta / (2 alpha)) / (1 - h^2 p / (2 (1 + d) sigma^2))``; the test also
solves the recursion's 3x3 moment equations numerically, so the closed form is checked too.
"""

from __future__ import annotations

import math

import pyro
import pytest
import torch
from protocol_models import BNN, Faulty, make_bnn_data
from pyro.infer import MCMC
from sgld_models import gaussian_target
from test_exact_posteriors import _check_variance_law

from pyro_bnp import SGHMC, SGLD, RMSprop
from pyro_bnp.schedules import Cyclical


def sghmc_variance(sigma2, h, alpha, p=1.0, temperature=1.0, beta=0.0):
    """Closed form of the stationary variance of theta."""
    d = 1.0 - h * alpha
    return (
        temperature
        * sigma2
        * (1.0 - h * temperature * beta / (2 * alpha))
        / (1.0 - h**2 * p / (2 * (1 + d) * sigma2))
    )


def sghmc_variance_by_moments(sigma2, h, alpha, p=1.0, temperature=1.0, beta=0.0):
    """The same, from the linear recursion in z = theta / sqrt(p), y = h m: solve for E z^2."""
    d = 1.0 - h * alpha
    omega = h**2 * p / sigma2
    q2 = h**2 * h * temperature * (2 * alpha - h * temperature * beta)
    # unknowns (A, B, C) = (E z^2, E y^2, E z y) of the stationary pair before an update
    lhs = torch.tensor(
        [
            [-(omega**2), 1 - d**2, 2 * d * omega],
            [1 - (1 - omega) ** 2, -(d**2), -2 * (1 - omega) * d],
            [(1 - omega) * omega, -(d**2), 1 - d * (1 - 2 * omega)],
        ],
        dtype=torch.float64,
    )
    a = torch.linalg.solve(lhs, torch.full((3,), q2, dtype=torch.float64))[0]
    return float(a) * p


@pytest.mark.parametrize("h,alpha,beta,temp", [(1.0, 0.6, 0.0, 1.0), (0.5, 1.0, 0.4, 0.5)])
def test_closed_form_equals_the_moment_equations(h, alpha, beta, temp):
    for sigma2, p in ((2.25, 1.0), (1.0, 0.3)):
        closed = sghmc_variance(sigma2, h, alpha, p, temp, beta)
        solved = sghmc_variance_by_moments(sigma2, h, alpha, p, temp, beta)
        assert closed == pytest.approx(solved, rel=1e-10)


def test_gaussian_law_identity(seed):
    d, sigma, h, alpha = 100, 1.5, 1.8, 0.3  # h alpha = 0.54; variance x1.6
    loc = torch.linspace(-3, 3, d, dtype=torch.float64)
    kernel = SGHMC(gaussian_target, step_size=h, friction=alpha, preconditioner="identity")
    mcmc = MCMC(kernel, num_samples=4000, warmup_steps=300, disable_progbar=True)
    mcmc.run(loc, sigma)
    draws = mcmc.get_samples(group_by_chain=True)["theta"]
    predicted = torch.full((d,), sghmc_variance(sigma**2, h, alpha), dtype=torch.float64)
    assert predicted[0] / sigma**2 > 1.3  # the discretisation bias is visible
    _check_variance_law(draws, predicted, torch.full((d,), sigma**2, dtype=torch.float64))


def test_gaussian_law_rmsprop_frozen_temperature_and_noise_estimate(seed):
    d, sigma, h, alpha, beta, temp = 100, 1.0, 1.2, 0.5, 0.5, 0.5
    loc = torch.zeros(d, dtype=torch.float64)
    pre = RMSprop(alpha=0.9, freeze_after_warmup=True)
    kernel = SGHMC(
        gaussian_target, step_size=h, friction=alpha, noise_estimate=beta, temperature=temp,
        preconditioner=pre,
    )  # fmt: skip
    mcmc = MCMC(kernel, num_samples=4000, warmup_steps=300, disable_progbar=True)
    mcmc.run(loc, sigma)
    draws = mcmc.get_samples(group_by_chain=True)["theta"]
    p = pre.diagonal()["theta"].double()
    predicted = torch.tensor(
        [sghmc_variance(sigma**2, h, alpha, float(pi), temp, beta) for pi in p],
        dtype=torch.float64,
    )
    _check_variance_law(draws, predicted, torch.full((d,), temp * sigma**2, dtype=torch.float64))


@pytest.mark.parametrize("preconditioner", ["identity", "rmsprop", "bnp", "bnp+rmsprop"])
def test_no_momentum_kept_is_sgld_with_twice_h_squared(seed, preconditioner):
    """``h alpha = 1``: each update forgets the momentum and is SGLD with ``eps = 2 h^2``."""
    x, y = make_bnn_data(n=30)
    h = 3e-3
    z0 = None
    chains = []
    for kind in ("sghmc", "sgld"):
        pyro.set_rng_seed(5)
        if kind == "sghmc":
            kernel = SGHMC(BNN(), h, friction=1.0 / h, preconditioner=preconditioner)
        else:
            kernel = SGLD(BNN(), 2 * h**2, preconditioner=preconditioner)
        kernel.setup(0, x, y)
        if z0 is None:
            z0 = {k: v.clone() for k, v in kernel.initial_params.items()}
        z, out = z0, []
        for _ in range(40):
            z = kernel.sample(z)
            out.append(z)
        chains.append(out)
        kernel.cleanup()
    for a, b in zip(*chains, strict=True):
        for k in a:  # the same law and the same noise draws: equal up to rounding
            torch.testing.assert_close(a[k], b[k], rtol=1e-9, atol=1e-12)


def test_rejected_update_sets_the_momentum_to_zero(seed):
    model = Faulty(nan_lp_at={3})  # call 3 = the evaluation after update 2
    kernel = SGHMC(model, 0.1, friction=1.0, preconditioner="identity")
    kernel.setup(0, torch.zeros(2, dtype=torch.float64))
    z = kernel.sample(kernel.initial_params)
    assert kernel.chain.aux["momentum"]["theta"].abs().sum() > 0
    before = z["theta"].clone()
    z = kernel.sample(z)
    assert kernel.last_draw_stats()["diverging"]
    assert torch.equal(z["theta"], before)
    assert torch.equal(kernel.chain.aux["momentum"]["theta"], torch.zeros(2, dtype=torch.float64))
    kernel.sample(z)  # from rest
    assert not kernel.last_draw_stats()["diverging"]


def test_momentum_resampling_draws_from_n0t(seed):
    kernel = SGHMC(
        gaussian_target, 0.05, friction=0.01, resample_momentum=1, temperature=4.0,
        preconditioner="identity",
    )  # fmt: skip
    loc = torch.zeros(20_000, dtype=torch.float64)
    kernel.setup(0, loc, 1.0)
    kernel.sample(kernel.initial_params)
    # m' = d m_resampled - h g + s xi: variance d^2 T + s^2 (g = theta = 0 at the start)
    h, alpha, temp = 0.05, 0.01, 4.0
    d = 1 - h * alpha
    var = d**2 * temp + h * temp * 2 * alpha
    m = kernel.chain.aux["momentum"]["theta"]
    assert float(m.var()) == pytest.approx(var, rel=0.05)


def test_resume_is_exact_and_saves_the_momentum(seed):
    x, y = make_bnn_data(n=40)

    def make():
        return SGHMC(BNN(), 2e-3, friction=5.0, preconditioner="bnp+rmsprop",
                     subsample_size={"data": 10})  # fmt: skip

    pyro.set_rng_seed(2)
    full = make()
    full.setup(0, x, y)
    z = full.initial_params
    draws = []
    for _ in range(12):
        z = full.sample(z)
        draws.append(z)
    pyro.set_rng_seed(2)
    first = make()
    first.setup(0, x, y)
    z = first.initial_params
    for _ in range(6):
        z = first.sample(z)
    state = first.state_dict()
    assert "momentum" in state["aux"]
    second = make()
    pyro.set_rng_seed(99)  # the global seed does not matter
    second.load_state_dict(state)
    second.setup(0, x, y)
    z = second.initial_params
    for i in range(6, 12):
        z = second.sample(z)
        for k in z:  # the same code path: bit for bit
            assert torch.equal(z[k], draws[i][k]), (i, k)
    for k in (full, first, second):
        k.cleanup()


def test_cyclical_schedule_and_mcmc_export(seed):
    from pyro_bnp import from_pyro

    x, y = make_bnn_data(n=60)
    schedule = Cyclical(4e-3, num_steps=60, num_cycles=2)
    kernel = SGHMC(BNN(), schedule, friction=20.0, subsample_size={"data": 20}, thin=2)
    mcmc = MCMC(kernel, num_samples=20, warmup_steps=10, disable_progbar=True)
    mcmc.run(x, y)
    steps = kernel.diagnostics()["step_size"]
    assert steps == [schedule((10 + i + 1) * 2 - 1) for i in range(20)]
    dt = from_pyro(mcmc)
    assert dt["posterior"]["fc1.weight"].shape[:2] == (1, 20)
    assert bool(dt["sample_stats"]["lp"].notnull().all())
    assert kernel.config()["friction"] == 20.0


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"friction": 0.0}, "friction must be positive"),
        ({"noise_estimate": -1.0}, "noise_estimate must be non-negative"),
        ({"friction": 20.0}, r"step_size \* friction = 2 > 1"),
        ({"noise_estimate": 100.0}, "noise_estimate=100 exceeds"),
        ({"resample_momentum": 0}, "resample_momentum must be None or a positive int"),
    ],
)
def test_bad_arguments_are_refused(kwargs, match):
    args = {"friction": 1.0, **kwargs}
    with pytest.raises(ValueError, match=match):
        SGHMC(gaussian_target, 0.1, **args)


def test_prior_checks_use_the_equivalent_sgld_step_size():
    kernel = SGHMC(gaussian_target, 0.1, friction=2.0)
    assert kernel._sgld_equivalent(0.1) == pytest.approx(2 * 0.01 / (2 - 0.2))
    assert math.isclose(SGLD(gaussian_target, 0.1)._sgld_equivalent(0.1), 0.1)
